r"""Activations and their derivatives: RCT-AF, the baseline registry and ψ_max.

RCT-AF (docs/index.md, "Activations"). With :math:`u = \alpha x`, :math:`s = \sigma(u)`,
:math:`q = s(1-s) = \sigma(u)\sigma(-u)`, :math:`t = 1 - 2s = -\tanh(u/2)`:

====  ===========================  ======================  ==================================
 n    f_n(x)                       f_n'(x)                 f_n''(x)
====  ===========================  ======================  ==================================
 0    log(1 + e^u) / α             s                       α q
 1    x s                          s + u q                 α q (2 + u t)
 2    x (s + u q)                  s + q (3u + u² t)       α q (4 + 5 u t + u² (1 - 6q))
====  ===========================  ======================  ==================================

f_0 is a softplus with slope parameter α, and f_{n+1} = x f_n' (the Euler operator x d/dx).
Because x d/dx = u d/du, every member has the scale structure

    f_n(x) = g_n(αx)/α,   f_n^{(k)}(x) = α^{k-1} g_n^{(k)}(αx),   in particular f_n'' = α g_n''(αx),

with g_n = (u d/du)^n softplus. Hence ψ_max = sup f_n'' = c_n α exactly, c_n = 1/4, 1/2, 1,
attained at x = 0, and ∫ f_n'' dx = 1 for every n and α. The k-th derivatives (k ≥ 1) are

    g_0^{(k)} = σ^{(k-1)},   g_1^{(k)} = k σ^{(k-1)} + u σ^{(k)},
    g_2^{(k)} = k² σ^{(k-1)} + (2k+1) u σ^{(k)} + u² σ^{(k+1)},

and σ^{(m)} = q t^{(m-1) mod 2} P_m(q) with P_1 = 1, P_2 = 1, P_3 = 1 - 6q, P_4 = 1 - 12q, ...
(from dq/du = q t and dt/du = -2q, t² = 1 - 4q). The autograd Function below uses these, so
RCT-AF is differentiable to any order, in reverse and forward mode, without cancellation.

ψ_max = sup_x φ''(x) of the baselines (docs/index.md, "Activations"): softplus 1/4, SiLU 1/2, GELU √(2/π) ≈ 0.7979
(erf and tanh forms), Mish 0.6442, ELU(α=1) 1 (a left limit at 0), SELU λα ≈ 1.758 (sup on x ≠ 0;
its slope jumps *down* at 0, so max |φ''| is ∞), tanh 4/(3√3) ≈ 0.7698, sigmoid 1/(6√3) ≈ 0.09623,
ReLU and LeakyReLU ∞ (the slope jumps *up*, a positive Dirac mass in φ'').
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_unary
from torch import Tensor, nn

from hessdiag.errors import HessdiagError

__all__ = [
    "ACTIVATION_NAMES",
    "CurvatureProfile",
    "ElementwiseDerivatives",
    "RCTAF",
    "UnsupportedActivationError",
    "activation_derivatives",
    "curvature_profile",
    "get_activation",
    "psi_max",
    "rct_af",
    "rct_af_derivative",
]

#: c_n = max_u g_n''(u): ψ_max of RCT-AF divided by α (docs/index.md, "Activations").
RCT_PSI_COEF: dict[int, float] = {0: 0.25, 1: 0.5, 2: 1.0}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_KAPPA = 0.044715  # torch's constant for approximate='tanh'
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
# sup of Mish'' at x = -0.0879344313..., found with mpmath findroot on Mish''' at 40 digits.
_MISH_PSI_MAX = 0.6442046372369724


class UnsupportedActivationError(HessdiagError):
    """The activation has no registered closed-form derivatives."""


# --------------------------------------------------------------------------------------------
# RCT-AF closed forms
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _exp_underflow_bound(dtype: torch.dtype) -> float:
    # Beyond this |u|, sigmoid(-|u|) and hence q round to exactly 0 in `dtype`, so clamping the
    # polynomial factors (u, u², ...) there never changes a result; it only keeps u² finite so
    # that 0·∞ cannot produce NaN. 746 for float64, 105 for float32, 19 for float16.
    finfo = torch.finfo(dtype)
    return -math.log(finfo.tiny * finfo.eps) + 2.0


@lru_cache(maxsize=None)
def _sigmoid_poly(m: int) -> tuple[int, tuple[int, ...]]:
    """σ^{(m)} = q · t^parity · P_m(q) for m ≥ 1; returns (parity, ascending coefficients of P_m)."""
    if m == 1:
        return 0, (1,)
    parity, c = _sigmoid_poly(m - 1)
    r = [(j + 1) * cj for j, cj in enumerate(c)]  # coefficients of P + q P'
    if parity == 0:
        return 1, tuple(r)
    # d/du [q t P] = q [(1 - 4q)(P + q P') - 2q P], using t² = 1 - 4q.
    out = r + [0]
    for j in range(1, len(out)):
        out[j] += -4 * r[j - 1] - 2 * c[j - 1]
    return 0, tuple(out)


def _sigmoid_derivative(m: int, s: Tensor, q: Tensor, t: Tensor) -> Tensor:
    if m == 0:
        return s
    if m == 1:
        return q
    parity, coeffs = _sigmoid_poly(m)
    poly = torch.full_like(q, float(coeffs[-1]))
    for c in reversed(coeffs[:-1]):
        poly = poly * q + c
    out = q * poly
    return out * t if parity else out


def _rct_closed_form(x: Tensor, n: int, alpha: float, order: int) -> Tensor:
    """f_n^{(order)}(x) from the stable closed forms (no autograd involved)."""
    if order == 0:
        return _rct_value(x, n, alpha)
    if order == 1:
        return _rct_first(x, n, alpha)
    u = alpha * x
    s = torch.sigmoid(u)
    q = s * torch.sigmoid(-u)  # s(1 - s) without cancellation
    uc = _clamped(u)
    t = -torch.tanh(0.5 * uc)  # 1 - 2s without cancellation

    def sig(m: int) -> Tensor:
        return _sigmoid_derivative(m, s, q, t)

    k = order
    if n == 0:
        g = sig(k - 1)
    elif n == 1:
        g = k * sig(k - 1) + uc * sig(k)
    else:
        g = k * k * sig(k - 1) + (2 * k + 1) * uc * sig(k) + uc * uc * sig(k + 1)
    return g * alpha ** (k - 1)


# Orders 0 and 1 run in every training step, on every activation of a network, so they are
# written as few passes over fresh buffers as the stable forms allow (on CPU a new large
# buffer costs page faults; in-place updates of the few intermediates avoid most of them).
# Same formulas as the general k above, with t = 1 - 2s formed directly: it cancels only
# near u = 0, where it multiplies u², so the absolute error stays at eps.


@lru_cache(maxsize=None)
def _softplus_threshold(dtype: torch.dtype) -> float:
    # F.softplus returns x itself once βx exceeds the threshold. Beyond u = 1 - log(eps) the
    # dropped term log1p(e^{-u})/α < e^{-u}/α is below half an ulp of x = u/α, so the switch
    # is exact in `dtype` (torch's default threshold 20 is not, in float64).
    return -math.log(torch.finfo(dtype).eps) + 1.0


def _rct_value(x: Tensor, n: int, alpha: float) -> Tensor:
    """f_n(x)."""
    if n == 0:
        # softplus(αx)/α, torch's fused kernel (log1p(exp(βx))/β below the threshold).
        return F.softplus(x, beta=alpha, threshold=_softplus_threshold(x.dtype))
    if n == 1:  # x σ(αx): no clamp needed, σ(±inf) is exact and x is finite
        return torch.sigmoid(torch.mul(x, alpha)).mul_(x)
    u = _clamped_(torch.mul(x, alpha))
    s = torch.sigmoid(u)
    q = torch.neg(u).sigmoid_().mul_(s)  # s(1 - s) = s σ(-u)
    return q.mul_(u).add_(s).mul_(x)  # x (s + u q)


def _rct_first(x: Tensor, n: int, alpha: float) -> Tensor:
    """f_n'(x) = g_n'(αx): s, s + u q, s + q u (3 + u t) for n = 0, 1, 2."""
    u = _clamped_(torch.mul(x, alpha))
    s = torch.sigmoid(u)
    if n == 0:
        return s
    q = torch.neg(u).sigmoid_().mul_(s)
    if n == 1:
        return q.mul_(u).add_(s)
    ut = torch.mul(u, s).mul_(-2.0).add_(u)  # u t = u (1 - 2s)
    return ut.add_(3.0).mul_(u).mul_(q).add_(s)


def _rct_first_vjp(grad_out: Tensor, x: Tensor, n: int, alpha: float) -> Tensor:
    """grad_out · f_n'(x) for a backward pass that builds no graph (the training step).

    For n = 0 and 1 torch's fused kernels compute exactly this product: softplus_backward
    (grad · σ(αx)) and silu_backward (grad · σ(u)(1 + u(1 - σ(u))) = grad · f_1'(x)). The
    latter forms 1 - σ(u) directly, which loses relative accuracy in the term u(1 - σ(u))
    once σ(u) rounds to 1; the product's relative error stays below u·eps ≤ 40 ulp there,
    immaterial for a gradient step. Every node of a graph that is differentiated again
    (create_graph, torch.func, forward mode) uses the cancellation-free closed forms.
    """
    if n == 0:
        return torch.ops.aten.softplus_backward(grad_out, x, alpha, _softplus_threshold(x.dtype))
    if n == 1:
        # u clamped: an overflowing αx (float16) must give f' ∈ {0, 1}, not inf·0 = NaN. The
        # kernel computes half types in float32, so the float32 bound keeps it exact there.
        bound = _exp_underflow_bound(torch.promote_types(x.dtype, torch.float32))
        return torch.ops.aten.silu_backward(grad_out, torch.mul(x, alpha).clamp_(-bound, bound))
    # Out of place: under torch.func the cotangent may be batched where x is not.
    return grad_out * _rct_first(x, n, alpha)


class _RCTAFNodeMixin:
    """Backward and jvp shared by the two Function classes below.

    The node x ↦ f_n^{(order)}(x); its backward and jvp are the node at order + 1, so double
    and triple backward, forward-over-reverse HVPs and vmap all reuse the closed forms, and
    no node ever falls back to autograd of the naive formula (which cancels in s(1 - s)).
    A backward that builds no graph (grad mode off inside backward, i.e. no create_graph)
    needs no node and takes the fused kernels of :func:`_rct_first_vjp`.
    """

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        if ctx.order == 0 and not torch.is_grad_enabled():
            return _rct_first_vjp(grad_out, x, ctx.n, ctx.alpha), None, None, None
        return grad_out * _rct_node(x, ctx.n, ctx.alpha, ctx.order + 1), None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, *_: Any) -> Tensor:
        (x,) = ctx.saved_tensors
        return _rct_node(x, ctx.n, ctx.alpha, ctx.order + 1) * x_t


class _RCTAFDerivative(_RCTAFNodeMixin, torch.autograd.Function):
    """The node for torch.func transforms (vmap, grad, jvp): setup_context style."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, n: int, alpha: float, order: int) -> Tensor:  # type: ignore[override]
        return _rct_closed_form(x, n, alpha, order)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, n, alpha, order = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.n, ctx.alpha, ctx.order = n, alpha, order


class _RCTAFDerivativeEager(_RCTAFNodeMixin, torch.autograd.Function):
    """The same node for plain autograd: ctx in forward.

    ``Function.apply`` binds the arguments of a setup_context-style forward through
    ``inspect.signature`` on every call (~50–100 µs), several times the cost of a small
    activation; outside torch.func transforms this classic form does the same work without it.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int, alpha: float, order: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.n, ctx.alpha, ctx.order = n, alpha, order
        return _rct_closed_form(x, n, alpha, order)


_functorch_active: Callable[[], bool] = getattr(
    torch._C, "_are_functorch_transforms_active", lambda: True
)


def _rct_node(x: Tensor, n: int, alpha: float, order: int) -> Tensor:
    """f_n^{(order)}(x) as an autograd node (the eager class unless a torch.func transform runs)."""
    if _functorch_active():
        return _RCTAFDerivative.apply(x, n, alpha, order)
    return _RCTAFDerivativeEager.apply(x, n, alpha, order)


def _check_rct_params(n: Any, alpha: Any) -> tuple[int, float]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in RCT_PSI_COEF:
        raise HessdiagError(f"RCT-AF order n must be 0, 1 or 2, got {n!r}")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise HessdiagError(f"RCT-AF alpha must be a finite number > 0, got {alpha!r}") from None
    if not (math.isfinite(a) and a > 0):
        raise HessdiagError(f"RCT-AF alpha must be a finite number > 0, got {alpha!r}")
    return int(n), a


def rct_af(x: Tensor, n: int = 1, alpha: float = 1.0) -> Tensor:
    """RCT-AF f_n(x) with slope parameter alpha; differentiable to any order (also by torch.func).

    What :class:`RCTAF` calls. It honours ``__torch_function__`` like torch's functional
    activations, so a :class:`torch.overrides.TorchFunctionMode` sees every RCT-AF call with
    its ``n`` and ``alpha`` (:mod:`hessdiag.structure` finds a network's activations that way).
    """
    if has_torch_function_unary(x):
        return handle_torch_function(rct_af, (x,), x, n=n, alpha=alpha)
    n, alpha = _check_rct_params(n, alpha)
    return _rct_node(x, n, alpha, 0)


def rct_af_derivative(x: Tensor, n: int, alpha: float, order: int) -> Tensor:
    """The closed-form derivative f_n^{(order)}(x) (order 0 is f_n itself), itself differentiable.

    f_n^{(k)}(x) = α^{k-1} g_n^{(k)}(αx); e.g. order=2 gives the curvature α g_n''(αx) whose
    maximum is ψ_max = c_n α at x = 0.
    """
    n, alpha = _check_rct_params(n, alpha)
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise HessdiagError(f"derivative order must be an int >= 0, got {order!r}")
    return _rct_node(x, n, alpha, order)


class RCTAF(nn.Module):
    """RCT-AF activation f_n with slope parameter alpha (n ∈ {0, 1, 2}, alpha > 0).

    n = 0 is softplus(αx)/α, n = 1 is Swish x·σ(αx), n = 2 is x·f_1'(x). ψ_max = c_n·α exactly.
    """

    def __init__(self, n: int = 1, alpha: float = 1.0) -> None:
        super().__init__()
        self.n, self.alpha = _check_rct_params(n, alpha)

    @classmethod
    def from_psi_max(cls, psi_max: float, n: int = 1) -> "RCTAF":
        """The member of order n whose sup f'' equals psi_max (α = psi_max / c_n)."""
        n, _ = _check_rct_params(n, 1.0)
        return cls(n, float(psi_max) / RCT_PSI_COEF[n])

    @property
    def psi_max(self) -> float:
        return RCT_PSI_COEF[self.n] * self.alpha

    def forward(self, x: Tensor) -> Tensor:
        return rct_af(x, self.n, self.alpha)

    def extra_repr(self) -> str:
        return f"n={self.n}, alpha={self.alpha:g}"


# --------------------------------------------------------------------------------------------
# Uniform derivative interface (BackPACK extensions, analytic MLP recursion)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementwiseDerivatives:
    """Closed-form φ, φ', φ'' of an elementwise activation, and ψ_max = sup φ'' (may be ∞).

    The callables snapshot the module's hyper-parameters at lookup time. At kinks φ' and φ''
    follow torch's one-sided convention, so they agree with autograd of the module.
    """

    phi: Callable[[Tensor], Tensor]
    dphi: Callable[[Tensor], Tensor]
    d2phi: Callable[[Tensor], Tensor]
    psi_max: float


def _sech2(v: Tensor) -> Tensor:
    # 1 - tanh² cancels once |v| ≳ 9; 4σ(2v)σ(-2v) is the same quantity with full relative accuracy.
    return 4.0 * torch.sigmoid(2.0 * v) * torch.sigmoid(-2.0 * v)


def _clamped(x: Tensor) -> Tensor:
    # Polynomial factors multiply exponentially small ones that are exactly 0 beyond this bound.
    bound = _exp_underflow_bound(x.dtype)
    return x.clamp(-bound, bound)


def _clamped_(x: Tensor) -> Tensor:
    """:func:`_clamped` in place, for a fresh intermediate."""
    bound = _exp_underflow_bound(x.dtype)
    return x.clamp_min_(-bound).clamp_max_(bound)  # clamp_ has no vmap batching rule


def _derivs_rct(m: RCTAF) -> ElementwiseDerivatives:
    n, a = m.n, m.alpha
    return ElementwiseDerivatives(
        phi=lambda x: _rct_node(x, n, a, 0),
        dphi=lambda x: _rct_node(x, n, a, 1),
        d2phi=lambda x: _rct_node(x, n, a, 2),
        psi_max=m.psi_max,
    )


def _derivs_silu(m: nn.SiLU) -> ElementwiseDerivatives:
    return ElementwiseDerivatives(
        phi=F.silu,
        dphi=lambda x: _rct_closed_form(x, 1, 1.0, 1),
        d2phi=lambda x: _rct_closed_form(x, 1, 1.0, 2),
        psi_max=0.5,
    )


def _gelu_erf_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    xc = _clamped(x)
    cdf = 0.5 * torch.special.erfc(-x / math.sqrt(2.0))  # erfc keeps the left tail accurate
    pdf = torch.exp(-0.5 * xc * xc) / math.sqrt(2.0 * math.pi)
    return xc, cdf, pdf


def _gelu_tanh_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xc = _clamped(x)
    v = _SQRT_2_OVER_PI * (xc + _GELU_TANH_KAPPA * xc**3)
    dv = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_KAPPA * xc * xc)
    return xc, torch.tanh(v), _sech2(v), dv


def _derivs_gelu(m: nn.GELU) -> ElementwiseDerivatives:
    if m.approximate == "none":

        def dphi(x: Tensor) -> Tensor:
            xc, cdf, pdf = _gelu_erf_parts(x)
            return cdf + xc * pdf

        def d2phi(x: Tensor) -> Tensor:
            xc, _, pdf = _gelu_erf_parts(x)
            return pdf * (2.0 - xc * xc)

        return ElementwiseDerivatives(F.gelu, dphi, d2phi, _SQRT_2_OVER_PI)
    if m.approximate == "tanh":

        def dphi_t(x: Tensor) -> Tensor:
            xc, th, sech2, dv = _gelu_tanh_parts(x)
            return 0.5 * (1.0 + th) + 0.5 * xc * sech2 * dv

        def d2phi_t(x: Tensor) -> Tensor:
            xc, th, sech2, dv = _gelu_tanh_parts(x)
            d2v = 6.0 * _SQRT_2_OVER_PI * _GELU_TANH_KAPPA * xc
            return sech2 * (dv + 0.5 * xc * (d2v - 2.0 * th * dv * dv))

        return ElementwiseDerivatives(
            lambda x: F.gelu(x, approximate="tanh"), dphi_t, d2phi_t, _SQRT_2_OVER_PI
        )
    raise UnsupportedActivationError(f"GELU(approximate={m.approximate!r}) is not supported")


def _derivs_softplus(m: nn.Softplus) -> ElementwiseDerivatives:
    # torch's Softplus is the identity where βx > threshold (and its double backward is 0 where
    # βx >= threshold); we follow that switch so the derivatives are those of the module. The
    # switch hides a slope jump of 1 - σ(threshold) (2e-9 at the default 20), which we ignore in
    # ψ_max: it is a numerical artefact, not curvature.
    beta, thr = float(m.beta), float(m.threshold)

    def dphi(x: Tensor) -> Tensor:
        z = beta * x
        return torch.where(z > thr, torch.ones_like(x), torch.sigmoid(z))

    def d2phi(x: Tensor) -> Tensor:
        z = beta * x
        curv = beta * torch.sigmoid(z) * torch.sigmoid(-z)
        return torch.where(z < thr, curv, torch.zeros_like(x))

    zmax = min(thr, 0.0)  # β q(z) peaks at z = 0 unless the switch cuts the smooth part first
    sig = 1.0 / (1.0 + math.exp(-zmax))
    return ElementwiseDerivatives(
        lambda x: F.softplus(x, beta=beta, threshold=thr), dphi, d2phi, beta * sig * (1.0 - sig)
    )


def _mish_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sp = F.softplus(x)
    s = torch.sigmoid(x)
    return _clamped(x), torch.tanh(sp), _sech2(sp), s, s * torch.sigmoid(-x)


def _derivs_mish(m: nn.Mish) -> ElementwiseDerivatives:
    def dphi(x: Tensor) -> Tensor:
        xc, th, sech2, s, _ = _mish_parts(x)
        return th + xc * sech2 * s

    def d2phi(x: Tensor) -> Tensor:
        xc, th, sech2, s, q = _mish_parts(x)
        return sech2 * (2.0 * s + xc * (q - 2.0 * th * s * s))

    return ElementwiseDerivatives(F.mish, dphi, d2phi, _MISH_PSI_MAX)


def _derivs_tanh(m: nn.Tanh) -> ElementwiseDerivatives:
    return ElementwiseDerivatives(
        torch.tanh,
        _sech2,
        lambda x: -2.0 * torch.tanh(x) * _sech2(x),
        4.0 / (3.0 * math.sqrt(3.0)),
    )


def _derivs_sigmoid(m: nn.Sigmoid) -> ElementwiseDerivatives:
    return ElementwiseDerivatives(
        torch.sigmoid,
        lambda x: _rct_closed_form(x, 0, 1.0, 2),  # σ' = q
        lambda x: _rct_closed_form(x, 0, 1.0, 3),  # σ'' = q t
        1.0 / (6.0 * math.sqrt(3.0)),
    )


def _elu_like(alpha: float, scale: float, phi: Callable[[Tensor], Tensor]) -> ElementwiseDerivatives:
    # torch: the slope at exactly 0 is the left one, the curvature at exactly 0 is the right one.
    def dphi(x: Tensor) -> Tensor:
        return scale * torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x.clamp(max=0)))

    def d2phi(x: Tensor) -> Tensor:
        return scale * torch.where(x < 0, alpha * torch.exp(x.clamp(max=0)), torch.zeros_like(x))

    # The slope jumps from scale·α to scale at 0: upwards (a positive Dirac mass, ψ_max = ∞) when
    # α < 1; otherwise sup φ'' is the left limit scale·α (ELU(1): 1, continuous slope; SELU: λα).
    psi = scale * alpha if alpha >= 1.0 else math.inf
    return ElementwiseDerivatives(phi, dphi, d2phi, psi)


def _derivs_elu(m: nn.ELU) -> ElementwiseDerivatives:
    a = float(m.alpha)
    return _elu_like(a, 1.0, lambda x: F.elu(x, alpha=a))


def _derivs_selu(m: nn.SELU) -> ElementwiseDerivatives:
    return _elu_like(_SELU_ALPHA, _SELU_SCALE, F.selu)


def _piecewise_linear(slope_neg: float, phi: Callable[[Tensor], Tensor]) -> ElementwiseDerivatives:
    return ElementwiseDerivatives(
        phi,
        lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope_neg)),
        torch.zeros_like,
        math.inf if slope_neg < 1.0 else 0.0,  # upward slope jump at 0 is a positive Dirac mass
    )


def _derivs_relu(m: nn.ReLU) -> ElementwiseDerivatives:
    return _piecewise_linear(0.0, F.relu)


def _derivs_leaky_relu(m: nn.LeakyReLU) -> ElementwiseDerivatives:
    slope = float(m.negative_slope)
    return _piecewise_linear(slope, lambda x: F.leaky_relu(x, negative_slope=slope))


_DERIVATIVES: dict[type, Callable[[Any], ElementwiseDerivatives]] = {
    RCTAF: _derivs_rct,
    nn.SiLU: _derivs_silu,
    nn.GELU: _derivs_gelu,
    nn.Softplus: _derivs_softplus,
    nn.Mish: _derivs_mish,
    nn.Tanh: _derivs_tanh,
    nn.Sigmoid: _derivs_sigmoid,
    nn.ELU: _derivs_elu,
    nn.SELU: _derivs_selu,
    nn.ReLU: _derivs_relu,
    nn.LeakyReLU: _derivs_leaky_relu,
}


def activation_derivatives(module: nn.Module) -> ElementwiseDerivatives:
    """Closed-form φ, φ', φ'' and ψ_max of a supported activation module (looked up by exact type).

    Raises UnsupportedActivationError (a ValueError) for any other module, subclasses included,
    since a subclass may override forward.
    """
    factory = _DERIVATIVES.get(type(module))
    if factory is None:
        supported = ", ".join(sorted(t.__name__ for t in _DERIVATIVES))
        raise UnsupportedActivationError(
            f"no closed-form derivatives for activation {type(module).__name__}; supported: {supported}"
        )
    return factory(module)


# --------------------------------------------------------------------------------------------
# Registry of named activations
# --------------------------------------------------------------------------------------------

# name -> (factory, option names accepted after "name:")
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], frozenset[str]]] = {
    "relu": (nn.ReLU, frozenset()),
    "leaky_relu": (nn.LeakyReLU, frozenset({"negative_slope"})),
    "elu": (nn.ELU, frozenset({"alpha"})),
    "selu": (nn.SELU, frozenset()),
    "gelu": (nn.GELU, frozenset()),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), frozenset()),
    "silu": (nn.SiLU, frozenset()),
    "swish": (nn.SiLU, frozenset()),
    "mish": (nn.Mish, frozenset()),
    "softplus": (nn.Softplus, frozenset({"beta", "threshold"})),
    "tanh": (nn.Tanh, frozenset()),
    "sigmoid": (nn.Sigmoid, frozenset()),
    "rct": (RCTAF, frozenset({"n", "alpha", "psi"})),
}

#: Every name get_activation accepts (options follow a colon, e.g. "rct:n=1,alpha=14").
ACTIVATION_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _parse_options(name: str, text: str, allowed: frozenset[str]) -> dict[str, float]:
    opts: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            expected = ", ".join(sorted(allowed)) or "none"
            raise HessdiagError(f"bad option {item!r} for activation {name!r} (options: {expected})")
        try:
            opts[key] = float(value)
        except ValueError:
            raise HessdiagError(f"option {key} of activation {name!r} must be a number, got {value!r}") from None
    return opts


def get_activation(spec: str) -> nn.Module:
    """Build an activation from a spec such as ``"gelu"``, ``"rct:n=1,alpha=14"`` or ``"rct:psi=7,n=2"``.

    Whitespace and case are ignored. ``psi`` picks α so that ψ_max equals it. Baselines accept
    their float hyper-parameters as options (``"softplus:beta=2"``, ``"elu:alpha=0.5"``).
    """
    text = re.sub(r"\s+", "", str(spec)).lower()
    name, _, option_text = text.partition(":")
    if name not in _REGISTRY:
        raise HessdiagError(f"unknown activation {spec!r}; valid names: {', '.join(ACTIVATION_NAMES)}")
    factory, allowed = _REGISTRY[name]
    opts = _parse_options(name, option_text, allowed)
    if name != "rct":
        return factory(**opts)
    n_value = opts.get("n", 1.0)
    if n_value != int(n_value):
        raise HessdiagError(f"RCT-AF order n must be 0, 1 or 2, got {n_value:g}")
    n = int(n_value)
    if "psi" in opts:
        if "alpha" in opts:
            raise HessdiagError("give either alpha or psi for an rct activation, not both")
        return RCTAF.from_psi_max(opts["psi"], n)
    return RCTAF(n, opts.get("alpha", 1.0))


# --------------------------------------------------------------------------------------------
# Numerical ψ_max for any elementwise activation
# --------------------------------------------------------------------------------------------

ActivationLike = Union[nn.Module, Callable[[Tensor], Tensor]]


class CurvatureProfile(NamedTuple):
    """φ' and φ'' (float64 autograd) on a grid, plus the slope jumps found between grid points.

    ``slope_jumps`` holds ``(x, jump)`` pairs: the midpoint of an interval where φ' changes by
    more than the integral of φ'' explains, and that excess (positive = the slope jumps up).
    """

    x: np.ndarray
    dphi: np.ndarray
    d2phi: np.ndarray
    slope_jumps: tuple[tuple[float, float], ...]


def _as_float64_callable(activation: ActivationLike) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, nn.Module) and (
        any(True for _ in activation.parameters()) or any(True for _ in activation.buffers())
    ):
        # Copy so the caller's module keeps its dtype.
        return copy.deepcopy(activation).double()
    return activation


def _first_second(fn: Callable[[Tensor], Tensor], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).requires_grad_(True)
    with torch.enable_grad():
        y = fn(xt)
        if not isinstance(y, Tensor) or y.shape != xt.shape:
            raise HessdiagError("psi_max needs an elementwise activation (tensor in, same-shape tensor out)")
        if not y.requires_grad:
            zeros = np.zeros_like(x)
            return zeros, zeros.copy()
        (d1,) = torch.autograd.grad(y.sum(), xt, create_graph=True, allow_unused=True)
        if d1 is None:
            d1 = torch.zeros_like(xt)
        d2 = None
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), xt, allow_unused=True)
        if d2 is None:
            d2 = torch.zeros_like(xt)
    return d1.detach().numpy(), d2.detach().numpy()


def curvature_profile(
    activation: ActivationLike, *, lo: float = -20.0, hi: float = 20.0, step: float = 1e-4
) -> CurvatureProfile:
    """Sample φ' and φ'' on [lo, hi] and locate slope jumps (kinks), where φ'' has a Dirac mass.

    An interval counts as a kink when Δφ' minus the trapezoid integral of φ'' exceeds
    10·step·max|φ''| + 1e-8·max|φ'|: a jump in φ'' alone (ELU) leaves O(step) there, a slope
    jump leaves its full size. Features narrower than `step` are indistinguishable from kinks.
    """
    return _profile(_as_float64_callable(activation), lo, hi, step)


def _profile(fn: Callable[[Tensor], Tensor], lo: float, hi: float, step: float) -> CurvatureProfile:
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and 0 < step <= hi - lo):
        raise HessdiagError(f"need finite lo < hi and 0 < step <= hi - lo, got lo={lo}, hi={hi}, step={step}")
    count = int(round((hi - lo) / step)) + 1
    x = np.linspace(lo, hi, count)
    d1, d2 = _first_second(fn, x)
    excess = np.diff(d1) - 0.5 * np.diff(x) * (d2[1:] + d2[:-1])
    tol = 10.0 * step * np.max(np.abs(d2)) + 1e-8 * np.max(np.abs(d1)) + 1e-300
    idx = np.flatnonzero(np.abs(excess) > tol)
    jumps = tuple((float(0.5 * (x[i] + x[i + 1])), float(excess[i])) for i in idx)
    return CurvatureProfile(x, d1, d2, jumps)


def psi_max(activation: ActivationLike, *, lo: float = -20.0, hi: float = 20.0, step: float = 1e-4) -> float:
    """sup φ'' on [lo, hi] for an elementwise activation (module or tensor -> tensor callable).

    RCTAF modules return their exact c_n·α. Otherwise φ'' comes from float64 double backward on
    a grid, and the best grid point is refined with bounded Brent. A slope that jumps *up*
    (ReLU, LeakyReLU, ELU with α < 1) gives math.inf. A slope that jumps *down* (SELU) is a
    negative Dirac mass and does not raise the sup, so SELU gives λα ≈ 1.7581, the sup over
    x ≠ 0, although max |φ''| is infinite; `curvature_profile` reports such jumps. For ELU(1) the
    sup is the left limit 1 at 0, which is not attained.
    """
    if isinstance(activation, RCTAF):
        return activation.psi_max
    from scipy.optimize import minimize_scalar

    fn = _as_float64_callable(activation)
    prof = _profile(fn, lo, hi, step)
    if any(jump > 0 for _, jump in prof.slope_jumps):
        return math.inf
    i = int(np.argmax(prof.d2phi))
    a, b = prof.x[max(i - 1, 0)], prof.x[min(i + 1, len(prof.x) - 1)]

    def neg_curvature(v: float) -> float:
        return -float(_first_second(fn, np.array([v]))[1][0])

    res = minimize_scalar(neg_curvature, bounds=(a, b), method="bounded", options={"xatol": 1e-12})
    return float(max(prof.d2phi[i], -res.fun))
