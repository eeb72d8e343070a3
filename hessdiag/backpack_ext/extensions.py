"""Our module extensions for BackPACK's ``DiagHessian``, ``DiagGGNExact`` and ``DiagGGNMC``.

BackPACK maps module classes (looked up by *exact* class) to module extensions; its
documented way to add a module is ``extension.set_module_extension(ModuleClass,
ModuleExtension)``. BackPACK ships extensions for ReLU, Sigmoid, Tanh, ELU, SELU,
LeakyReLU and LogSigmoid only; the smooth activations this project studies — RCT-AF (every
n and α), SiLU, GELU, Softplus and Mish — raise ``NotImplementedError`` without these.
"""

from __future__ import annotations

from torch import nn

from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule

from ..activations import RCTAF
from .derivatives import ClosedFormActivationDerivatives

SMOOTH_ACTIVATIONS: tuple[type[nn.Module], ...] = (RCTAF, nn.SiLU, nn.GELU, nn.Softplus, nn.Mish)
"""Activation classes we add to BackPACK (it lacks all of them)."""


class DiagHClosedForm(DiagHBaseModule):
    """``DiagHessian`` extension of a smooth activation from its closed-form φ', φ''."""

    def __init__(self) -> None:
        super().__init__(derivatives=ClosedFormActivationDerivatives())


class DiagGGNClosedForm(DiagGGNBaseModule):
    """``DiagGGNExact``/``DiagGGNMC`` extension of a smooth activation (uses φ' only)."""

    def __init__(self) -> None:
        super().__init__(derivatives=ClosedFormActivationDerivatives())


def register(extension: BackpropExtension) -> BackpropExtension:
    """Add our activation extensions to a BackPACK extension instance and return it."""
    module_extension = DiagHClosedForm if isinstance(extension, DiagHessian) else DiagGGNClosedForm
    for cls in SMOOTH_ACTIVATIONS:
        extension.set_module_extension(cls, module_extension(), overwrite=True)
    return extension


def diag_hessian() -> DiagHessian:
    """A ``DiagHessian`` instance that also knows the smooth activations."""
    return register(DiagHessian())  # type: ignore[return-value]


def diag_ggn_exact() -> DiagGGNExact:
    """A ``DiagGGNExact`` instance that also knows the smooth activations."""
    return register(DiagGGNExact())  # type: ignore[return-value]


def diag_ggn_mc(mc_samples: int = 1) -> DiagGGNMC:
    """A ``DiagGGNMC`` instance that also knows the smooth activations."""
    return register(DiagGGNMC(mc_samples=mc_samples))  # type: ignore[return-value]
