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
