"""Checkpoints (SPEC §4): native documents and state dicts, loaded without unpickling code.

Every file is read with ``torch.load(weights_only=True)``, which refuses to rebuild
arbitrary Python objects. A native checkpoint names its model factory; because calling
an arbitrary importable callable with checkpoint-supplied keyword arguments is itself
code execution, a factory outside ``hessdiag.`` is honoured only when the user names it
(``--model``) or trusts the file.
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HessdiagError
from .files import atomic_write_bytes

NATIVE_VERSION = 1
TRUSTED_FACTORY_PREFIX = "hessdiag."


class CheckpointError(HessdiagError):
    """A checkpoint that cannot be read, or whose contents do not fit the model."""


def import_attr(spec: str) -> Callable[..., Any]:
    """Resolve ``"package.module:Attr"`` to the attribute (a class or factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"model spec {spec!r} must look like package.module:Attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"cannot import {module_name!r} for --model: {err}") from None
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise CheckpointError(f"{module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CheckpointError(f"{spec!r} is not a class or factory")
    return obj


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate ``spec`` with ``kwargs``; the result must be an ``nn.Module``."""
    try:
        model = import_attr(spec)(**dict(kwargs or {}))
    except HessdiagError:
        raise
    except Exception as err:  # noqa: BLE001 - user code failing is bad input here
        raise CheckpointError(f"building the model {spec} failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or unsafe files alike
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from None


def _load_state(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: non-finite values in {key}")
    model.load_state_dict(state)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from a native checkpoint, or a state dict plus ``model``.

    Returns ``(module, meta)``; ``meta`` is the native checkpoint's ``meta`` dict (empty
    for a bare state dict).
    """
    file = Path(path)
    obj = _read(file)
    if isinstance(obj, dict) and obj.get("hessdiag") == NATIVE_VERSION:
        info = obj.get("model") or {}
        factory = model or info.get("factory")
        if not isinstance(factory, str):
            raise CheckpointError(f"{file}: native checkpoint without a model factory; pass --model")
        if model is None and not (trust or factory.startswith(TRUSTED_FACTORY_PREFIX)):
            raise CheckpointError(
                f"{file} names the factory {factory!r} outside hessdiag; calling it could run "
                "code: pass --model with it yourself, or --trust-checkpoint"
            )
        kwargs = model_kwargs if model_kwargs is not None else info.get("kwargs", {})
        net = build_model(factory, kwargs)
        _load_state(net, obj.get("state_dict") or {}, str(file))
        return net, dict(obj.get("meta") or {})
    if model is None:
        raise CheckpointError(f"{file} is not a native hessdiag checkpoint; pass --model MODULE:ATTR")
    state = obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict")
    net = build_model(model, model_kwargs)
    _load_state(net, state, str(file))
    return net, {}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    factory: str,
    kwargs: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a native checkpoint (loadable with ``weights_only=True``) atomically."""
    doc = {
        "hessdiag": NATIVE_VERSION,
        "model": {"factory": factory, "kwargs": dict(kwargs)},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    atomic_write_bytes(path, buffer.getvalue())
