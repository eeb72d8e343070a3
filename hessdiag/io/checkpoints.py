"""Checkpoints (docs/index.md, "Checkpoints and data"): every kind a user brings, loaded
without running checkpoint code.

Kinds, in the order they are recognized:

1. native: ``{"hessdiag": 1, "model": {"factory", "kwargs"}, "state_dict", "meta"}``;
2. a state dict, bare or nested under ``state_dict`` / ``model_state_dict`` / ``model``
   (training loops, Lightning), possibly with ``module.`` (DDP) or ``model.`` (Lightning)
   key prefixes, plus ``--model``;
3. a ``.safetensors`` file plus ``--model``;
4. a whole pickled ``nn.Module``, only with ``trust=True`` (``--trust-checkpoint``).

Every ``.pt`` file is read with ``torch.load(weights_only=True)`` unless trusted, which
refuses to rebuild arbitrary Python objects. A native checkpoint names its model factory;
because calling an arbitrary importable callable with checkpoint-supplied keyword
arguments is itself code execution, a factory outside ``hessdiag.models`` is honoured only when
the user names it (``--model``) or trusts the file.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HessdiagError, first_line
from .files import atomic_write_bytes
from .models_spec import ModelSpecError, build_model, import_attr

NATIVE_VERSION = 1
# Factories a checkpoint may name on its own: public names in hessdiag's model zoo only.
# Not file paths (importing one runs it), not other hessdiag callables (hessdiag.cli:main
# with checkpoint-supplied arguments could write files), not dotted or private attributes.
TRUSTED_FACTORY = re.compile(r"hessdiag\.models:[A-Za-z]\w*")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
STRIPPABLE_PREFIXES = ("module.", "model.")

__all__ = [
    "CheckpointError",
    "ModelSpecError",
    "build_model",
    "import_attr",
    "load_checkpoint",
    "save_checkpoint",
]


class CheckpointError(HessdiagError):
    """A checkpoint that cannot be read, or whose contents do not fit the model."""


# -- reading ---------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    """By extension, or by the format's header: u64 little-endian length, then ``{``."""
    if path.suffix == ".safetensors":
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - a core dependency
        raise CheckpointError("reading .safetensors needs the safetensors package") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ... alike
        raise CheckpointError(f"cannot load safetensors file {path}: {first_line(err)}") from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_WEIGHTS_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def _read_torch(path: Path, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or unsafe files alike
        text = str(err)
        found = _GLOBAL.search(text) if not trust else None
        if found:
            raise CheckpointError(
                f"{path} holds pickled Python objects ({found.group(1)}), not just tensors; "
                "unpickling them could run code from the file, so it was not loaded. If you trust "
                "the file, rerun with --trust-checkpoint (safer: save model.state_dict() and pass --model)"
            ) from None
        detail = _WEIGHTS_DETAIL.search(text)
        reason = detail.group(1).strip() if detail else first_line(err)
        hint = ""
        if trust and isinstance(err, (AttributeError, ImportError)):
            # A pickled model needs its class importable under the name it was saved with.
            hint = " (the pickled model's class must be importable; or save its state_dict and pass --model)"
        raise CheckpointError(f"cannot load checkpoint {path}: {reason[:200]}{hint}") from None


def _read(path: Path, trust: bool) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied)")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch(path, trust)


# -- fitting a state dict to a model ---------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: Any, source: str) -> Mapping[str, Tensor]:
    """The state dict itself, or the one nested under a conventional key."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise CheckpointError(
            f"{source} holds a dict ({keys}) with no state dict of tensors at the top level or "
            f"under {', '.join(STATE_DICT_KEYS)}"
        )
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")


def _candidates(state: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """The keys as saved, then with ``module.``/``model.`` prefixes stripped (up to two deep).

    Stripping keeps only the keys that carry the prefix: a Lightning module's state holds
    ``model.*`` for the network beside e.g. a loss module's buffers.
    """
    out = [dict(state)]
    frontier = [dict(state)]
    for _ in range(2):
        nxt = []
        for cand in frontier:
            for prefix in STRIPPABLE_PREFIXES:
                stripped = {k[len(prefix):]: v for k, v in cand.items() if k.startswith(prefix)}
                if stripped:
                    nxt.append(stripped)
        out += nxt
        frontier = nxt
    return out


def _match_keys(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The candidate whose keys are exactly the model's; else, for the error message, the one
    sharing the most keys with the model (the keys as saved on ties: max keeps the first)."""
    candidates = _candidates(state)
    for cand in candidates:
        if cand.keys() == expected.keys():
            return cand
    return max(candidates, key=lambda c: len(c.keys() & expected.keys()))


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")


def load_state(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Load ``state`` into ``model`` strictly, naming every key, shape or value problem."""
    expected = model.state_dict()
    state = _match_keys(expected, state)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_names(unexpected)}")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
        if value.is_complex() != expected[key].is_complex() or (
            value.is_floating_point() != expected[key].is_floating_point()
        ):
            raise CheckpointError(
                f"{source}: dtype mismatch for {key}: checkpoint {value.dtype}, model {expected[key].dtype}"
            )
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: non-finite values in {key}")
    try:
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - e.g. a module's own _load_from_state_dict
        raise CheckpointError(f"{source}: loading the state dict failed: {first_line(err)}") from None


def check_finite_parameters(model: nn.Module, source: str) -> None:
    """Refuse NaN/Inf in any parameter or floating buffer, naming the first one."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: non-finite values in {name}")


# -- entry points ----------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from any checkpoint kind of docs/index.md, "Checkpoints and data".

    Args:
        path: the checkpoint file (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``).
        model: ``package.module:Attr`` or ``path/to/file.py:Attr`` building the network
            (needed for everything but native checkpoints and trusted pickled modules).
        model_kwargs: keyword arguments for ``model``.
        trust: allow unpickling arbitrary objects (a whole pickled ``nn.Module``) and
            calling a native checkpoint's non-hessdiag factory. Only for files you trust.

    Returns ``(module, meta)``; ``meta`` is the native checkpoint's ``meta`` dict (empty
    otherwise).
    """
    file = Path(path)
    source = str(file)
    obj = _read(file, trust)
    if isinstance(obj, nn.Module):  # only reachable with trust=True
        if model is not None:
            raise CheckpointError(f"{source} holds a whole model already; drop --model")
        check_finite_parameters(obj, source)
        return obj, {}
    if isinstance(obj, Mapping) and _is_native(obj):
        return _load_native(obj, source, model, model_kwargs, trust)
    if model is None:
        raise CheckpointError(
            f"{source} is not a native hessdiag checkpoint; pass --model MODULE:ATTR (or FILE.py:ATTR) "
            "naming the class or factory that builds the network"
        )
    state = _find_state_dict(obj, source)
    net = build_model(model, model_kwargs)
    load_state(net, state, source)
    return net, {}


def _is_native(obj: Mapping[Any, Any]) -> bool:
    version = obj.get("hessdiag")
    return isinstance(version, int) and not isinstance(version, bool) and version == NATIVE_VERSION


def _load_native(
    obj: Mapping[str, Any], source: str, model: str | None,
    model_kwargs: Mapping[str, Any] | None, trust: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    info = obj.get("model") or {}
    factory = model or (info.get("factory") if isinstance(info, Mapping) else None)
    if not isinstance(factory, str):
        raise CheckpointError(f"{source}: native checkpoint without a model factory; pass --model")
    if model is None and not (trust or TRUSTED_FACTORY.fullmatch(factory)):
        raise CheckpointError(
            f"{source} names the factory {factory!r} outside hessdiag.models; calling it could run "
            "code: pass --model with it yourself, or --trust-checkpoint"
        )
    kwargs = model_kwargs if model_kwargs is not None else info.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{source}: the factory's kwargs are not a dict")
    state = obj.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: native checkpoint without a state_dict")
    net = build_model(factory, kwargs)
    load_state(net, state, source)
    meta = obj.get("meta")
    return net, dict(meta) if isinstance(meta, Mapping) else {}


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
