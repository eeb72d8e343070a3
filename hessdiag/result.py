"""The result of a measurement as plain data: totals, per-layer norms and the JSON
document (docs/index.md, "Result document").

For a diagonal d ∈ R^P the reported number is the normalized norm ‖d‖₂/√P, the
root-mean-square of the diagonal; per parameter tensor ("layer") ‖d_block‖₂/√P_block.
Stochastic estimators supply unbiased squared norms with intervals; exact ones report a
zero-width interval ``[x, x]``. The same holds for the residual d_res = d − d_GGN of the
GGN split (``residual_ci95``); d_GGN itself is always exact.

A :class:`Result` is assembled by :func:`hessdiag.assembly.assemble_result` (the statistics
policy: unbiased norms, intervals, resolution) and rendered by :mod:`hessdiag.report`
(table, HTML, chart); its ``table()``, ``plot()`` and friends are shortcuts to the latter.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ._version import __version__


def normalized_norm(diagonal: Tensor | dict[str, Tensor]) -> float:
    """‖d‖₂/√P of a diagonal given as one tensor or a dict of tensors."""
    parts = list(diagonal.values()) if isinstance(diagonal, dict) else [diagonal]
    sq = sum(float(p.double().pow(2).sum()) for p in parts)
    num = sum(p.numel() for p in parts)
    return math.sqrt(sq / num)


@dataclass
class LayerResult:
    """Normalized norm of one parameter tensor's block of the diagonal.

    ``resolved``, ``sq_norm``, ``sq_norm_ci95`` (and the ``residual_`` ones) as in
    :class:`Result`; the residual's are ``None`` without a split or without an interval.
    """

    name: str
    num_params: int
    normalized_norm: float
    ci95: tuple[float, float]
    ggn_normalized_norm: float | None = None
    residual_normalized_norm: float | None = None
    residual_ci95: tuple[float, float] | None = None
    resolved: bool = True
    sq_norm: float | None = None
    sq_norm_ci95: tuple[float, float] | None = None
    residual_resolved: bool | None = None
    residual_sq_norm: float | None = None
    residual_sq_norm_ci95: tuple[float, float] | None = None


class UnresolvedEstimateWarning(UserWarning):
    """A stochastic estimate's 95 % interval is too wide to resolve its normalized norm.

    :func:`hessdiag.measure` issues it, in one line with the budget the observed variance
    implies for ``rtol``, when the total or the GGN residual is unresolved
    (:func:`hessdiag.report.resolution_warning`). Silence it locally with
    ``warnings.catch_warnings()`` if ``Result.resolved`` is checked instead.
    """


@dataclass(frozen=True)
class RtolBudget:
    """The budget (``samples``, counted as the estimator counts it: ``unit``) that the
    variance of a run implies for a relative 95 % half-width ``rtol``; ``at_least``: a lower
    bound (:func:`hessdiag.stats.probes_for_rtol`)."""

    rtol: float
    samples: int
    at_least: bool
    unit: str = "HVPs"


def _listed(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else list(pair)


@dataclass
class Result:
    """A measurement: what the CLI prints and writes, and what the Python API returns.

    Besides the norms: ``resolved`` (see the module docstring; always ``True`` for exact
    estimators), ``sq_norm`` (the unbiased ‖d‖², which may be negative by chance) and its
    95 % interval ``sq_norm_ci95``, the same for the GGN residual (``residual_resolved``,
    ``None`` without an interval), and for stochastic runs of :func:`hessdiag.measure`
    ``rtol_budget``, the budget the observed variance implies for the requested ``rtol``.

    ``params``: the parameter selection as given (patterns, names; ``None``: every
    parameter with ``requires_grad=True``); ``num_params`` and the norms refer to it.
    ``world_size``: the ranks that measured together (1: one process; docs/scaling.md) and
    ``examples_per_rank`` the examples of each rank's shard, summing to ``num_examples``.
    ``diagonal`` (``{name: Tensor}``, with ``split_ggn`` also ``ggn_diagonal`` and
    ``residual_diagonal``) is kept only on request (``measure(..., keep_diagonal=True)``),
    else ``None``; it is never part of the JSON document.
    """

    estimator: str
    loss: str
    num_params: int
    num_examples: int
    dtype: str
    normalized_norm: float
    norm: float
    ci95: tuple[float, float]
    per_layer: list[LayerResult]
    hvps: int
    seconds: float
    samples: int | None = None
    seed: int | None = None
    naive_normalized_norm: float | None = None
    ggn_normalized_norm: float | None = None
    residual_normalized_norm: float | None = None
    residual_ci95: tuple[float, float] | None = None
    checkpoint: str | None = None
    ggn_method: str | None = None
    method: str | None = None
    selection: str | None = None
    hvp_route: str | None = None
    hvp_fallback: str | None = None
    extras: dict[str, Any] | None = None
    resolved: bool = True
    sq_norm: float | None = None
    sq_norm_ci95: tuple[float, float] | None = None
    residual_resolved: bool | None = None
    residual_sq_norm: float | None = None
    residual_sq_norm_ci95: tuple[float, float] | None = None
    rtol_budget: RtolBudget | None = None
    params: list[str] | None = None
    world_size: int = 1
    examples_per_rank: list[int] | None = None
    diagonal: dict[str, Tensor] | None = field(default=None, repr=False)
    ggn_diagonal: dict[str, Tensor] | None = field(default=None, repr=False)
    residual_diagonal: dict[str, Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The result document (docs/index.md, "Result document"), without the raw diagonal."""
        doc: dict[str, Any] = {
            "hessdiag_version": __version__,
            "checkpoint": self.checkpoint,
            "estimator": self.estimator,
            "method": self.method,
            "selection": self.selection,
            "hvp_route": self.hvp_route,
            "hvp_fallback": self.hvp_fallback,
            "loss": self.loss,
            "params": None if self.params is None else list(self.params),
            "num_params": self.num_params,
            "num_examples": self.num_examples,
            "dtype": self.dtype,
            "normalized_norm": self.normalized_norm,
            "norm": self.norm,
            "ci95": list(self.ci95),
            "naive_normalized_norm": self.naive_normalized_norm,
            "samples": self.samples,
            "hvps": self.hvps,
            "seconds": round(self.seconds, 4),
            "seed": self.seed,
            "world_size": self.world_size,
            "examples_per_rank": None if self.examples_per_rank is None else list(self.examples_per_rank),
            "ggn_normalized_norm": self.ggn_normalized_norm,
            "residual_normalized_norm": self.residual_normalized_norm,
            "residual_ci95": None if self.residual_ci95 is None else list(self.residual_ci95),
            "ggn_method": self.ggn_method,
            "extras": self.extras,
            "resolved": self.resolved,
            "sq_norm": self.sq_norm,
            "sq_norm_ci95": _listed(self.sq_norm_ci95),
            "residual_resolved": self.residual_resolved,
            "residual_sq_norm": self.residual_sq_norm,
            "residual_sq_norm_ci95": _listed(self.residual_sq_norm_ci95),
            "rtol_budget": None if self.rtol_budget is None else asdict(self.rtol_budget),
            "per_layer": [],
        }
        for layer in self.per_layer:
            entry = asdict(layer)
            for key in ("ci95", "residual_ci95", "sq_norm_ci95", "residual_sq_norm_ci95"):
                entry[key] = _listed(entry[key])
            doc["per_layer"].append(entry)
        return doc

    def to_json(self, indent: int | None = 2) -> str:
        """The result document as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def any_unresolved(self) -> bool:
        """Whether any norm in the table (total, layer, residual) is unresolved."""
        flags = [self.resolved, self.residual_resolved]
        for layer in self.per_layer:
            flags += [layer.resolved, layer.residual_resolved]
        return any(flag is False for flag in flags)

    # -- rendering, by hessdiag.report ----------------------------------------------------

    def table(self) -> str:
        """Plain-text table: one row per parameter tensor, then the total (:func:`hessdiag.report.table`)."""
        from . import report

        return report.table(self)

    def total_text(self) -> str:
        """The total normalized norm as ``--quiet`` prints it: a number, or ``< hi``."""
        from . import report

        return report.total_text(self)

    def resolution_warning(self) -> str | None:
        """One line naming the unresolved totals, or ``None`` (:func:`hessdiag.report.resolution_warning`)."""
        from . import report

        return report.resolution_warning(self)

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """Per-layer bar chart (:func:`hessdiag.report.plot`); returns the matplotlib ``Axes``."""
        from . import report

        return report.plot(self, path, ax)

    def figure(self) -> Any:
        """The chart as a standalone matplotlib ``Figure`` (:func:`hessdiag.report.figure`)."""
        from . import report

        return report.figure(self)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        from . import report

        return report.html_table(self)
