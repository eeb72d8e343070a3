"""CIFAR-10/100 from the authors' Python-pickle batches in a local folder; never downloaded.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html, the "python version"):

- ``cifar-10-batches-py/``: ``data_batch_1`` … ``data_batch_5`` (train) and
  ``test_batch``; each a pickled dict with ``b"data"`` (uint8 [10000, 3072], channel-major
  32×32 RGB) and ``b"labels"`` (list of int in 0..9).
- ``cifar-100-python/``: ``train`` and ``test`` with ``b"data"`` and ``b"fine_labels"``
  (0..99).

``DIR`` may be that folder or its parent. Images come back as float32 (N, 3, 32, 32),
scaled to [0, 1] and normalized per channel with the usual training-set statistics
(:data:`CIFAR10_MEAN`/``STD``, :data:`CIFAR100_MEAN`/``STD``).

The files are pickles, so they are read with :class:`RestrictedUnpickler`, which can build
only dicts, lists, strings and NumPy arrays: a tampered batch file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from ..errors import first_line
from .data import DataSpecError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class CifarError(DataSpecError):
    """A CIFAR folder that is missing, incomplete or not in the pickle-batch format."""


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` in a pickle: an instance, not a type, so the only
    use a file can make of it is as :func:`_reconstruct`'s first argument (NEWOBJ fails)."""


_NDARRAY = _NdarrayToken()
MAX_SCALAR_BYTES = 64


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The few callables a pickled ndarray needs, under numpy 1.x and 2.x module names.

    They are wrapped so a file cannot make them allocate memory it does not hold: NumPy
    pickles an array as ``_reconstruct(ndarray, (0,), dtype)`` (empty) and then fills it
    through ``__setstate__``, which checks that the raw bytes match the shape.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    import _codecs

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY or tuple(shape) != (0,):
            raise pickle.UnpicklingError("refusing an array not pickled the way NumPy pickles arrays")
        return cast(np.ndarray, multiarray._reconstruct(np.ndarray, (0,), dtype))

    def scalar(dtype: Any, *args: Any) -> Any:
        if not isinstance(dtype, np.dtype) or dtype.itemsize > MAX_SCALAR_BYTES:
            raise pickle.UnpicklingError("refusing a NumPy scalar of an unusual dtype")
        return multiarray.scalar(dtype, *args)

    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): _NDARRAY,  # type: ignore[dict-item]
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # bytes written by Python 3 at protocol 2
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickles builtin containers and NumPy arrays only; any other global is refused.

    Built on the pure-Python unpickler, whose memo is a dict: the C one grows an array to
    the largest memo index a file names, so a 10-byte file can ask for gigabytes.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` (Python 2 strings stay bytes, as in the original batches)."""
    with path.open("rb") as handle:
        data = handle.read()
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _folder(root: Path, name: str, first_file: str) -> Path:
    for candidate in (root, root / name):
        if (candidate / first_file).is_file():
            return candidate
    if not root.exists():
        raise CifarError(f"CIFAR folder not found: {root}")
    raise CifarError(f"{root} holds no {first_file} (expected the extracted {name}/ folder or its parent)")


def _batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CifarError(f"CIFAR batch file missing: {path}")
    try:
        doc = restricted_load(path)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or tampered files alike
        text = first_line(err)
        raise CifarError(f"cannot read CIFAR batch {path}: {text}") from None
    if not isinstance(doc, dict):
        raise CifarError(f"{path} is not a CIFAR batch (a {type(doc).__name__}, not a dict)")
    data = doc.get(b"data", doc.get("data"))
    labels = doc.get(label_key, doc.get(label_key.decode()))
    if data is None or labels is None:
        raise CifarError(f"{path} lacks the keys data and {label_key.decode()}")
    try:
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        targets = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as err:
        raise CifarError(f"{path}: data must be uint8 rows of 3072 pixels ({err})") from None
    if len(images) != len(targets):
        raise CifarError(f"{path}: {len(images)} images but {len(targets)} labels")
    return images, targets


def load_cifar(
    root: str | Path, classes: int, split: str = "train", max_examples: int | None = None
) -> tuple[Tensor, Tensor]:
    """CIFAR-``classes`` (10 or 100) ``split`` (train/test/all) as normalized (N,3,32,32) floats."""
    root = Path(root).expanduser()
    if classes == 10:
        folder = _folder(root, "cifar-10-batches-py", "test_batch" if split == "test" else "data_batch_1")
        train = [f"data_batch_{i}" for i in range(1, 6)]
        files = {"train": train, "test": ["test_batch"], "all": [*train, "test_batch"]}[split]
        label_key, mean, std = b"labels", CIFAR10_MEAN, CIFAR10_STD
    elif classes == 100:
        folder = _folder(root, "cifar-100-python", "test" if split == "test" else "train")
        files = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]
        label_key, mean, std = b"fine_labels", CIFAR100_MEAN, CIFAR100_STD
    else:  # pragma: no cover - internal misuse
        raise ValueError(classes)
    images, targets, count = [], [], 0
    for name in files:
        if max_examples is not None and count >= max_examples:
            break  # no need to read (and decode) batches beyond the requested examples
        x, y = _batch(folder / name, label_key)
        images.append(x)
        targets.append(y)
        count += len(y)
    x = np.concatenate(images)[:max_examples]
    y = np.concatenate(targets)[:max_examples]
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise CifarError(f"{folder}: labels must lie in 0..{classes - 1}, found {y.min()}..{y.max()}")
    pixels = torch.from_numpy(x.astype(np.float32) / 255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t, torch.from_numpy(y)
