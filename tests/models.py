"""Tiny seeded models and data shared by the estimator tests."""

import torch
from torch import Tensor, nn

from hessdiag.models import cnn, mlp


def tiny_mlp(activation: str = "tanh") -> nn.Module:
    """6-5-4-3 MLP (58 parameters), seeded."""
    torch.manual_seed(1)
    return mlp(in_features=6, hidden=(5, 4), num_classes=3, activation=activation)


def tiny_cnn(activation: str = "tanh") -> nn.Module:
    """Two 3×3 conv layers on 1×5×5 images, 3 classes, seeded."""
    torch.manual_seed(2)
    return cnn(in_channels=1, image_size=5, channels=(2, 3), num_classes=3, activation=activation)


def image_data(n: int = 10, size: int = 5) -> tuple[Tensor, Tensor]:
    """n seeded 1×size×size images with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def write_digits_checkpoint(path, activation: str = "rct:n=1,alpha=14") -> None:
    """A native checkpoint of a seeded 64-6-10 MLP for the digits data (untrained)."""
    from hessdiag.io import save_checkpoint

    torch.manual_seed(0)
    kwargs = {"in_features": 64, "hidden": [6], "num_classes": 10, "activation": activation}
    save_checkpoint(path, mlp(**kwargs), "hessdiag.models:mlp", kwargs, {"data": "digits", "loss": "ce"})


# -- small networks of known structure (hessdiag.structure, curvature tape, curvprop) ----------


class ResidualBlock(nn.Module):
    """conv–BN–φ–conv–BN, identity shortcut, φ′ after the sum (φ′ = ``second_activation``,
    default φ); ``inplace_add`` writes the sum as ``out += identity`` (torchvision's form)
    instead of ``out = out + identity``."""

    def __init__(self, channels: int, activation, inplace_add: bool = False,
                 second_activation=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = (second_activation or activation)()
        self.inplace_add = inplace_add

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.inplace_add:
            out += x
        else:
            out = out + x
        return self.act2(out)


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm layer, so
    that eval-mode BatchNorm is not close to the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
                if module.affine:
                    module.weight.copy_(1.0 + 0.4 * torch.randn(c, generator=g))
                    module.bias.copy_(0.3 * torch.randn(c, generator=g))
    return model


def residual_cnn(activation=nn.ReLU, inplace_add: bool = False, seed: int = 0) -> nn.Module:
    """2×8×8 images → 3 classes: stride-2 conv–BN–φ₁, 2×2 max pooling, one residual block
    (φ₂ inside, φ₃ after the sum), linear head (P = 276). Seeded; BatchNorm randomized;
    float64. ``activation``: one module factory for all three, or a tuple (φ₁, φ₂, φ₃)."""
    first, second, third = activation if isinstance(activation, tuple) else (activation,) * 3
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), first(),
        nn.MaxPool2d(2), ResidualBlock(3, second, inplace_add, third),
        nn.Flatten(), nn.Linear(12, 3),
    )
    return randomize_batchnorm(model).double()


def residual_cnn_data(n: int = 5, seed: int = 3) -> tuple[Tensor, Tensor]:
    """n seeded float64 2×8×8 images with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)
