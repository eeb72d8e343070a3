"""Low-rank-plus-residual diagonal (in the spirit of Diag++ / XDiag) with an unbiased norm.

A trained network's Hessian has a few dominant directions (about one per class) that
make ‖H‖_F² ≫ ‖diag H‖² and plain Hutchinson noisy. With k sketch HVPs Y = HΩ
(Ω Gaussian) and Q = orth(Y) (P×k, orthonormal), k more give Z = HQ, and

    A = Z Qᵀ + Q Zᵀ − Q M Qᵀ,    M = Qᵀ Z = QᵀHQ,

agrees with H on span(Q) and leaves the residual R = H − A = (I − QQᵀ) H (I − QQᵀ).
diag(A) = 2 rowsum(Z ⊙ Q) − rowsum((Q M) ⊙ Q) is exact, A z costs O(kP), and fresh
Rademacher probes estimate diag(R) by zᵢ ⊙ (H zᵢ − A zᵢ), one HVP each. Conditional on
the sketch, A is fixed and the probes are independent of it, so the control-variate
statistics of :mod:`hessdiag.stats` stay unbiased with a valid interval; the probe
variance scales with ‖R‖_F² instead of ‖H‖_F².

Cost: 2k + m HVPs for m probes (every sketch HVP counts); memory 2k·P beyond the
probe loop's. k follows the budget (:func:`sketch_rank`) unless the estimator is built
with ``sketch_rank=k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..objective import Objective
from .base import require_positive_integers
from .hutchinson import FlatProduct, ProbeEstimator

SKETCH_FRACTION = 4
"""Sketch rank k = budget // SKETCH_FRACTION (capped by MAX_RANK): half of the HVPs go
to the sketch, the rest to probes. Chosen by benchmarks/accuracy.py on the digits MLP,
where k = budget/4 beat k = budget/8 at every budget up to 128 (docs/benchmarks.md)."""
MAX_RANK = 32
"""Caps the sketch's memory at 2·32·P numbers (2.9 GB for ResNet-18 in float32)."""


@dataclass
class LowRankSurrogate:
    """A = Z Qᵀ + Q Zᵀ − Q M Qᵀ stored by rows: ``basis`` = Qᵀ [k, P], ``image`` = (HQ)ᵀ [k, P]."""

    basis: Tensor
    image: Tensor
    core: Tensor

    @classmethod
    def sketch(cls, hvp: FlatProduct, omega: Tensor) -> LowRankSurrogate:
        """Build A from k HVPs of the Gaussian test matrix ``omega`` [k, P] and k of Q."""
        sketch = hvp(omega)
        basis = torch.linalg.qr(sketch.T).Q.T.contiguous()
        image = hvp(basis)
        core = basis @ image.T
        return cls(basis, image, (core + core.T) / 2)

    def diagonal(self) -> Tensor:
        """diag(A), flat [P]."""
        return 2 * (self.image * self.basis).sum(0) - ((self.core @ self.basis) * self.basis).sum(0)

    def apply(self, probes: Tensor) -> Tensor:
        """A z for each row z of ``probes`` [m, P]."""
        coords = probes @ self.basis.T
        return coords @ self.image + (probes @ self.image.T - coords @ self.core) @ self.basis


def sketch_rank(budget: int) -> int:
    """k for a total budget of ``budget`` HVPs (two HVPs per rank)."""
    return max(1, min(MAX_RANK, budget // SKETCH_FRACTION))


@dataclass(kw_only=True, eq=False)
class LowRankHutchinsonEstimator(ProbeEstimator):
    """``hutchinson`` (the default): exact diagonal of a rank-k sketch + Hutchinson on the rest.

    Options: those of :class:`~hessdiag.estimators.hutchinson.ProbeEstimator`, and
    ``sketch_rank``: k, fixed (its 2k HVPs come out of the budget, with no cap on k);
    ``None`` (default): k = :func:`sketch_rank` of the budget.
    """

    name = "hutchinson"

    sketch_rank: int | None = None

    def __post_init__(self) -> None:
        require_positive_integers(self.name, sketch_rank=self.sketch_rank)
        super().__post_init__()  # checks that the sketch leaves probes in the budget

    def rank(self, budget: int) -> int:
        """k for a total budget of ``budget`` HVPs."""
        return self.sketch_rank if self.sketch_rank is not None else sketch_rank(budget)

    def sketch_budget(self, budget: int) -> int:
        return 2 * self.rank(budget)

    def prepare(
        self, objective: Objective, generator: torch.Generator, budget: int,
    ) -> tuple[Tensor | None, FlatProduct, int, dict[str, object]]:
        rank = self.rank(budget)
        hvp = objective.hessian.rows
        omega = torch.randn(rank, objective.num_params, generator=generator,
                            dtype=torch.float64).to(objective.device, objective.dtype)
        surrogate = LowRankSurrogate.sketch(hvp, omega)

        def residual(probes: Tensor) -> Tensor:
            return hvp(probes) - surrogate.apply(probes)

        return surrogate.diagonal(), residual, 2 * rank, {"sketch_rank": rank}
