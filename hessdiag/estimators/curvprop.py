r"""``curvprop``: the exact GGN diagonal plus a per-example Monte-Carlo residual.

For networks whose only nonlinearities are elementwise activations (every parameter in an
affine layer used once; :mod:`hessdiag.structure`), per example

    diag Hₙ = diag(Jₙᵀ Λₙ Jₙ) + Σᵤ cₙ,ᵤ (∂zᵤ/∂θ)²,   cₙ,ᵤ = (∂ℓₙ/∂aᵤ) φ''(zᵤ)

(docs/math.md, "curvprop"). The first term is computed exactly (C backward passes per
batch, :meth:`~hessdiag.curvature_tape.TapedBatch.ggn_squares`); the second from two
backward passes per draw, injecting Rademacher noise scaled by √c₊ and √c₋ at every
pre-activation (Martens, Sutskever & Swersky 2012, "Estimating the Hessian by
back-propagating curvature"). Its noise is per example and averages over the N measured
examples, instead of growing with the Hessian's off-diagonal mass as Hutchinson's does.

Statistics. A *replicate* is one estimate r of the residual diagonal over ALL measured
examples, with its own draws; replicates are independent and unbiased, so with the GGN
diagonal g known exactly, ‖g‖² + 2gᵀr̄ + U(r₁, …, r_R) is unbiased for ‖d‖² and the
delete-a-group jackknife of :mod:`hessdiag.stats` gives its 95 % interval. (A U-statistic
across disjoint groups of examples would instead be biased low by the between-example
variance.) Replicates come in rounds of :data:`ROUND`; each round is one pass over the data
(one forward and one loss-gradient backward per batch, then two backward passes per
replicate); the first round also computes g. With ``samples`` the number of replicates is
fixed; otherwise rounds are added until the half-width is below ``rtol`` or
``max_samples`` replicates are reached. The GGN/residual split comes for free.

Cost is reported as ``info["backward_passes"]``: backward passes over all measured data
(each about one plain backward plus the per-example squares of the parameters' gradients).
The same seed, data and batch size give bit-identical results.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..curvature_tape import TapedBatch, TapeError
from ..objective import Objective
from ..stats import ProbeStatistics, half_width_on_norm
from ..structure import NetworkStructure
from .base import DiagonalEstimate, Estimator, EstimatorError
from .structural import objective_structure

ROUND = 16
"""Replicates per pass over the data: one per jackknife group, so the first interval
already has 15 degrees of freedom."""


def _rademacher_like(generator: torch.Generator, like: Tensor) -> Tensor:
    draw = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (draw.to(like.dtype) * 2 - 1).to(like.device)


class CurvpropEstimator(Estimator):
    """``curvprop``: exact diag(GGN) + per-example Monte-Carlo residual; see the module docstring."""

    name = "curvprop"
    exact = False

    def estimate(
        self, objective: Objective, known_ggn: dict[str, Tensor] | None = None
    ) -> DiagonalEstimate:
        opts = self.options
        structure = objective_structure(objective)
        if structure.kind == "general":
            raise EstimatorError(f"curvprop: {structure.reason}; use hutchinson")
        if opts.samples is None and not 0 < opts.rtol < 1:
            raise EstimatorError(f"rtol must lie in (0, 1), got {opts.rtol}")
        target = opts.samples if opts.samples is not None else opts.max_samples
        if target < 3:
            raise EstimatorError("curvprop needs at least 3 replicates (--samples)")
        try:
            return self._run(objective, structure, target, known_ggn)
        except TapeError as err:
            raise EstimatorError(f"curvprop: {err}; use hutchinson") from None

    def _run(self, objective: Objective, structure: NetworkStructure, target: int,
             known_ggn: dict[str, Tensor] | None) -> DiagonalEstimate:
        opts = self.options
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(opts.seed)
        sizes = list(objective.numels.items())
        ggn: Tensor | None = None
        if known_ggn is not None:
            ggn = objective.flatten({k: known_ggn[k].to(objective.dtype).unsqueeze(0)
                                     for k in objective.numels})[0]
        stats: ProbeStatistics | None = None
        passes = 0
        while stats is None or stats.count < target:
            take = min(ROUND, target - (0 if stats is None else stats.count))
            replicates, ggn_sums, spent = self._round(objective, generator, take, ggn is None)
            passes += spent
            if ggn is None:
                ggn = objective.flatten({k: v.unsqueeze(0) for k, v in ggn_sums.items()})[0]
            if stats is None:
                stats = ProbeStatistics(sizes, ggn, device=objective.device)
            if replicates is None:  # no smooth activation: the GGN diagonal is the answer
                break
            stats.add(replicates)
            if opts.samples is None and half_width_on_norm(stats.statistics()["total"]) <= opts.rtol:
                break
        assert stats is not None and ggn is not None
        info: dict[str, object] = {
            "method": f"curvprop: {structure.reason}",
            "backward_passes": passes,
            "seconds": time.perf_counter() - start,
        }
        if stats.count == 0:  # piecewise linear: exact
            diagonal = objective.unflatten(ggn.unsqueeze(0))
            return DiagonalEstimate(diagonal={k: v[0] for k, v in diagonal.items()}, hvps=0,
                                    info=info)
        statistics = stats.statistics()
        info["relative_half_width"] = half_width_on_norm(statistics["total"])
        info["jackknife_groups"] = stats.groups
        diagonal = objective.unflatten(stats.mean().to(objective.dtype).unsqueeze(0))
        return DiagonalEstimate(
            diagonal={k: v[0] for k, v in diagonal.items()},
            hvps=0,
            samples=stats.count,
            norm_statistics=statistics,
            residual_statistics=stats.statistics(base=torch.zeros_like(ggn)),
            info=info,
        )

    def _round(self, objective: Objective, generator: torch.Generator, replicates: int,
               with_ggn: bool) -> tuple[Tensor | None, dict[str, Tensor], int]:
        """One pass over the data: ``replicates`` residual estimates [R, P] (``None`` when the
        network has no smooth activation), the GGN diagonal when asked, and passes spent."""
        num = objective.num_params
        estimates = torch.zeros(replicates, num, dtype=objective.dtype, device=objective.device)
        ggn = {n: torch.zeros_like(p) for n, p in objective.params.items()}
        passes, any_sites = 0, False
        for x, y, _ in objective.batches():
            batch = TapedBatch(objective, x, y)
            if with_ggn:
                for name, value in batch.ggn_squares().items():
                    ggn[name] += value
            if not batch.sites:
                continue
            any_sites = True
            batch.loss_gradient()
            coefficients = [site.coefficient() for site in batch.sites]
            positive = [c.clamp(min=0).sqrt() for c in coefficients]
            negative = [(-c).clamp(min=0).sqrt() for c in coefficients]
            for row in range(replicates):
                signs = [_rademacher_like(generator, c) for c in coefficients]
                up = batch.injected_squares([s * p for s, p in zip(signs, positive)])
                down = batch.injected_squares([s * m for s, m in zip(signs, negative)])
                difference = {k: up.get(k, 0) - down.get(k, 0) for k in set(up) | set(down)}
                estimates[row] += self._flat(objective, difference)
        count = objective.num_examples or 1
        passes = (2 * replicates + 1) if any_sites else 0
        if with_ggn:
            passes += int(batch.num_classes)
        return ((estimates / count) if any_sites else None,
                {k: v / count for k, v in ggn.items()}, passes)

    @staticmethod
    def _flat(objective: Objective, parts: dict[str, Tensor]) -> Tensor:
        full = {n: (parts[n] if n in parts and isinstance(parts[n], Tensor)
                    else torch.zeros_like(p)).unsqueeze(0) for n, p in objective.params.items()}
        return objective.flatten(full)[0]

