"""Model zoo: small networks whose activation is a parameter.

Every factory returns an ``nn.Sequential`` (so BackPACK can traverse it) and takes the
activation as a registry spec (``"tanh"``, ``"rct:n=1,alpha=14"``, ...). Factories are
referred to in native checkpoints as ``"hessdiag.models:NAME"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .activations import get_activation


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (48, 48),
    num_classes: int = 10,
    activation: str = "tanh",
) -> nn.Sequential:
    """Flatten → (Linear → φ) × len(hidden) → Linear (linear output, MATH.md §4.1)."""
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


FACTORIES = {"mlp": mlp, "cnn": cnn}
