"""BackPACK derivatives of elementwise activations, read from :mod:`hessdiag.activations`.

BackPACK backpropagates curvature through an elementwise activation φ with two numbers per
unit (``backpack.core.derivatives.elementwise.ElementwiseDerivatives``):

    df  = φ'(x)    (Jacobian diagonal, used by every second-order extension),
    d2f = φ''(x)   (its residual term d2f ⊙ ∂L/∂φ(x) enters ``DiagHessian`` only).

Activations carry their closed-form derivatives once, in
:func:`hessdiag.activations.activation_derivatives`; this class only reads them, so the
BackPACK path, the analytic path and ψ_max can never disagree about φ' or φ''.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from backpack.core.derivatives.elementwise import ElementwiseDerivatives
from backpack.utils.subsampling import subsample

from ..activations import activation_derivatives


class ClosedFormActivationDerivatives(ElementwiseDerivatives):
    """φ' and φ'' of any activation :func:`~hessdiag.activations.activation_derivatives` knows.

    The derivatives are evaluated at the module's stored input ``module.input0`` (shape
    ``[N, *features]``), so the module's hyper-parameters (RCT-AF's n and α, Softplus' β and
    threshold, GELU's approximation) are read at backward time, not when the extension is built.
    """

    def hessian_is_zero(self, module: nn.Module) -> bool:
        # The activations registered here are smooth (C², nonzero φ'').
        return False

    def df(
        self,
        module: nn.Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        subsampling: list[int] | None = None,
    ) -> Tensor:
        """φ'(x) at the (optionally subsampled) input, shape ``[N, *features]``."""
        return activation_derivatives(module).dphi(subsample(module.input0, subsampling=subsampling))

    def d2f(self, module: nn.Module, g_inp: tuple[Tensor, ...], g_out: tuple[Tensor, ...]) -> Tensor:
        """φ''(x) at the input, shape ``[N, *features]``."""
        return activation_derivatives(module).d2phi(cast(Tensor, module.input0))  # set by BackPACK
