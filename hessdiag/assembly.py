"""Assembly of a :class:`~hessdiag.result.Result` from an estimator's output: the
statistics policy (which norms are unbiased, their intervals, when an estimate counts as
resolved, what budget a requested ``rtol`` implies) in one place, apart from the plain data
(:mod:`hessdiag.result`) and its rendering (:mod:`hessdiag.report`).

Unresolved estimates. A stochastic norm is *resolved* when its unbiased squared norm is
positive and its 95 % interval's half-width on the norm scale is at most half the
estimate (:func:`hessdiag.stats.is_resolved`); exact norms always are. An unresolved norm
keeps its numbers (``normalized_norm`` clipped at 0, ``ci95``, the raw ``sq_norm`` and
``sq_norm_ci95``) with ``resolved = False``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .result import LayerResult, Result, normalized_norm
from .stats import ProbeBudget, is_resolved
from .stats import probes_for_rtol as stats_probes_for_rtol
from .types import DiagonalEstimate, GGNSplit, NormStatistics


def _rms(sq_norm: float, num_params: int) -> float:
    """√(max(s, 0)/P): an unbiased estimate of ‖d‖² may be negative by chance."""
    return math.sqrt(max(sq_norm, 0.0) / num_params)


def _exact_statistics(diagonal: dict[str, Tensor]) -> dict[str, NormStatistics]:
    """Squared norms per block and ``"total"`` of a known diagonal, zero-width intervals."""
    sq = {name: float(d.double().pow(2).sum()) for name, d in diagonal.items()}
    sq["total"] = sum(sq.values())
    return {k: NormStatistics(v, (v, v)) for k, v in sq.items()}


def assemble_result(
    estimate: DiagonalEstimate,
    *,
    estimator: str,
    loss: str,
    num_examples: int,
    dtype: torch.dtype,
    seconds: float,
    seed: int | None = None,
    checkpoint: str | None = None,
    split: GGNSplit | None = None,
    extras: dict[str, Any] | None = None,
    selection: str | None = None,
    hvp_route: str | None = None,
    hvp_fallback: str | None = None,
    params: list[str] | None = None,
    keep_diagonal: bool = False,
) -> Result:
    """The :class:`~hessdiag.result.Result` of an estimator's output: totals and per-layer norms.

    With ``split`` (d = d_GGN + d_res, :func:`hessdiag.ggn.split_diagonal`) the GGN and
    residual normalized norms are filled in, in total and per layer. d_GGN is exact.
    The residual's norm and ``residual_ci95`` come from ``estimate.residual_statistics``
    when the estimator was stochastic (unbiased U-statistic, jackknife interval, same
    probes); for an exact estimator they are exact with a zero-width interval. A
    stochastic estimate without residual statistics (it was not given the GGN) falls
    back to the plug-in norm of d̂ − d_GGN, biased upward by the probe noise, and
    ``residual_ci95`` stays ``None``.

    ``hvp_route``: how the second-order products ran (``"func"`` or ``"autograd"``;
    ``None`` when none ran), ``hvp_fallback``: torch.func's refusal when the
    ``"auto"`` route fell back to double backward
    (:meth:`hessdiag.operators.HessianOperator.batch_product`).

    ``params``: the parameter selection to record; ``keep_diagonal``: keep the
    diagonals themselves (else ``diagonal``, ``ggn_diagonal`` and ``residual_diagonal``
    are ``None``).
    """
    diag = estimate.diagonal
    stats = estimate.norm_statistics
    stochastic = stats is not None
    if stats is None:  # exact: squared norms straight from the diagonal
        stats = _exact_statistics(diag)
    sizes = {name: d.numel() for name, d in diag.items()}
    total_p = sum(sizes.values())

    def interval(s: NormStatistics, p: int) -> tuple[float, float]:
        return (_rms(s.ci95[0], p), _rms(s.ci95[1], p))

    def resolved(s: NormStatistics) -> bool:
        return is_resolved(s) if stochastic else True

    layers = [
        LayerResult(name, sizes[name], _rms(stats[name].sq_norm, sizes[name]),
                    interval(stats[name], sizes[name]), resolved=resolved(stats[name]),
                    sq_norm=stats[name].sq_norm, sq_norm_ci95=stats[name].ci95)
        for name in diag
    ]
    residual_stats = estimate.residual_statistics
    if split is not None and residual_stats is None and estimate.norm_statistics is None:
        residual_stats = _exact_statistics(split.residual)
    if split is not None:
        for layer in layers:
            layer.ggn_normalized_norm = normalized_norm(split.ggn[layer.name])
            if residual_stats is None:  # plug-in, see the docstring
                layer.residual_normalized_norm = normalized_norm(split.residual[layer.name])
            else:
                block = residual_stats[layer.name]
                layer.residual_normalized_norm = _rms(block.sq_norm, layer.num_params)
                layer.residual_ci95 = interval(block, layer.num_params)
                layer.residual_resolved = resolved(block)
                layer.residual_sq_norm, layer.residual_sq_norm_ci95 = block.sq_norm, block.ci95
    residual_norm = residual_ci95 = residual_total = None
    if split is not None and residual_stats is None:
        residual_norm = normalized_norm(split.residual)
    elif split is not None and residual_stats is not None:
        residual_total = residual_stats["total"]
        residual_norm = _rms(residual_total.sq_norm, total_p)
        residual_ci95 = interval(residual_total, total_p)
    total = stats["total"]
    naive = None if total.naive_sq_norm is None else _rms(total.naive_sq_norm, total_p)
    return Result(
        estimator=estimator,
        loss=loss,
        num_params=total_p,
        num_examples=num_examples,
        dtype=str(dtype).removeprefix("torch."),
        normalized_norm=_rms(total.sq_norm, total_p),
        norm=math.sqrt(max(total.sq_norm, 0.0)),
        ci95=interval(total, total_p),
        per_layer=layers,
        hvps=estimate.hvps,
        seconds=seconds,
        samples=estimate.samples,
        seed=seed,
        naive_normalized_norm=naive,
        checkpoint=checkpoint,
        params=None if params is None else list(params),
        diagonal=diag if keep_diagonal else None,
        ggn_normalized_norm=None if split is None else normalized_norm(split.ggn),
        residual_normalized_norm=residual_norm,
        residual_ci95=residual_ci95,
        ggn_method=None if split is None else split.method,
        method=str(estimate.info["method"]) if "method" in estimate.info else None,
        selection=selection,
        hvp_route=hvp_route,
        hvp_fallback=hvp_fallback,
        ggn_diagonal=None if split is None or not keep_diagonal else split.ggn,
        residual_diagonal=None if split is None or not keep_diagonal else split.residual,
        extras=extras,
        resolved=resolved(total),
        sq_norm=total.sq_norm,
        sq_norm_ci95=total.ci95,
        residual_resolved=None if residual_total is None else resolved(residual_total),
        residual_sq_norm=None if residual_total is None else residual_total.sq_norm,
        residual_sq_norm_ci95=None if residual_total is None else residual_total.ci95,
    )


def probes_for_rtol(result: Result, rtol: float) -> ProbeBudget | None:
    """Probes the observed variance implies for a relative half-width ``rtol`` of the
    total and (when it has an interval) the GGN residual: the larger of the two
    (:func:`hessdiag.stats.probes_for_rtol`), a lower bound if either is one; ``None``
    for exact estimators."""
    if result.samples is None:
        return None
    budgets = [stats_probes_for_rtol(sq, ci, result.samples, rtol)
               for sq, ci in ((result.sq_norm, result.sq_norm_ci95),
                              (result.residual_sq_norm, result.residual_sq_norm_ci95))
               if sq is not None and ci is not None]
    found = [b for b in budgets if b is not None]
    if not found:
        return None
    return ProbeBudget(max(b.probes for b in found), any(b.at_least for b in found))
