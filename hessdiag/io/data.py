"""Data specs (docs/index.md, "Checkpoints and data"): strings such as ``digits`` or ``npz:PATH`` → ``(x, y)`` tensors.

Nothing is ever downloaded.

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes),
  pixels scaled to [0, 1], shaped (N, 1, 8, 8), with a fixed seeded 80/20 train/test split.
- ``tensors:PATH``: a ``.pt`` file holding ``{"x": Tensor, "y": Tensor}`` or ``(x, y)``,
  read with ``torch.load(weights_only=True)``.
- ``npz:PATH``: a NumPy archive with arrays ``x`` and ``y``, read with
  ``allow_pickle=False``.
- ``cifar10:DIR``, ``cifar100:DIR``: the standard Python-pickle batches in a local folder
  (see :mod:`hessdiag.io.cifar`).

``--split`` picks train/test/all where the source has splits (digits, CIFAR); a file spec
holds one split already and ignores it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import HessdiagError, first_line

SPLITS = ("train", "test", "all")
DATA_SPECS = ("digits", "tensors:PATH", "npz:PATH", "cifar10:DIR", "cifar100:DIR")
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


def _existing_file(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise DataSpecError(f"data file not found: {path}")
    if not file.is_file():
        raise DataSpecError(f"data path {path} is not a file")
    return file


def _checked_pair(x: object, y: object, source: str) -> tuple[Tensor, Tensor]:
    """Both tensors, real numeric dtypes, at least one dimension, equal lengths."""
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise DataSpecError(f"{source}: x and y must be tensors")
    for name, t in (("x", x), ("y", y)):
        if t.is_complex() or t.dtype == torch.bool and name == "x":
            raise DataSpecError(f"{source}: {name} has unsupported dtype {t.dtype}")
        if t.dim() == 0:
            raise DataSpecError(f"{source}: {name} is a scalar, not a batch of examples")
    if x.shape[0] != y.shape[0]:
        raise DataSpecError(f"{source}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    if not (y.is_floating_point() or y.dtype == torch.int64):
        y = y.long()  # class labels: every loss wants int64, whatever integer type was saved
    return x, y


def _tensors(path: str) -> tuple[Tensor, Tensor]:
    file = _existing_file(path)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable or unsafe file is bad input
        raise DataSpecError(f"cannot read tensors from {path}: {first_line(err)}") from None
    if isinstance(obj, dict) and {"x", "y"} <= obj.keys():
        x, y = obj["x"], obj["y"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise DataSpecError(f"{path} must hold {{'x': Tensor, 'y': Tensor}} or a tuple (x, y)")
    return _checked_pair(x, y, path)


def _npz(path: str) -> tuple[Tensor, Tensor]:
    import numpy as np

    file = _existing_file(path)
    try:
        archive = np.load(file, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise DataSpecError(f"{path} is a single .npy array, not an .npz archive with x and y")
        with archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataSpecError(f"{path} lacks the array(s) {', '.join(missing)} "
                                    f"(has {', '.join(archive.files) or 'none'})")
            arrays = [archive["x"], archive["y"]]
    except DataSpecError:
        raise
    except Exception as err:  # noqa: BLE001 - bad zip, object arrays (need pickle), ...
        raise DataSpecError(f"cannot read arrays from {path}: {first_line(err)}") from None
    tensors = []
    for name, array in zip(("x", "y"), arrays):
        try:
            tensors.append(torch.from_numpy(array.copy(order="C")))
        except TypeError:
            raise DataSpecError(f"{path}: array {name} has unsupported dtype {array.dtype}") from None
    return _checked_pair(tensors[0], tensors[1], path)


def load_data(spec: str, split: str = "train", max_examples: int | None = None) -> tuple[Tensor, Tensor]:
    """Resolve a data spec to an ``(x, y)`` pair of tensors.

    ``split`` selects ``train``, ``test`` or ``all`` of digits and CIFAR; file-based specs
    hold one split already. ``max_examples`` keeps the first N examples.
    """
    if split not in SPLITS:
        raise DataSpecError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if max_examples is not None and max_examples < 1:
        raise DataSpecError(f"--max-examples must be positive, got {max_examples}")
    if not isinstance(spec, str):
        raise DataSpecError(f"a data spec must be a string, got {type(spec).__name__}")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        x, y = digits(split)
    elif kind == "tensors" and arg:
        x, y = _tensors(arg)
    elif kind == "npz" and arg:
        x, y = _npz(arg)
    elif kind in ("cifar10", "cifar100") and arg:
        from .cifar import load_cifar

        x, y = load_cifar(arg, int(kind[5:]), split, max_examples)
    else:
        raise DataSpecError(f"unknown data spec {spec!r}; use one of {', '.join(DATA_SPECS)}")
    if max_examples is not None:
        x, y = x[:max_examples], y[:max_examples]
    if x.shape[0] == 0:
        raise DataSpecError(f"data spec {spec!r} holds no examples")
    return x, y
