"""Hutchinson's stochastic diagonal with an unbiased norm and a jackknife interval (docs/index.md, "Estimators").

For Rademacher probes z (entries ±1, E z zᵀ = I), d̂ = z ⊙ (H z) is unbiased for
d = diag H: E[zᵢ (Hz)ᵢ] = Σⱼ Hᵢⱼ E[zᵢzⱼ] = Hᵢᵢ. H z is accumulated over all measured
data for the same z (:class:`~hessdiag.operators.HessianOperator`), and probes are
processed ``chunk_size`` at a time (one data pass per chunk, vmapped over the chunk).

The control-variate estimators share this module's probe loop: they split
d = b + diag(R) with b known exactly and R = H − A for a surrogate A whose products are
cheap, and estimate diag(R) by zᵢ ⊙ (R zᵢ). The norm ‖d‖² and its interval come from
:class:`hessdiag.stats.ProbeStatistics` (U-statistic plus delete-a-group jackknife).

Probes are drawn one at a time from a seeded ``torch.Generator`` on the CPU, so a run is
reproducible and independent of the chunk and batch sizes. Peak memory: the statistics'
(G + 1)·P numbers (G = 16 jackknife groups) plus one chunk of probes and products
(2·chunk·P) plus the activations of ``chunk × batch`` examples inside a vmapped HVP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..objective import Objective
from ..stats import ProbeStatistics, half_width_on_norm
from ..types import DiagonalEstimate
from .base import EstimatorError, StochasticEstimator

MIN_ADAPTIVE_SAMPLES = 32
"""Adaptive stopping looks at the interval only from this many probes on: with fewer,
the jackknife's own variance makes an early stop on a lucky draw too likely."""

FlatProduct = Callable[[Tensor], Tensor]
"""Maps a probe stack [k, P] to a product stack [k, P] (e.g. H·z for each row z)."""


def rademacher(generator: torch.Generator, num: int, size: int, dtype: torch.dtype,
               device: torch.device | str | None = None) -> Tensor:
    """``num`` Rademacher rows of length ``size``, drawn one row at a time (chunk-independent)."""
    rows = [torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8)
            for _ in range(num)]
    return (torch.stack(rows).to(dtype) * 2 - 1).to(device)


def run_probes(
    estimates: FlatProduct,
    stats: ProbeStatistics,
    draw: Callable[[int], Tensor],
    *,
    samples: int | None,
    rtol: float,
    max_samples: int,
    chunk_size: int,
) -> int:
    """Draw probes in chunks and add their estimates rᵢ to ``stats``; returns the probe count.

    ``samples`` fixes the count; otherwise probes are added until the 95 % interval's
    half-width on the norm scale is ≤ ``rtol`` of the estimate (checked after each chunk,
    from :data:`MIN_ADAPTIVE_SAMPLES` on) or ``max_samples`` is reached.
    """
    target = samples if samples is not None else max_samples
    while stats.count < target:
        take = min(chunk_size, target - stats.count)
        if samples is None and stats.count < MIN_ADAPTIVE_SAMPLES:
            take = min(max(take, MIN_ADAPTIVE_SAMPLES - stats.count), target - stats.count)
        stats.add(estimates(draw(take)))
        if samples is None and stats.count >= MIN_ADAPTIVE_SAMPLES:
            if half_width_on_norm(stats.statistics()["total"]) <= rtol:
                break
    return stats.count


@dataclass(kw_only=True, eq=False)
class ProbeEstimator(StochasticEstimator):
    """Shared shell: budget checks, seeding, the probe loop and the result.

    Options (keywords): ``samples`` (a fixed budget of HVPs, a sketch included), ``rtol``,
    ``max_samples`` and ``seed`` (:class:`~hessdiag.estimators.base.StochasticEstimator`).
    Subclasses implement :meth:`prepare`, which may spend HVPs on a surrogate and returns
    (exact part b as flat [P] or ``None``, probe product, HVPs spent, info).

    GGN split. Given g = diag(GGN), exact and known before probing
    (``objective.ggn.known_diagonal``), the residual diagonal is
    d − g = (b − g) + r: the same probe estimates rᵢ with another known base, so
    :meth:`ProbeStatistics.statistics` with base b − g gives its unbiased squared norm
    and jackknife interval (``residual_statistics``) at no extra HVP.
    """

    min_samples: ClassVar[int] = 3
    supports_distributed: ClassVar[bool] = True  # a subclass's prepare() must keep it true

    def __post_init__(self) -> None:
        super().__post_init__()
        spent_before = self.sketch_budget(self.budget)
        if self.budget - spent_before < self.min_samples:
            raise EstimatorError(
                f"{self.name}: {self.budget} HVPs leave fewer than {self.min_samples} probes "
                f"after a sketch of {spent_before}; raise --samples/--max-samples"
            )

    def prepare(
        self, objective: Objective, generator: torch.Generator, budget: int,
    ) -> tuple[Tensor | None, FlatProduct, int, dict[str, object]]:
        """Return (b, product z ↦ R z on flat stacks ``[k, P]``, HVPs spent, info).

        The product acts on the objective's curvature operators (here R = H:
        ``objective.hessian.rows``); one data pass per call, the probes in chunks of the
        objective's ``chunk_size``, which bounds the activation memory.
        """
        return None, objective.hessian.rows, 0, {}

    def sketch_budget(self, budget: int) -> int:
        """HVPs a subclass spends before probing, out of a total budget (default: none)."""
        return 0

    def budget_for_probes(self, probes: int) -> int:
        """The smallest budget (``samples``, HVPs) that leaves at least ``probes`` probes.

        A budget B pays :meth:`sketch_budget` (B) HVPs before probing (``hutchinson``: its
        rank-k sketch, 2k HVPs with k growing with B up to a cap); an exact GGN diagonal
        that ``hutchinson-ggn`` computes is not part of its budget.
        """
        budget = probes + self.sketch_budget(probes)
        while budget - self.sketch_budget(budget) < probes:  # the sketch grew with the budget
            budget = probes + self.sketch_budget(budget)
        return budget

    def estimate(
        self, objective: Objective
    ) -> DiagonalEstimate:
        generator = torch.Generator().manual_seed(self.seed)
        start = time.perf_counter()
        known_ggn = objective.ggn.known_diagonal  # before prepare(): a subclass may compute it
        ggn = None if known_ggn is None else objective.ggn.flat(known_ggn)
        base, product, spent, info = self.prepare(objective, generator, self.budget)
        sizes = list(objective.numels.items())
        stats = ProbeStatistics(sizes, base, device=objective.device)
        num = objective.num_params

        def draw(k: int) -> Tensor:
            return rademacher(generator, k, num, objective.dtype, objective.device)

        def estimates(probes: Tensor) -> Tensor:
            return probes * product(probes)

        probe_start = time.perf_counter()
        count = run_probes(
            estimates, stats, draw,
            samples=None if self.samples is None else self.samples - spent,
            rtol=self.rtol, max_samples=self.max_samples - spent,
            chunk_size=objective.chunk_size,
        )
        info["seconds_per_probe"] = (time.perf_counter() - probe_start) / count
        info["seconds"] = time.perf_counter() - start
        info["jackknife_groups"] = stats.groups
        statistics = stats.statistics()
        info["relative_half_width"] = half_width_on_norm(statistics["total"])
        residual_statistics = None
        if ggn is not None:  # d − g = (b − g) + r: same probes, another known base
            residual_base = -ggn if base is None else base - ggn
            residual_statistics = stats.statistics(base=residual_base)
        diagonal = objective.unflatten(stats.mean().to(objective.dtype).unsqueeze(0))
        return DiagonalEstimate(
            diagonal={k: v[0] for k, v in diagonal.items()},
            hvps=spent + count,
            samples=count,
            norm_statistics=statistics,
            residual_statistics=residual_statistics,
            info=info,
        )


class PlainHutchinsonEstimator(ProbeEstimator):
    """``hutchinson-plain``: d̂ = mean zᵢ ⊙ H zᵢ; U-statistic norm with a jackknife interval."""

    name = "hutchinson-plain"
