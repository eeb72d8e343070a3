"""Data specs (SPEC §4): strings such as ``digits`` or ``tensors:PATH`` → ``(x, y)``.

Nothing is ever downloaded. ``digits`` is scikit-learn's bundled 8×8 handwritten digits
(1797 images, 10 classes), pixels scaled to [0, 1], shaped (N, 1, 8, 8), with a fixed
seeded 80/20 train/test split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import HessdiagError

SPLITS = ("train", "test", "all")
DATA_SPECS = ("digits", "tensors:PATH")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class DataSpecError(HessdiagError):
    """An unknown, unreadable or malformed data spec."""


def digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float32 images (N, 1, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if split == "all":
        return x, y
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    num_test = round(DIGITS_TEST_FRACTION * len(y))
    idx = order[:num_test] if split == "test" else order[num_test:]
    return x[idx], y[idx]


def _tensors(path: str) -> tuple[Tensor, Tensor]:
    file = Path(path)
    if not file.is_file():
        raise DataSpecError(f"data file not found: {path}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise DataSpecError(f"cannot read tensors from {path}: {str(err).splitlines()[0][:200]}") from None
    if isinstance(obj, dict) and {"x", "y"} <= obj.keys():
        x, y = obj["x"], obj["y"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise DataSpecError(f"{path} must hold {{'x': Tensor, 'y': Tensor}} or a tuple (x, y)")
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise DataSpecError(f"{path}: x and y must be tensors")
    if x.shape[0] != y.shape[0]:
        raise DataSpecError(f"{path}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    return x, y


def load_data(spec: str, split: str = "train", max_examples: int | None = None) -> tuple[Tensor, Tensor]:
    """Resolve a data spec to an ``(x, y)`` pair of tensors.

    ``split`` selects the digits split (``train``, ``test`` or ``all``); file-based specs
    hold one split already. ``max_examples`` keeps the first N examples.
    """
    if split not in SPLITS:
        raise DataSpecError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        x, y = digits(split)
    elif kind == "tensors" and arg:
        x, y = _tensors(arg)
    else:
        raise DataSpecError(f"unknown data spec {spec!r}; use one of {', '.join(DATA_SPECS)}")
    if max_examples is not None:
        if max_examples < 1:
            raise DataSpecError(f"--max-examples must be positive, got {max_examples}")
        x, y = x[:max_examples], y[:max_examples]
    if x.shape[0] == 0:
        raise DataSpecError(f"data spec {spec!r} holds no examples")
    return x, y
