"""Model specs (``--model``): ``package.module:Attr`` or ``path/to/file.py:Attr``.

A spec names a class or factory; :func:`build_model` calls it with ``--model-kwargs``.
Importing a module or a file runs its code, which is fine here: the *user* names it on
the command line, unlike anything read from a checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import HessdiagError, first_line


class ModelSpecError(HessdiagError):
    """A ``--model`` spec that cannot be imported or does not build an ``nn.Module``."""


def _is_file_spec(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def _import_file(path_text: str) -> Any:
    """Import a ``.py`` file as a module (cached per resolved path)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"--model file not found: {path_text}")
    resolved = path.resolve()
    # A unique, stable module name per file, so two model.py files never collide and
    # pickling/dataclasses inside the file can find their module in sys.modules.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"hessdiag_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path_text} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own folder is importable while it runs, so `from layers import Block`
    # next to it works as it would with `python file.py`.
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failing is bad input
        del sys.modules[name]
        raise ModelSpecError(f"importing {path_text} failed: {first_line(err, with_type=True)}") from None
    finally:
        if added:
            sys.path.remove(folder)
    return module


def import_attr(spec: str) -> Callable[..., Any]:
    """Resolve ``"package.module:Attr"`` or ``"path/to/file.py:Attr"`` to the attribute."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelSpecError(
            f"model spec {spec!r} must look like package.module:Attr or path/to/file.py:Attr"
        )
    if _is_file_spec(module_part):
        module = _import_file(module_part)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as err:  # noqa: BLE001 - ImportError or the module's own failure
            raise ModelSpecError(f"cannot import {module_part!r} for --model: "
                                 f"{first_line(err, with_type=True)}") from None
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ModelSpecError(f"{module_part!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ModelSpecError(f"{spec!r} is not a class or factory")
    return obj


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate ``spec`` with ``kwargs``; the result must be an ``nn.Module``."""
    factory = import_attr(spec)
    try:
        model = factory(**dict(kwargs or {}))
    except HessdiagError:
        raise
    except Exception as err:  # noqa: BLE001 - user code failing is bad input here
        raise ModelSpecError(f"building the model {spec} failed: {first_line(err, with_type=True)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model
