r"""``curvprop``: the exact GGN diagonal plus a per-example Monte-Carlo residual.

For networks whose only nonlinearities are elementwise activations (every parameter in an
affine layer used once; :mod:`hessdiag.structure`), per example

    diag Hₙ = diag(Jₙᵀ Λₙ Jₙ) + Σᵤ cₙ,ᵤ (∂zᵤ/∂θ)²,   cₙ,ᵤ = (∂ℓₙ/∂aᵤ) φ''(zᵤ)

(docs/math.md, "curvprop"). The first term is computed exactly (C backward passes per
batch, :meth:`~hessdiag.curvature_tape.TapedBatch.ggn_squares`); the second from two
backward passes per draw, injecting Rademacher noise scaled by √c₊ and √c₋ at every
pre-activation (Martens, Sutskever & Swersky 2012, "Estimating the Hessian by
back-propagating curvature"); for the first layer (by default) from per-example probes in
parameter space instead (below). Its noise is per example and averages over the N measured
examples, instead of growing with the Hessian's off-diagonal mass as Hutchinson's does.

Statistics. A *replicate* is one estimate r of the residual diagonal over ALL measured
examples, with its own draws; replicates are independent and unbiased, so with the GGN
diagonal g known exactly, ‖g‖² + 2gᵀr̄ + U(r₁, …, r_R) is unbiased for ‖d‖² and the
delete-a-group jackknife of :mod:`hessdiag.stats` gives its 95 % interval. (A U-statistic
across disjoint groups of examples would instead be biased low by the between-example
variance.) Replicates come in rounds of :data:`ROUND`; each round is one pass over the data
(one forward and one loss-gradient backward per batch, then two backward passes and one
probe product per replicate); the first round also computes g. With ``samples`` the number of replicates is
fixed; otherwise rounds are added until the half-width is below ``rtol`` or
``max_samples`` replicates are reached. The GGN/residual split comes for free.

Leading layers. A parameter of the layer applied to the input itself (the stem) reaches
every activation unit of the network, so its per-example gradient collects the injected
noise of all of them; the c₊ and c₋ passes each carry that noise while their difference,
the residual, is much smaller, and on trained ResNets this one small block can hold almost
all of the estimator's variance (docs/benchmarks.md); the next layers follow, less so. With
``probe_layers=k`` the residual of the first k linear and convolution layers (in the order
the forward pass calls them) is drawn in parameter space instead: Σₙ zₙ ⊙ (Rₙ zₙ), zₙ
Rademacher per example on those layers' parameters and Rₙ the Hessian of θ ↦ rₙᵀfₙ(θ)
(:meth:`~hessdiag.curvature_tape.TapedBatch.residual_products`, one forward-over-reverse
pass over the data per replicate, about an HVP). Its variance is that of a per-example
Hutchinson estimate on those layers alone, Σₙ Σᵢ≠ⱼ (Rₙ)ᵢⱼ², signed, so the cancellation
between c₊ and c₋ happens before the noise is drawn. The other parameters keep the
injection; the replicates stay independent and unbiased. The per-example copies of those
layers' parameters are made for at most :data:`PROBE_COPY_NUMBERS` numbers at a time (more
examples: more, smaller passes).

Cost is reported as ``info["backward_passes"]``: backward passes over all measured data
(each about one plain backward plus the per-example squares of the parameters' gradients).
The products of the leading layers are counted apart, in ``info["probe_products"]``
(passes over all measured data).
The same seed, data and batch size give bit-identical results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..curvature_tape import TapedBatch, TapeError
from ..objective import Objective, evaluation_mode
from ..stats import ProbeStatistics, half_width_on_norm
from ..structure import NetworkStructure
from ..types import DiagonalEstimate
from .base import EstimatorError, StochasticEstimator
from .structural import objective_structure

ALLOCATIONS = ("proportional", "uniform")

GGN_EXACT_MAX_CLASSES = 32
"""Up to this many outputs the GGN diagonal is exact (C backward passes per batch, once);
beyond, each replicate adds one Monte-Carlo pass instead."""

PROBE_COPY_NUMBERS = 1 << 24
"""At most this many numbers of per-example parameter copies per probe product (64 MB in
float32; the product holds about four such tensors): a wide first layer on many examples
runs on fewer examples at a time. The probes themselves, one number per example and
probed parameter, are drawn for the whole batch at once (so the grouping does not change
them)."""

ROUND = 16
"""Replicates per pass over the data: one per jackknife group, so the first interval
already has 15 degrees of freedom."""


def _rademacher_like(generator: torch.Generator, like: Tensor) -> Tensor:
    draw = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (draw.to(like.dtype) * 2 - 1).to(like.device)


@dataclass(kw_only=True, eq=False)
class CurvpropEstimator(StochasticEstimator):
    """``curvprop``: exact diag(GGN) + per-example Monte-Carlo residual; see the module docstring.

    Options: ``samples`` (a fixed number of replicates), ``rtol``, ``max_samples`` and
    ``seed`` (:class:`~hessdiag.estimators.base.StochasticEstimator`); ``allocation``:
    ``"proportional"`` (draws per example ∝ its curvature mass Σᵤ|cₙ,ᵤ|) or ``"uniform"``
    (one draw per example); ``ggn``: ``"exact"`` (C passes per batch), ``"mc"`` (one pass
    per replicate with Qξ, ξ Rademacher) or ``"auto"`` (exact up to
    :data:`GGN_EXACT_MAX_CLASSES` outputs); ``probe_layers``: for how many of the first
    linear/convolution layers (the stem first) the residual is drawn by per-example
    Rademacher probes in parameter space instead of the injection (one extra
    forward-over-reverse pass per replicate; module docstring); 0: none, 1 (default): the stem.
    """

    name = "curvprop"
    supports_distributed = True

    allocation: str = "proportional"
    ggn: str = "auto"
    probe_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise EstimatorError(f"curvprop: allocation must be one of {', '.join(ALLOCATIONS)}")
        if self.ggn not in ("auto", "exact", "mc"):
            raise EstimatorError("curvprop: ggn must be auto, exact or mc")
        if isinstance(self.probe_layers, bool) or not isinstance(self.probe_layers, int) or self.probe_layers < 0:
            raise EstimatorError("curvprop: probe_layers must be a whole number ≥ 0")
        if self.budget < 3:
            raise EstimatorError("curvprop needs at least 3 replicates (--samples)")

    def estimate(
        self, objective: Objective
    ) -> DiagonalEstimate:
        structure = objective_structure(objective)
        if structure.kind == "general":
            raise EstimatorError(f"curvprop: {structure.reason}; use hutchinson")
        try:
            return self._run(objective, structure, self.budget)
        except TapeError as err:
            raise EstimatorError(f"curvprop: {err}; use hutchinson") from None

    def _run(self, objective: Objective, structure: NetworkStructure, target: int) -> DiagonalEstimate:
        start = time.perf_counter()
        # Per-example draws: on several ranks each shard gets its own stream (the replicates
        # stay independent and unbiased; the numbers then depend on the world size).
        generator = torch.Generator().manual_seed(objective.world.draw_seed(self.seed))
        sizes = list(objective.numels.items())
        known_ggn = objective.ggn.known_diagonal
        ggn: Tensor | None = None if known_ggn is None else objective.ggn.flat(known_ggn)
        mode = "none" if ggn is not None else self._ggn_mode(objective)
        monte_carlo = mode == "mc"
        stats: ProbeStatistics | None = None
        passes = products = 0.0
        while stats is None or stats.count < target:
            take = min(ROUND, target - (0 if stats is None else stats.count))
            replicates, ggn_sums, spent, probed = self._round(objective, generator, take, mode)
            passes += spent
            products += probed
            if ggn_sums is not None:
                ggn = objective.flatten({k: v.unsqueeze(0) for k, v in ggn_sums.items()})[0]
                mode = "none"  # exact once is enough
            if stats is None:
                stats = ProbeStatistics(sizes, ggn, device=objective.device)
            if replicates is None:  # no smooth activation: the GGN diagonal is the answer
                break
            stats.add(replicates)
            if self.samples is None and half_width_on_norm(stats.statistics()["total"]) <= self.rtol:
                break
        if ggn is None:  # Monte-Carlo GGN: every replicate estimated all of d
            ggn = torch.zeros(objective.num_params, dtype=objective.dtype, device=objective.device)
        assert stats is not None and ggn is not None
        info: dict[str, object] = {
            "method": f"curvprop: {structure.reason}",
            "backward_passes": round(passes, 2),
            "ggn": "monte-carlo" if monte_carlo else "exact",
            "allocation": self.allocation,
            "probe_layers": self.probe_layers,
            "probe_products": round(products, 2),
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
            residual_statistics=(None if monte_carlo
                                 else stats.statistics(base=torch.zeros_like(ggn))),
            info=info,
        )

    def _ggn_mode(self, objective: Objective) -> str:
        """``"exact"`` or ``"mc"`` for this objective's number of outputs (``self.ggn``)."""
        if self.ggn != "auto":
            return self.ggn
        x, _, _ = next(objective.batches())
        with evaluation_mode(objective.model), torch.no_grad():
            outputs = objective.forward(objective.params, x[:1]).shape[-1]
        return "mc" if outputs > GGN_EXACT_MAX_CLASSES else "exact"

    def _round(self, objective: Objective, generator: torch.Generator, replicates: int,
               ggn_mode: str) -> tuple[Tensor | None, dict[str, Tensor] | None, float, float]:
        """One pass over the data: ``replicates`` estimates [R, P] of d − b (``None`` when
        the network has no smooth activation and the GGN is exact), the exact GGN diagonal
        when ``ggn_mode == "exact"``, the backward passes and the leading layers' products
        spent (both in passes over all data)."""
        num = objective.num_params
        estimates = torch.zeros(replicates, num, dtype=objective.dtype, device=objective.device)
        ggn = {n: torch.zeros_like(p) for n, p in objective.params.items()}
        rows, probed, any_sites = 0.0, 0.0, False
        for x, y, n in objective.batches():
            batch = TapedBatch(objective, x, y)
            if ggn_mode == "exact":
                for name, value in batch.ggn_squares().items():
                    ggn[name] += value
                rows += batch.num_classes * n
            elif ggn_mode == "mc":
                for row in range(replicates):
                    signs = _rademacher_like(generator, batch.loss_grad)
                    probe = torch.einsum("nck,nk->nc", batch.factor, signs)
                    estimates[row] += self._flat(objective, batch.output_squares(probe))
                rows += replicates * n
            if not batch.sites:
                continue
            any_sites = True
            batch.loss_gradient()
            rows += n
            probed_names = batch.leading_parameters(self.probe_layers)
            for row in range(replicates):
                spent = self._residual_draw(objective, generator, batch, x, y, estimates[row], probed_names)
                rows += spent
                probed += spent / 2 if probed_names else 0.0
        spent_rows = torch.tensor([rows, probed], dtype=torch.float64, device=objective.device)
        objective.mean_over_examples({"estimates": estimates, "rows": spent_rows}, ggn)
        has_estimates = any_sites or ggn_mode == "mc"
        return (estimates if has_estimates else None, ggn if ggn_mode == "exact" else None,
                float(spent_rows[0]), float(spent_rows[1]))

    def _residual_draw(self, objective: Objective, generator: torch.Generator,
                       batch: TapedBatch, x: Tensor, y: Tensor, into: Tensor,
                       probed: list[str]) -> float:
        """Add one draw of Σₙ Σᵤ cₙ,ᵤ (∂zᵤ/∂θ)² over the batch to ``into`` (flat [P]);
        returns the backward rows spent.

        ``uniform``: one draw per example on the batch's own graph. ``proportional``:
        example n gets mₙ draws with E mₙ = λₙ ∝ Σᵤ |cₙ,ᵤ| (on average one per example),
        mₙ = ⌊λₙ⌋ + Bernoulli(λₙ − ⌊λₙ⌋), on a copy of the batch with example n repeated
        mₙ times; the sum of its squares divided by λₙ is unbiased (Wald's identity), and
        an example with c = 0 has no residual and needs no draw.

        ``probed``: these parameters (of the leading layers) get Σₙ wₙ zₙ ⊙ (Rₙ zₙ) on the
        same examples and weights instead (:meth:`_probe`; one forward-over-reverse pass),
        so they follow the same allocation.
        """
        coefficients = [site.coefficient() for site in batch.sites]
        target, weights = batch, None
        if self.allocation == "proportional":
            mass = cast(Tensor, sum(c.abs().reshape(batch.num, -1).sum(1) for c in coefficients))
            total = float(mass.sum())
            if total == 0.0:
                return 0.0
            expected = mass * (batch.num / total)
            whole = expected.floor()
            extra = torch.rand(batch.num, generator=generator, dtype=torch.float64)
            draws = (whole + (extra.to(expected) < expected - whole).to(expected.dtype)).long()
            index = torch.repeat_interleave(torch.arange(batch.num, device=draws.device), draws)
            if index.numel() == 0:
                return 0.0
            target = TapedBatch(objective, x[index], y[index])
            if len(target.sites) != len(batch.sites):
                raise TapeError("the network's activations differ between two forward passes")
            for site, original in zip(target.sites, batch.sites):
                site.grad = original.grad[index]  # type: ignore[index]
            coefficients = [site.coefficient() for site in target.sites]
            weights = 1.0 / expected[index]
        signs = [_rademacher_like(generator, c) for c in coefficients]
        up = target.injected_squares([s * c.clamp(min=0).sqrt() for s, c in zip(signs, coefficients)],
                                     weights)
        down = target.injected_squares([s * (-c).clamp(min=0).sqrt()
                                        for s, c in zip(signs, coefficients)], weights)
        parts = {k: cast(Tensor, up.get(k, 0) - down.get(k, 0)) for k in set(up) | set(down)}
        if probed:
            parts.update(self._probe(generator, target, weights, probed))
        into += self._flat(objective, parts)
        return 2.0 * target.num

    @staticmethod
    def _probe(generator: torch.Generator, batch: TapedBatch, weights: Tensor | None,
               names: list[str]) -> dict[str, Tensor]:
        """Σₙ wₙ zₙ ⊙ (Rₙ zₙ) for the parameters ``names``, zₙ Rademacher per example
        (wₙ = 1 without weights): unbiased for Σₙ wₙ diag Rₙ there, since E zₙ zₙᵀ = I.
        Examples go through the product in groups small enough for
        :data:`PROBE_COPY_NUMBERS` (the draws do not depend on the grouping)."""
        objective = batch.objective
        params = objective.params
        tangents = {name: _rademacher_like(generator, params[name].expand(batch.num, *params[name].shape))
                    for name in names}
        scale = (torch.ones(batch.num, dtype=objective.dtype, device=objective.device)
                 if weights is None else weights)
        per_example = sum(params[name].numel() for name in names)
        step = max(1, PROBE_COPY_NUMBERS // per_example)
        total: dict[str, Tensor] = {name: torch.zeros_like(params[name]) for name in names}
        for start in range(0, batch.num, step):
            part = slice(start, start + step)
            products = batch.residual_products({name: t[part] for name, t in tangents.items()}, part)
            for name in names:
                total[name] += torch.einsum("n,n...->...", scale[part], tangents[name][part] * products[name])
        return total

    @staticmethod
    def _flat(objective: Objective, parts: dict[str, Tensor]) -> Tensor:
        full = {n: (parts[n] if n in parts and isinstance(parts[n], Tensor)
                    else torch.zeros_like(p)).unsqueeze(0) for n, p in objective.params.items()}
        return objective.flatten(full)[0]
