"""Model zoo: small networks whose activation is a parameter.

:func:`mlp` and :func:`cnn` return an ``nn.Sequential`` (so BackPACK can traverse it);
:func:`resnet18_cifar` and :func:`wide_resnet` are residual networks with BatchNorm. Every
factory takes the activation as a registry spec (``"tanh"``, ``"rct:n=1,alpha=14"``, ...). Factories are
referred to in native checkpoints as ``"hessdiag.models:NAME"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .activations import get_activation


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (48, 48),
    num_classes: int = 10,
    activation: str = "tanh",
) -> nn.Sequential:
    """Flatten → (Linear → φ) × len(hidden) → Linear (linear output, docs/appendix.md)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), get_activation(activation)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 1,
    image_size: int = 8,
    channels: Sequence[int] = (8, 16),
    num_classes: int = 10,
    activation: str = "tanh",
) -> nn.Sequential:
    """(Conv3×3 → φ) per entry of ``channels`` (stride 2 after the first) → Flatten → Linear."""
    layers: list[nn.Module] = []
    width, size = in_channels, image_size
    for i, out in enumerate(channels):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1), get_activation(activation)]
        width, size = out, (size + 2 - 3) // stride + 1
    layers += [nn.Flatten(), nn.Linear(width * size * size, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN) shortcut, φ after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = get_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.act2 = get_activation(activation)

    def forward(self, x):  # noqa: D102 - the standard residual block
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR-style ResNet: 3×3 stem (no max-pool), four stages of BasicBlocks, global pool."""

    def __init__(self, blocks: Sequence[int], num_classes: int, activation: str, width: int,
                 in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = get_activation(activation)
        stages, planes = [], width
        for i, count in enumerate(blocks):
            out = width * 2**i
            layers = []
            for j in range(count):
                layers.append(BasicBlock(planes, out, 2 if (i > 0 and j == 0) else 1, activation))
                planes = out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):  # noqa: D102
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


def resnet18_cifar(
    num_classes: int = 10, activation: str = "silu", width: int = 64, in_channels: int = 3
) -> nn.Module:
    """ResNet-18 for 32×32 inputs (He et al. 2016, CIFAR variant): 11.2 M parameters at width 64.

    ``width`` scales every stage (64 → 64/128/256/512 channels); tests use a tiny one. Not
    an ``nn.Sequential``: BackPACK needs its graph converter for it; torch.func
    estimators (``exact``, ``hutchinson*``) take it as is, BatchNorm in eval mode.
    """
    return ResNetCIFAR((2, 2, 2, 2), num_classes, activation, width, in_channels)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN → φ → conv3×3 → BN → φ → conv3×3, plus the shortcut.

    When the shape changes (``in_planes != planes`` or ``stride != 1``) the shortcut is a
    1×1 convolution applied to the block's pre-activated input φ(BN(x)), as in the
    reference implementation; otherwise it is the identity on x.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = get_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = get_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):  # noqa: D102 - the pre-activation residual block
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """CIFAR-style wide ResNet: 3×3 stem, three groups of wide blocks, BN → φ → pool → Linear."""

    def __init__(self, depth: int, widen: int, num_classes: int, activation: str,
                 in_channels: int) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wide_resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), "
                             f"got {depth}")
        if widen < 1:
            raise ValueError(f"wide_resnet widen must be a positive integer, got {widen}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups, planes = [], widths[0]
        for i, out in enumerate(widths[1:]):
            layers = []
            for j in range(blocks):
                layers.append(WideBasicBlock(planes, out, 2 if (i > 0 and j == 0) else 1, activation))
                planes = out
            groups.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(planes)
        self.act = get_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):  # noqa: D102
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.linear(self.pool(self.act(self.bn(out))).flatten(1))


def wide_resnet(
    depth: int = 28,
    widen: int = 10,
    num_classes: int = 10,
    activation: str = "silu",
    in_channels: int = 3,
) -> nn.Module:
    """WRN-depth-widen for 32×32 inputs (Zagoruyko & Komodakis 2016): 36.5 M parameters at 28-10.

    Pre-activation blocks with BatchNorm, (depth − 4)/6 blocks per group, group widths
    16·widen, 32·widen, 64·widen (strides 1, 2, 2), no dropout, convolutions without bias.
    WRN-28-10 is the usual network of adversarial-training benchmarks; tests use a tiny
    ``wide_resnet(depth=10, widen=1)``. Like :func:`resnet18_cifar` it is not an
    ``nn.Sequential``.
    """
    return WideResNet(depth, widen, num_classes, activation, in_channels)


FACTORIES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet18_cifar": resnet18_cifar,
                                                  "wide_resnet": wide_resnet}
