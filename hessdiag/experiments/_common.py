"""Helpers shared by the experiment modules: data pairs, devices, seeded RNG scopes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HessdiagError


class ExperimentError(HessdiagError):
    """A bad argument to a training, attack or reparametrization routine."""


def as_pair(data: Any, split: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair, or from a data spec string (``"digits"``) and a split."""
    if isinstance(data, str):
        from ..io.data import load_data

        return load_data(data, split=split)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ExperimentError(f"x and y need the same, positive number of examples "
                                  f"(got {x.shape[0]} and {y.shape[0]})")
        return x, y
    raise ExperimentError("data must be an (x, y) pair of tensors or a data spec such as 'digits'")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (default dtype otherwise)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def check_unit_box(x: Tensor, what: str) -> None:
    """Refuse inputs outside [0, 1]: the L∞ attacks clip their outputs to that box."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ExperimentError(f"{what} needs inputs in [0, 1] (the attacks clip to that box); "
                              f"got values in [{lo:g}, {hi:g}]")


def check_eps(eps: Any) -> float:
    """A finite L∞ radius ε ≥ 0, as a float."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ExperimentError(f"eps must be a number >= 0, got {eps!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ExperimentError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{name} must be a positive integer, got {value!r}")
    return value


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Restore torch's global RNG state after the block: the CPU generator, and on a CUDA
    ``device`` that device's generator too."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG for the block and restore the caller's RNG state afterwards.

    torchattacks draws its random starts from the global RNG and its APGD, FAB and Square
    attacks call ``torch.manual_seed`` themselves; forking the RNG keeps both effects from
    leaking into the caller. On a CUDA model the RNG of its device is forked and seeded too.
    """
    with forked_rng(device):
        torch.manual_seed(seed)
        yield


def import_torchattacks() -> Any:
    """The ``torchattacks`` module, or a one-line error saying how to install it."""
    try:
        import torchattacks
    except ImportError:
        raise ExperimentError(
            "the adversarial training and evaluation need torchattacks: "
            "pip install 'hessdiag[experiments]' (or pip install --no-deps torchattacks)"
        ) from None
    return torchattacks
