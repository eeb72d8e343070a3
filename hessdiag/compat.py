"""Second-order differentiability for real-world architectures, without touching the model.

Some PyTorch kernels have a first derivative but no second one, or no forward-mode one,
so a Hessian-vector product through them fails although the function is smooth enough
(piecewise linear at worst):

- ``Hardsigmoid``/``Hardswish`` (MobileNetV3): ``aten::hardsigmoid_backward`` and
  ``aten::hardswish_backward`` have neither a derivative nor a forward-mode formula;
- scaled dot-product attention (``nn.MultiheadAttention``, ``nn.TransformerEncoder``,
  timm ViTs, Hugging Face BERT): the fused flash/memory-efficient kernels (and the
  ``TransformerEncoderLayer`` fast path) have neither;
- ``nn.LSTM`` on CPU in float32 runs ``mkldnn_rnn_layer`` (on CUDA: cuDNN), which has no
  forward-mode formula (cuDNN: no double backward either).

:func:`twice_differentiable` is a context manager under which every forward pass is
differentiable twice, in reverse and in forward mode, and under ``torch.func.vmap``. It
is active during every forward a measurement runs (:func:`hessdiag.measure` enters it
once; :meth:`hessdiag.objective.Objective.forward`, the BackPACK copies of
:mod:`hessdiag.backpack_ext` and the PyHessian extras enter it too, so that they are
covered when called on their own). It

1. selects the MATH backend of ``F.scaled_dot_product_attention``
   (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): attention written out as
   matmul/softmax, which every transform differentiates (``vmap(jvp(grad))`` and double
   backward are tested on ``nn.TransformerEncoder``, timm's ViT and BERT);
2. turns off the fused fast path of ``nn.MultiheadAttention``/``TransformerEncoderLayer``
   (``torch.backends.mha.set_fastpath_enabled(False)``), which would otherwise run in
   ``torch.no_grad()`` forwards and give those slightly different numbers;
3. pushes :class:`DifferentiableFunctions`, a ``torch.overrides.TorchFunctionMode`` that
   replaces ``F.hardsigmoid``/``F.hardswish`` (hence ``nn.Hardsigmoid``/``nn.Hardswish``,
   which call them) and ``torch._C._nn.hardsigmoid[_]``/``hardswish[_]`` by the same
   formulas written with differentiable primitives (:func:`hardsigmoid`,
   :func:`hardswish`; bit-identical values, see there), and runs ``torch.lstm``/``gru``/
   ``rnn_tanh``/``rnn_relu`` with oneDNN and cuDNN off, so that PyTorch's own
   differentiable RNN implementation runs (for those calls only: convolutions keep
   oneDNN).

Nothing is changed on the model: a function mode sees module and functional calls alike
at call time. Global flags (SDPA backends, MHA fast path, oneDNN/cuDNN during an RNN
call) are set by the first thread that enters and restored by the last one that leaves,
also when an exception propagates. The context is re-entrant and cheap to nest.

Not covered: code that calls ``torch.ops.aten`` kernels directly (function modes do not
see those), and custom C++/CUDA extensions. For whatever still lacks forward-mode AD or a
batching rule, :func:`func_unsupported_reason` recognizes torch's refusal, and
:class:`~hessdiag.objective.Objective` falls back to double backward (``hvp_route``).
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "DifferentiableFunctions",
    "FUNC_UNSUPPORTED_MESSAGES",
    "double_backward_unsupported_reason",
    "func_unsupported_reason",
    "hardsigmoid",
    "hardswish",
    "twice_differentiable",
]

# -- closed forms with bit-identical values --------------------------------------------

_ONE_SIXTH_F32 = float(torch.tensor(1.0, dtype=torch.float32) / 6)
"""The CUDA kernels multiply by ``1.0f / 6.0f`` (a float constant, also in float64)."""


def _in_opmath(formula: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """float16/bfloat16: the native kernels compute in float32 and round once."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return formula(x.float()).to(x.dtype)
    return formula(x)


def _sixth(t: Tensor) -> Tensor:
    # The CPU kernels divide by 6; the CUDA kernels multiply by (1.0f / 6.0f).
    return t * _ONE_SIXTH_F32 if t.device.type == "cuda" else t / 6


def hardsigmoid(x: Tensor) -> Tensor:
    """``relu6(x + 3) / 6``, twice differentiable in every AD mode.

    Same operations in the same order as PyTorch's kernel (``min(max(x + 3, 0), 6) / 6``
    on CPU, ``· (1.0f/6.0f)`` on CUDA; float16/bfloat16 computed in float32), hence
    bit-identical values (tested on CPU in float32, float64, bfloat16 and float16; NaN
    payloads aside). ``hardtanh`` (a clamp whose gradient is 0 at the kinks) gives the
    native derivative's zero set, x = ±3 included.
    """
    return _in_opmath(lambda t: _sixth(F.hardtanh(t + 3, 0.0, 6.0)), x)


def hardswish(x: Tensor) -> Tensor:
    """``x · clamp(x + 3, 0, 6) / 6``, twice differentiable in every AD mode.

    Bit-identical to PyTorch's kernel (``x * min(max(x + 3, 0), 6) / 6`` on CPU, the same
    times ``1.0f/6.0f`` on CUDA; tested on CPU in float32, float64, bfloat16 and float16),
    with the native first derivative at the kinks x = ±3 too. Second derivative: 1/3 on
    (−3, 3), 0 outside.
    """
    return _in_opmath(lambda t: _sixth(t * torch.clamp(t + 3, 0.0, 6.0)), x)


def _replacement(formula: Callable[[Tensor], Tensor], *, inplace: bool = False
                 ) -> Callable[..., Tensor]:
    """The functional signature ``f(input, inplace=False)`` (or an in-place kernel's)."""

    def replacement(input: Tensor, inplace: bool = inplace) -> Tensor:
        if not inplace:
            return formula(input)
        # Write the values back as the in-place kernel would. The formula runs on a copy:
        # autograd keeps what it saved (hardswish saves its input) unmodified.
        return input.copy_(formula(input.clone()))

    return replacement


_REPLACEMENTS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.hardsigmoid: _replacement(hardsigmoid),
    F.hardswish: _replacement(hardswish),
    torch._C._nn.hardsigmoid: _replacement(hardsigmoid),
    torch._C._nn.hardswish: _replacement(hardswish),
    torch._C._nn.hardsigmoid_: _replacement(hardsigmoid, inplace=True),
    torch._C._nn.hardswish_: _replacement(hardswish, inplace=True),
}

_RNNS = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})
"""Full-sequence RNN kernels: oneDNN (CPU) and cuDNN (CUDA) versions lack forward-mode AD
(cuDNN also double backward); with both off PyTorch runs its differentiable cells."""


# -- global flags, reference-counted across threads ------------------------------------

class _SharedFlags:
    """Set some global flags while at least one holder is inside; restore after the last.

    Reference counting (not save/restore per entry) keeps the flags right when two
    threads enter and leave in interleaved order.
    """

    def __init__(self, enter: Callable[[], Callable[[], None]]) -> None:
        self._enter = enter  # applies the flags, returns the function that restores them
        self._restore: Callable[[], None] | None = None
        self._holders = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._restore = self._enter()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._restore is not None:
                    restore, self._restore = self._restore, None
                    restore()


def _attention_flags() -> Callable[[], None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    kernel = sdpa_kernel(SDPBackend.MATH)
    kernel.__enter__()
    torch.backends.mha.set_fastpath_enabled(False)

    def restore() -> None:
        try:
            kernel.__exit__(None, None, None)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    return restore


def _rnn_flags() -> Callable[[], None]:
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp to the stubs
    torch.backends.cudnn.enabled = False

    def restore() -> None:
        torch.backends.mkldnn.enabled = mkldnn
        torch.backends.cudnn.enabled = cudnn

    return restore


_ATTENTION = _SharedFlags(_attention_flags)
_RNN = _SharedFlags(_rnn_flags)


class DifferentiableFunctions(TorchFunctionMode):
    """Function mode: Hardsigmoid/Hardswish by :func:`hardsigmoid`/:func:`hardswish`,
    RNN kernels with oneDNN/cuDNN off; every other call passes through unchanged."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        replacement = _REPLACEMENTS.get(func)
        if replacement is not None and "out" not in kwargs:
            return replacement(*args, **kwargs)
        if func in _RNNS:
            with _RNN.held():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


_active = threading.local()


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run the enclosed forward passes on twice-differentiable kernels (module docstring).

    Re-entrant: an inner use in the same thread does nothing. Leaves every global flag as
    it found it, also after an exception.
    """
    if getattr(_active, "depth", 0):
        _active.depth += 1
        try:
            yield
        finally:
            _active.depth -= 1
        return
    _active.depth = 1
    try:
        with _ATTENTION.held(), DifferentiableFunctions():
            yield
    finally:
        _active.depth = 0


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence torch's own "`torch.jit.script` is deprecated" ``FutureWarning`` in the block.

    torch emits it from its internals, not from anything the caller wrote: the first
    forward-mode product (``torch.func.jvp``) imports ``torch._decomp.decompositions_for_jvp``,
    which scripts its decompositions. The filter lives in ``warnings.catch_warnings()``, so
    the caller's warning filters are exactly as before when the block exits.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
        yield


# -- recognizing what torch.func cannot do ---------------------------------------------

FUNC_UNSUPPORTED_MESSAGES: tuple[str, ...] = (
    # an operator without a forward-mode derivative, e.g. "Trying to use forward AD with
    # mkldnn_rnn_layer that does not support it because it has not been implemented yet."
    "Trying to use forward AD with",
    # a custom autograd.Function without jvp / setup_context / vmap rule
    "You must implement the jvp function",
    "must override the setup_context staticmethod",
    "but it does not have vmap support",
    # an operator without a batching rule that vmap cannot loop over either
    "Batching rule not implemented for",
    # vmap's own refusals: .item(), data-dependent control flow, dynamic shapes, random ops
    "vmap: ",
    # an in-place write into a captured tensor (e.g. a buffer updated in forward)
    "During a grad (vjp, jvp, grad, etc) transform",
    # a functorch wrapper handed to code that reads raw memory (numpy, C++ extensions)
    "Cannot access data pointer of Tensor that doesn't have storage",
)
"""Substrings of the errors with which torch.func refuses a model that plain autograd can
still differentiate twice (collected from torch 2.x on the architectures of
``tests/test_zoo.py`` run without :func:`twice_differentiable`, and from custom
``autograd.Function``s, buffer updates and ``.numpy()`` calls in forward)."""

_DOUBLE_BACKWARD_UNSUPPORTED = re.compile(
    r"derivative for .+ is not implemented|marked with @once_differentiable"
)


def func_unsupported_reason(err: BaseException) -> str | None:
    """The first line of ``err`` if it is torch.func refusing the model, else ``None``.

    Only ``RuntimeError``/``NotImplementedError`` whose message contains one of
    :data:`FUNC_UNSUPPORTED_MESSAGES`; never ``torch.OutOfMemoryError`` or anything else,
    which must propagate.
    """
    if isinstance(err, torch.OutOfMemoryError):
        return None
    if not isinstance(err, (RuntimeError, NotImplementedError)):
        return None
    text = str(err)
    if any(marker in text for marker in FUNC_UNSUPPORTED_MESSAGES):
        return text.strip().splitlines()[0]
    return None


def double_backward_unsupported_reason(err: BaseException) -> str | None:
    """The first line of ``err`` if autograd has no second derivative of some operator
    (``derivative for aten::X is not implemented``, ``@once_differentiable``), else ``None``."""
    if isinstance(err, torch.OutOfMemoryError) or not isinstance(
            err, (RuntimeError, NotImplementedError)):
        return None
    text = str(err)
    return text.strip().splitlines()[0] if _DOUBLE_BACKWARD_UNSUPPORTED.search(text) else None
