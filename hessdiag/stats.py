"""Probe statistics: the unbiased squared norm of a stochastic diagonal, its interval, stopping.

Setting. A diagonal is written d = b + r where b ∈ R^P is known exactly (zero for plain
Hutchinson; diag(GGN) or the diagonal of a low-rank surrogate for the control-variate
estimators) and r is estimated from N independent probe estimates rᵢ with E rᵢ = r.
With S = Σᵢ rᵢ and Q = Σᵢ ‖rᵢ‖²,

    T = ‖b‖² + 2 bᵀS/N + (‖S‖² − Q) / (N(N−1))

is unbiased for ‖d‖² = ‖b‖² + 2bᵀr + ‖r‖², because the last term averages rᵢᵀrⱼ over
pairs i ≠ j (a U-statistic of order two). The naive plug-in ‖b + S/N‖² overshoots it by
E‖rᵢ − r‖²/N (for plain Hutchinson (‖H‖_F² − ‖d‖²)/N, often a hundred times ‖d‖²/N).

Interval. Probes are dealt round-robin into G groups (probe i → group i mod G); the
delete-a-group jackknife recomputes T without each group, se² = (G−1)/G Σ_g (T₋g − T̄)²,
and the 95 % interval is T ± t_{G−1; 0.975}·se. Memory is (G + 1)·P numbers however
many probes are drawn, so the statistics stay bounded on large networks.

All quantities are kept per parameter block (and summed for the total), so per-layer
norms come with their own intervals.

Resolution. An estimate is *resolved* when T > 0 and the interval's half-width on the
norm scale is at most :data:`RESOLVED_HALF_WIDTH` of the estimate (:func:`is_resolved`);
otherwise only the interval's upper end says something about the norm. The variance
observed so far implies how many probes a target precision needs
(:func:`probes_for_rtol`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .types import NormStatistics

RESOLVED_HALF_WIDTH = 0.5
"""An estimate whose 95 % half-width on the norm scale exceeds this fraction of it is unresolved."""

MAX_PROBES = 10**9
"""Cap of :func:`probes_for_rtol` (an estimate near zero would otherwise ask for ~∞)."""

DEFAULT_GROUPS = 16
"""Jackknife groups: 15 degrees of freedom for the t quantile at (G+1)·P memory."""

# Two-sided 97.5 % quantiles of Student's t (df = 1..30); beyond that ≈ normal.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """97.5 % quantile of Student's t with ``df`` degrees of freedom (table; ≥ 31 → 1.96)."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96


def u_statistic(estimates: Tensor) -> Tensor:
    """(‖Σᵢ dᵢ‖² − Σᵢ ‖dᵢ‖²) / (N(N−1)) for ``estimates`` of shape [N, P] (N ≥ 2); unbiased for ‖E d‖²."""
    num = estimates.shape[0]
    if num < 2:
        raise ValueError("the U-statistic needs at least two probe estimates")
    total = estimates.sum(0)
    return (total.pow(2).sum() - estimates.pow(2).sum()) / (num * (num - 1))


def half_width_on_norm(stats: NormStatistics) -> float:
    """Relative half-width of the interval mapped to the norm scale, (√hi − √lo₊)/(2√T)."""
    root = math.sqrt(max(stats.sq_norm, 0.0))
    if root == 0.0:
        return math.inf
    lo, hi = stats.ci95
    return (math.sqrt(max(hi, 0.0)) - math.sqrt(max(lo, 0.0))) / (2.0 * root)


def is_resolved(stats: NormStatistics) -> bool:
    """T > 0 and a 95 % half-width on the norm scale of at most :data:`RESOLVED_HALF_WIDTH` × √T."""
    return stats.sq_norm > 0 and half_width_on_norm(stats) <= RESOLVED_HALF_WIDTH


@dataclass(frozen=True)
class ProbeBudget:
    """Probes that a target precision needs; ``at_least``: a lower bound, not an estimate."""

    probes: int
    at_least: bool


def _round_up(value: float) -> int:
    """``value`` rounded up to an integer with at most two significant digits (5,234 → 5,300)."""
    whole = math.ceil(value)
    step = 10 ** max(len(str(whole)) - 2, 0)
    return -(-whole // step) * step


def probes_for_rtol(
    sq_norm: float, ci95: tuple[float, float], samples: int, rtol: float
) -> ProbeBudget | None:
    """Probes for a 95 % half-width of ``rtol`` × the normalized norm, by the observed variance.

    The jackknife variance of the unbiased squared norm T scales like 1/n in the number n
    of probes, so the interval's half-width H = (hi − lo)/2 shrinks like 1/√n. On the norm
    scale (√T, delta method) the half-width relative to the estimate is h = H/(2T). So n
    probes at relative half-width h imply

        n′ = n · (h / rtol)²

    probes for relative half-width ``rtol``. T is the estimate when the interval excludes
    zero (lo > 0). Otherwise the norm may be arbitrarily small, and T is taken at the
    interval's upper end hi: the probes needed if the norm were as large as the interval
    allows, a lower bound (``at_least``). ``None`` when hi ≤ 0 (no scale to aim at).
    n′ is rounded up to two significant digits, is at least 3 (what the statistics need)
    and at most :data:`MAX_PROBES` (then also ``at_least``).
    """
    if samples < 1 or not rtol > 0:
        raise ValueError(f"need samples ≥ 1 and rtol > 0, got {samples} and {rtol}")
    lo, hi = ci95
    if not hi > 0:
        return None
    at_least = not lo > 0
    reference = hi if at_least else sq_norm
    relative = (hi - lo) / (4.0 * reference)
    needed = samples * (relative / rtol) ** 2
    if not needed < MAX_PROBES:
        return ProbeBudget(MAX_PROBES, True)
    return ProbeBudget(max(3, _round_up(needed)), at_least)


@dataclass
class _Sums:
    """Blockwise sufficient statistics of a set of probes: Σ rᵢ ([P]) and Σ‖rᵢ‖² ([B])."""

    total: Tensor
    sq: Tensor
    count: int


class ProbeStatistics:
    """Streaming accumulator of probe estimates rᵢ of r in d = b + r (module docstring).

    Args:
        sizes: block names and sizes, in the flat order of the probes' columns.
        base: the exact part b as a flat [P] tensor (``None``: zero).
        groups: jackknife groups G.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[str, int]],
        base: Tensor | None = None,
        *,
        groups: int = DEFAULT_GROUPS,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if groups < 2:
            raise ValueError("the jackknife needs at least two groups")
        self.names = [n for n, _ in sizes]
        self.sizes = [int(s) for _, s in sizes]
        num = sum(self.sizes)
        self.block_index = torch.repeat_interleave(
            torch.arange(len(self.sizes), device=device), torch.tensor(self.sizes, device=device)
        )
        self.base = (torch.zeros(num, dtype=dtype, device=device) if base is None
                     else base.detach().reshape(-1).to(device=device, dtype=dtype))
        self.groups = groups
        self.group_sums = torch.zeros(groups, num, dtype=dtype, device=device)
        self.group_sq = torch.zeros(groups, len(self.sizes), dtype=dtype, device=device)
        self.group_counts = [0] * groups
        self.count = 0

    def _blockwise(self, values: Tensor) -> Tensor:
        """Sum [..., P] over each block → [..., B]."""
        out = torch.zeros(*values.shape[:-1], len(self.sizes), dtype=values.dtype,
                          device=values.device)
        return out.index_add_(-1, self.block_index, values)

    def add(self, estimates: Tensor) -> None:
        """Add probe estimates rᵢ, a [k, P] tensor, in probe order."""
        estimates = estimates.to(self.group_sums.dtype)
        sq = self._blockwise(estimates.pow(2))
        for row in range(estimates.shape[0]):
            g = self.count % self.groups
            self.group_sums[g].add_(estimates[row])
            self.group_sq[g].add_(sq[row])
            self.group_counts[g] += 1
            self.count += 1

    # -- statistics ---------------------------------------------------------------------

    def mean(self, base: Tensor | None = None) -> Tensor:
        """Point estimate of d: b + S/N, flat [P] (``base`` replaces b, see :meth:`statistics`)."""
        base = self.base if base is None else self._as_base(base)
        return base + self.group_sums.sum(0) / max(self.count, 1)

    def _as_base(self, base: Tensor) -> Tensor:
        return base.detach().reshape(-1).to(device=self.base.device, dtype=self.base.dtype)

    def _unbiased(self, sums: _Sums, base: Tensor) -> Tensor:
        """Blockwise T of the module docstring for the probes summarized in ``sums``; [B]."""
        n = sums.count
        base_sq = self._blockwise(base.pow(2))
        cross = self._blockwise(base * sums.total) * (2.0 / n)
        pairs = (self._blockwise(sums.total.pow(2)) - sums.sq) / (n * (n - 1))
        return base_sq + cross + pairs

    def _sums(self, leave_out: int | None = None) -> _Sums:
        total, sq = self.group_sums.sum(0), self.group_sq.sum(0)
        count = self.count
        if leave_out is not None:
            total = total - self.group_sums[leave_out]
            sq = sq - self.group_sq[leave_out]
            count -= self.group_counts[leave_out]
        return _Sums(total, sq, count)

    def statistics(self, base: Tensor | None = None) -> dict[str, NormStatistics]:
        """Per block and ``"total"``: unbiased ‖d‖², 95 % jackknife interval, naive ‖mean‖².

        ``base``: another exactly known b′ (flat [P]) in place of b, i.e. the statistics
        of ‖b′ + r‖² from the same probes rᵢ. The GGN split uses b′ = b − diag(GGN): then
        b′ + r = d − diag(GGN) is the residual diagonal, so its unbiased norm and interval
        cost no extra HVP and no extra memory.
        """
        if self.count < 3:
            raise ValueError("norm statistics need at least three probes")
        base = self.base if base is None else self._as_base(base)
        full = self._unbiased(self._sums(), base)
        used = [g for g in range(self.groups) if self.group_counts[g] > 0]
        # Each leave-one-group-out estimate needs ≥ 2 remaining probes (true for N ≥ 3).
        loo = torch.stack([self._unbiased(self._sums(g), base) for g in used])  # [G', B]
        loo = torch.cat([loo, loo.sum(1, keepdim=True)], 1)
        full = torch.cat([full, full.sum().reshape(1)])
        num_groups = len(used)
        var = (num_groups - 1) / num_groups * (loo - loo.mean(0)).pow(2).sum(0)
        half = t975(num_groups - 1) * var.sqrt()
        mean = self.mean(base)
        naive = self._blockwise(mean.pow(2))
        naive = torch.cat([naive, naive.sum().reshape(1)])
        out = {}
        for i, name in enumerate([*self.names, "total"]):
            value = float(full[i])
            out[name] = NormStatistics(value, (value - float(half[i]), value + float(half[i])),
                                       float(naive[i]))
        return out
