r"""What a network is made of, seen from one recorded forward pass, and what that allows.

Two facts decide which estimator can measure a network exactly or cheaply
(docs/math.md, "Structure"):

- **Piecewise-linear networks.** If θ enters only through affine operations (Linear,
  Conv, BatchNorm in eval mode), each parameter is used once, and every other operation
  is linear (sums, pooling by averaging, reshapes, concatenation, scaling by constants) or
  piecewise linear (ReLU, LeakyReLU, ReLU6, Hardtanh, Hardsigmoid, max pooling, clamp),
  then every output is affine in any single parameter almost everywhere, ∂²f/∂θᵢ² = 0,
  and diag H = diag GGN exactly.
- **Elementwise networks.** If, beyond that, the only other nonlinearities are smooth
  elementwise activations with closed-form φ'' (SiLU, GELU, tanh, sigmoid, Softplus,
  Mish, ELU, SELU, Hardswish, RCT-AF), then per example

      diag Hₙ = diag(Jₙᵀ Λₙ Jₙ) + Σᵤ cₙ,ᵤ (∂zᵤ/∂θ)²,   cₙ,ᵤ = (∂ℓₙ/∂aᵤ) φ''(zᵤ),

  summed over the activation units u (pre-activation zᵤ, output aᵤ = φ(zᵤ)); the
  ``curvprop`` estimator works on that form.

Anything else (softmax attention, LayerNorm, products of two θ-dependent tensors,
recurrent gates, a parameter used twice, an operation not listed here) makes the network
"general": it is measured by Hessian-vector products. The catalogue is deliberately
conservative: an operation is trusted only if it is listed, so an unknown one never leads
to a wrong "exact" answer, only to a slower estimator.

The recording runs the model once, functionally, on a few examples, with θ as leaves that
require gradients: an operation matters only if its output depends on θ. Functional calls
(``F.silu`` in a ``forward``) are seen as well as modules, since the recorder is a
:class:`torch.overrides.TorchFunctionMode`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .activations import RCTAF, ElementwiseDerivatives, activation_derivatives, rct_af

StructureKind = Literal["piecewise-linear", "elementwise", "general"]

# -- the catalogue ---------------------------------------------------------------------------

T = torch.Tensor

LINEAR_OPS: frozenset[Any] = frozenset({
    # sums and differences (of any number of θ-dependent operands)
    T.__add__, T.__radd__, T.__iadd__, T.add, T.add_, torch.add,
    T.__sub__, T.__rsub__, T.__isub__, T.sub, T.sub_, torch.sub,
    T.__neg__, T.neg, torch.neg, T.__pos__,
    # shape and copies
    T.view, T.view_as, T.reshape, T.reshape_as, torch.reshape, T.flatten, torch.flatten,
    T.permute, torch.permute, T.transpose, torch.transpose, T.t, T.contiguous,
    T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze, T.expand, T.expand_as,
    T.__getitem__, T.split, torch.split, T.chunk, torch.chunk, T.narrow, T.unbind,
    torch.cat, torch.concat, torch.stack, T.clone, T.to, T.float, T.double, T.type_as,
    T.repeat, T.flip, torch.flip, T.roll, torch.roll,
    # averaging and summing
    T.mean, torch.mean, T.sum, torch.sum,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.pad, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout,
})
"""Operations linear in their θ-dependent inputs (dropout: only in eval mode, checked)."""

SCALING_OPS: frozenset[Any] = frozenset({
    T.__mul__, T.__rmul__, T.__imul__, T.mul, T.mul_, torch.mul,
    T.__truediv__, T.__itruediv__, T.div, T.div_, torch.div,
    T.__matmul__, T.matmul, torch.matmul, torch.einsum,
})
"""Linear when at most one operand depends on θ (and, for division, not the divisor)."""

PIECEWISE_LINEAR_OPS: frozenset[Any] = frozenset({
    F.relu, torch.relu, T.relu, F.leaky_relu, F.relu6, F.hardtanh, F.hardsigmoid,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, torch.clamp, T.clamp, torch.clip, T.clip, torch.abs, T.abs,
})

PARAM_OPS: frozenset[Any] = frozenset({F.linear, F.conv1d, F.conv2d, F.batch_norm})
"""Operations through which θ may enter (affine in each of their parameters); the
per-example rules of :mod:`hessdiag.curvature_tape` exist for exactly these."""


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _module_derivatives(func: Any, args: tuple, kwargs: dict) -> ElementwiseDerivatives | None:
    """Closed-form derivatives of a smooth elementwise activation call, else ``None``."""
    if func is F.silu:
        module: nn.Module = nn.SiLU()
    elif func is F.gelu:
        module = nn.GELU(approximate=_arg(args, kwargs, 1, "approximate", "none"))
    elif func in (torch.tanh, T.tanh, F.tanh):
        module = nn.Tanh()
    elif func in (torch.sigmoid, T.sigmoid, F.sigmoid):
        module = nn.Sigmoid()
    elif func is F.softplus:
        module = nn.Softplus(beta=_arg(args, kwargs, 1, "beta", 1.0),
                             threshold=_arg(args, kwargs, 2, "threshold", 20.0))
    elif func is F.mish:
        module = nn.Mish()
    elif func is F.elu:
        module = nn.ELU(alpha=_arg(args, kwargs, 1, "alpha", 1.0))
    elif func is F.selu:
        module = nn.SELU()
    elif func is rct_af:
        module = RCTAF(n=_arg(args, kwargs, 1, "n", 1), alpha=_arg(args, kwargs, 2, "alpha", 1.0))
    elif func is F.hardswish:
        return HARDSWISH
    else:
        return None
    return activation_derivatives(module)


def _hardswish(x: Tensor) -> Tensor:
    return x * (x + 3.0).clamp(0.0, 6.0) / 6.0


HARDSWISH = ElementwiseDerivatives(
    phi=_hardswish,
    dphi=lambda x: torch.where(x < -3.0, torch.zeros_like(x),
                               torch.where(x > 3.0, torch.ones_like(x), (2.0 * x + 3.0) / 6.0)),
    d2phi=lambda x: torch.where((x > -3.0) & (x < 3.0), torch.full_like(x, 1.0 / 3.0),
                                torch.zeros_like(x)),
    psi_max=float("inf"),  # the slope jumps upwards at -3
)
"""Hardswish x·relu6(x+3)/6: piecewise quadratic, φ'' = 1/3 on (−3, 3)."""


def elementwise_activation(func: Any, args: tuple, kwargs: dict) -> ElementwiseDerivatives | None:
    """The derivatives of ``func(*args, **kwargs)`` if it is a smooth elementwise activation.

    ``None`` for every other call, piecewise-linear activations included.
    """
    if not args or not isinstance(args[0], Tensor):
        return None
    return _module_derivatives(func, args, kwargs)


def activation_name(func: Any) -> str:
    """A readable name of a torch function (``"silu"``, ``"Tensor.tanh"``)."""
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    if owner is not None and issubclass(owner, torch._C.TensorBase):
        return f"Tensor.{name}"
    return name


# -- recording -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkStructure:
    """What one recorded forward pass found.

    Attributes:
        kind: ``"piecewise-linear"`` (diag H = diag GGN exactly), ``"elementwise"``
            (smooth elementwise activations only: ``curvprop`` applies) or ``"general"``.
        reason: why the network is of this kind, in words (the first operation that made it
            general, or the nonlinearities that were found).
        activations: counts of smooth activation calls by function name.
        piecewise_linear: counts of piecewise-linear calls by function name.
    """

    kind: StructureKind
    reason: str
    activations: dict[str, int] = field(default_factory=dict)
    piecewise_linear: dict[str, int] = field(default_factory=dict)


def _depends(value: Any) -> bool:
    return isinstance(value, Tensor) and value.requires_grad


class _Recorder(TorchFunctionMode):
    """Classifies every θ-dependent operation of one forward pass (module docstring)."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.uses: Counter[str] = Counter()
        self.activations: Counter[str] = Counter()
        self.piecewise: Counter[str] = Counter()
        self.general: str | None = None

    def _mark_general(self, why: str) -> None:
        if self.general is None:
            self.general = why

    def __torch_function__(self, func: Callable, types: Iterable, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Tensor)]
        used = [self.params[id(v)] for v in leaves if id(v) in self.params]
        outputs = [v for v in tree_flatten(out)[0] if isinstance(v, Tensor)]
        if not any(v.requires_grad for v in outputs):
            return out  # θ-independent (shapes, masks, constants): irrelevant
        name = activation_name(func)
        for param in used:
            self.uses[param] += 1
            if self.uses[param] == 2:
                self._mark_general(f"parameter {param} is used twice")
        if used and func not in PARAM_OPS:
            self._mark_general(f"parameter {used[0]} enters through {name}")
        if func in PARAM_OPS:
            if func is F.batch_norm and _arg(args, kwargs, 5, "training", False):
                self._mark_general("BatchNorm uses batch statistics (no running statistics)")
            elif any(_depends(v) for v in leaves if id(v) not in self.params and v is not args[0]):
                self._mark_general(f"{name} has a θ-dependent operand besides its input")
        elif func in LINEAR_OPS:
            if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                        F.feature_alpha_dropout) and _arg(args, kwargs, 2, "training", True):
                self._mark_general("dropout is active")
        elif func in SCALING_OPS:
            dependent = [v for v in leaves if v.requires_grad]
            divisor = _arg(args, kwargs, 1, "other", None)
            if func in (T.__truediv__, T.__itruediv__, T.div, T.div_, torch.div) and _depends(divisor):
                self._mark_general(f"{name} divides by a θ-dependent tensor")
            elif len(dependent) > 1:
                self._mark_general(f"{name} multiplies two θ-dependent tensors")
        elif func in PIECEWISE_LINEAR_OPS:
            self.piecewise[name] += 1
        elif elementwise_activation(func, args, kwargs) is not None:
            self.activations[name] += 1
        else:
            self._mark_general(f"{name} is not an operation hessdiag knows to be "
                               "linear or elementwise")
        return out


def network_structure(forward: Callable[[dict[str, Tensor], Tensor], Tensor],
                      params: dict[str, Tensor], x: Tensor) -> NetworkStructure:
    """Classify the network ``forward(params, x)`` (module docstring) from one pass on ``x``.

    ``params``: θ as ``{name: Tensor}``; they are passed in as fresh leaves requiring
    gradients, so the caller's tensors are not touched. ``x``: a few examples suffice.
    """
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    recorder = _Recorder({id(t): n for n, t in leaves.items()})
    with torch.enable_grad(), recorder:
        out = forward(leaves, x)
    if not (isinstance(out, Tensor) and out.requires_grad):
        return NetworkStructure("general", "the output is not a tensor that depends on θ")
    unused = [n for n in leaves if recorder.uses[n] == 0]
    if recorder.general is None and unused:
        recorder._mark_general(f"parameter {unused[0]} is not used by a recognised operation")
    acts, pl = dict(recorder.activations), dict(recorder.piecewise)
    if recorder.general is not None:
        return NetworkStructure("general", recorder.general, acts, pl)
    if acts:
        found = ", ".join(sorted(acts))
        return NetworkStructure("elementwise", f"smooth elementwise activations only ({found})",
                                acts, pl)
    found = ", ".join(sorted(pl)) or "none"
    return NetworkStructure("piecewise-linear",
                            f"affine in each parameter; piecewise-linear nonlinearities: {found}",
                            acts, pl)


__all__ = ["NetworkStructure", "StructureKind", "elementwise_activation", "network_structure"]
