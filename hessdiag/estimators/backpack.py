"""``backpack``: the exact Hessian diagonal from BackPACK's ``DiagHessian``.

BackPACK backpropagates symmetric factorizations of the curvature through the network in
one extended backward pass per batch: the loss Hessian's square root (C columns) plus, at
every smooth activation, the positive and negative square-root parts of φ''(z) ⊙ ∂L/∂φ(z)
(two columns per unit). The result is exact (no sampling), and no Hessian-vector products
are spent: the estimate reports ``hvps = 0`` and the number of extended backward passes
in ``info["backward_passes"]``. Its cost grows with the total number of hidden units (see
``docs/benchmarks.md``, "Exact methods"). Our module extensions add RCT-AF, SiLU, GELU,
Softplus and Mish (:mod:`hessdiag.backpack_ext`); models BackPACK cannot traverse (BatchNorm,
residual additions, custom or non-Sequential modules) are refused, naming the module.
"""

from __future__ import annotations


from ..objective import Objective
from ..types import DiagonalEstimate
from .base import Estimator


class BackpackEstimator(Estimator):
    """``backpack``: BackPACK ``DiagHessian`` on an extended copy of the model; exact."""

    name = "backpack"
    exact = True
    supports_distributed = True

    def estimate(
        self, objective: Objective
    ) -> DiagonalEstimate:
        from ..backpack_ext import backpack_diagonal

        diagonal = backpack_diagonal(objective, "hessian")
        try:
            passes = len(objective.data)
        except TypeError:
            passes = None
        return DiagonalEstimate(
            diagonal=diagonal, hvps=0,
            info={"method": "BackPACK DiagHessian", "backward_passes": passes},
        )
