"""BackPACK integration: our activation extensions and the diagonals BackPACK computes.

- :mod:`.derivatives`: φ', φ'' of smooth activations for BackPACK, read from
  :func:`hessdiag.activations.activation_derivatives`.
- :mod:`.extensions`: ``DiagHessian``/``DiagGGNExact``/``DiagGGNMC`` instances that know RCT-AF,
  SiLU, GELU, Softplus and Mish.
- :mod:`.diagonal`: diag of the Hessian or GGN of an :class:`~hessdiag.objective.Objective`,
  computed on an extended deep copy of the model.
"""

from .derivatives import ClosedFormActivationDerivatives
from .diagonal import BackpackUnsupportedError, backpack_diagonal, check_traversable
from .extensions import SMOOTH_ACTIVATIONS, diag_ggn_exact, diag_ggn_mc, diag_hessian, register

__all__ = [
    "SMOOTH_ACTIVATIONS",
    "BackpackUnsupportedError",
    "ClosedFormActivationDerivatives",
    "backpack_diagonal",
    "check_traversable",
    "diag_ggn_exact",
    "diag_ggn_mc",
    "diag_hessian",
    "register",
]
