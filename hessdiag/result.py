"""The result of a measurement: totals, per-layer norms, JSON (docs/index.md, "Result document"), table, plot.

For a diagonal d ∈ R^P the reported number is the normalized norm ‖d‖₂/√P, the
root-mean-square of the diagonal; per parameter tensor ("layer") ‖d_block‖₂/√P_block.
Stochastic estimators supply unbiased squared norms with intervals; exact ones report a
zero-width interval ``[x, x]``. The same holds for the residual d_res = d − d_GGN of the
GGN split (``residual_ci95``); d_GGN itself is always exact.

Unresolved estimates. A stochastic norm is *resolved* when its unbiased squared norm is
positive and its 95 % interval's half-width on the norm scale is at most half the
estimate (:func:`hessdiag.stats.is_resolved`); exact norms always are. An unresolved norm
keeps its numbers (``normalized_norm`` clipped at 0, ``ci95``, the raw ``sq_norm`` and
``sq_norm_ci95``) with ``resolved = False``, and the table prints it as ``< hi``, the
interval's upper end, instead of a number (docs/cli.md, "Output").
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._version import __version__
from .estimators.base import DiagonalEstimate, NormStatistics
from .ggn import GGNSplit
from .stats import RESOLVED_HALF_WIDTH, ProbeBudget, is_resolved, probes_for_rtol


def normalized_norm(diagonal: Tensor | dict[str, Tensor]) -> float:
    """‖d‖₂/√P of a diagonal given as one tensor or a dict of tensors."""
    parts = list(diagonal.values()) if isinstance(diagonal, dict) else [diagonal]
    sq = sum(float(p.double().pow(2).sum()) for p in parts)
    num = sum(p.numel() for p in parts)
    return math.sqrt(sq / num)


def _rms(sq_norm: float, num_params: int) -> float:
    """√(max(s, 0)/P): an unbiased estimate of ‖d‖² may be negative by chance."""
    return math.sqrt(max(sq_norm, 0.0) / num_params)


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
    (:meth:`Result.resolution_warning`). Silence it locally with
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


def _exact_statistics(diagonal: dict[str, Tensor]) -> dict[str, NormStatistics]:
    """Squared norms per block and ``"total"`` of a known diagonal, zero-width intervals."""
    sq = {name: float(d.double().pow(2).sum()) for name, d in diagonal.items()}
    sq["total"] = sum(sq.values())
    return {k: NormStatistics(v, (v, v)) for k, v in sq.items()}


def _listed(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else list(pair)


def _value_cell(value: float, ci: tuple[float, float] | None, resolved: bool | None) -> str:
    """A norm for the table: the number when resolved, else ``< hi`` (the 95 % upper end)."""
    if resolved is False and ci is not None:
        return f"< {ci[1]:.6g}"
    return f"{value:.6g}"


_WIDE = f"±{RESOLVED_HALF_WIDTH * 100:g} %"


def _describe(label: str, value: float, ci: tuple[float, float], sq_norm: float | None) -> str:
    """An unresolved norm in words, for the one-line warning."""
    if sq_norm is not None and sq_norm <= 0:
        return f"{label} < {ci[1]:.3g} (unbiased squared norm {sq_norm:.3g} ≤ 0)"
    return f"{label} {value:.3g}, 95 % interval [{ci[0]:.3g}, {ci[1]:.3g}] (wider than {_WIDE})"


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

    @classmethod
    def from_estimate(
        cls,
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
        """Assemble totals and per-layer norms from an estimator's output.

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
        (:meth:`hessdiag.objective.Objective.batch_hvp`).

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
        return cls(
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

    # -- resolution ---------------------------------------------------------------------

    def probes_for_rtol(self, rtol: float) -> ProbeBudget | None:
        """Probes the observed variance implies for a relative half-width ``rtol`` of the
        total and (when it has an interval) the GGN residual: the larger of the two
        (:func:`hessdiag.stats.probes_for_rtol`), a lower bound if either is one; ``None``
        for exact estimators."""
        if self.samples is None:
            return None
        budgets = [probes_for_rtol(sq, ci, self.samples, rtol)
                   for sq, ci in ((self.sq_norm, self.sq_norm_ci95),
                                  (self.residual_sq_norm, self.residual_sq_norm_ci95))
                   if sq is not None and ci is not None]
        found = [b for b in budgets if b is not None]
        if not found:
            return None
        return ProbeBudget(max(b.probes for b in found), any(b.at_least for b in found))

    def resolution_warning(self) -> str | None:
        """One line naming the unresolved totals and the budget ``rtol`` needs (``rtol_budget``);
        ``None`` when the total and the residual (if it has an interval) are resolved."""
        parts = []
        if not self.resolved:
            parts.append(_describe("‖d‖/√P", self.normalized_norm, self.ci95, self.sq_norm))
        if self.residual_resolved is False:
            parts.append(_describe("residual", self.residual_normalized_norm or 0.0,
                                   self.residual_ci95 or (0.0, 0.0), self.residual_sq_norm))
        if not parts:
            return None
        budget = self.rtol_budget
        spent = (f"{self.samples:,} replicates" if budget is not None and budget.unit == "replicates"
                 else f"{self.hvps:,} HVPs")
        text = f"{self.estimator}: unresolved after {spent}: " + "; ".join(parts)
        if budget is None:
            return text + "; raise the budget (--samples / samples=)"
        how = "at least" if budget.at_least else "about"
        text += (f"; rtol {budget.rtol:g} needs {how} {budget.samples:,} {budget.unit} by the "
                 f"observed variance (--samples {budget.samples} / samples={budget.samples})")
        if budget.unit == "HVPs" and budget.samples >= self.num_params:
            text += f", the exact estimator at most {self.num_params:,}"
        return text

    # -- serialization ------------------------------------------------------------------

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
            "world_size": self.world_size,
            "examples_per_rank": None if self.examples_per_rank is None else list(self.examples_per_rank),
            "dtype": self.dtype,
            "normalized_norm": self.normalized_norm,
            "norm": self.norm,
            "ci95": list(self.ci95),
            "naive_normalized_norm": self.naive_normalized_norm,
            "samples": self.samples,
            "hvps": self.hvps,
            "seconds": round(self.seconds, 4),
            "seed": self.seed,
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

    # -- presentation -------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, ...]]:
        split = self.ggn_normalized_norm is not None
        # The residual's interval gets a column only where it has a width (stochastic).
        res_ci = split and self.samples is not None and self.residual_ci95 is not None
        head = ("tensor", "params", "‖d‖/√P", "95% interval") + (("GGN", "residual") if split else ())
        head += ("residual 95%",) if res_ci else ()
        rows = [head]
        entries = [(layer.name, layer.num_params, layer.normalized_norm, layer.ci95, layer.ggn_normalized_norm,
                    layer.residual_normalized_norm, layer.residual_ci95, layer.resolved,
                    layer.residual_resolved) for layer in self.per_layer]
        entries.append(("total", self.num_params, self.normalized_norm, self.ci95,
                        self.ggn_normalized_norm, self.residual_normalized_norm,
                        self.residual_ci95, self.resolved, self.residual_resolved))
        for name, num, value, ci, ggn, res, rci, ok, res_ok in entries:
            row: tuple[str, ...] = (name, f"{num:,}", _value_cell(value, ci, ok), f"[{ci[0]:.6g}, {ci[1]:.6g}]")
            if split:
                row += (f"{ggn:.6g}" if ggn is not None else "-",
                        _value_cell(res, rci, res_ok) if res is not None else "-")
            if res_ci:
                row += (f"[{rci[0]:.6g}, {rci[1]:.6g}]" if rci is not None else "-",)
            rows.append(row)
        return rows

    def table(self) -> str:
        """Plain-text table: one row per parameter tensor, then the total."""
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for i, row in enumerate(rows):
            cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        how = f" ({self.method})" if self.method else ""
        extra = f"estimator={self.estimator}{how}  {self._route()}{self._selection()}loss={self.loss}  " \
                f"N={self.num_examples:,}  dtype={self.dtype}  HVPs={self.hvps:,}  {self.seconds:.2f} s"
        if self.naive_normalized_norm is not None:
            extra += f"  naive={self.naive_normalized_norm:.6g}"
        chosen = [f"chosen by auto: {self.selection}"] if self.selection else []
        return "\n".join(lines + [extra] + chosen + self._ranks() + self._legend() + self._extras_lines())

    def _ranks(self) -> list[str]:
        """``ranks=2  examples per rank: 899, 898`` after a distributed run; nothing otherwise."""
        if self.world_size == 1:
            return []
        shares = "" if self.examples_per_rank is None else \
            f"  examples per rank: {', '.join(f'{n:,}' for n in self.examples_per_rank)}"
        return [f"ranks={self.world_size}{shares}"]

    def _selection(self) -> str:
        """``params=layer4.*,fc.bias  `` for a parameter selection, or nothing."""
        return "" if self.params is None else f"params={','.join(self.params)}  "

    def _route(self) -> str:
        """``hvp-route=func  `` (with ``(fallback)`` after a fall back), or nothing."""
        if self.hvp_route is None:
            return ""
        return f"hvp-route={self.hvp_route}{' (fallback)' if self.hvp_fallback else ''}  "

    def any_unresolved(self) -> bool:
        """Whether any norm in the table (total, layer, residual) is unresolved."""
        flags = [self.resolved, self.residual_resolved]
        for layer in self.per_layer:
            flags += [layer.resolved, layer.residual_resolved]
        return any(flag is False for flag in flags)

    def _legend(self) -> list[str]:
        if not self.any_unresolved():
            return []
        line = (f"< x: unresolved (95 % interval wider than {_WIDE} of the estimate, or unbiased "
                f"squared norm ≤ 0); x is the interval's upper end")
        budget = self.rtol_budget
        if budget is not None and (not self.resolved or self.residual_resolved is False):
            how = "at least" if budget.at_least else "about"
            line += f"; rtol {budget.rtol:g} needs {how} {budget.samples:,} {budget.unit}"
        return [line]

    def total_text(self) -> str:
        """The total normalized norm as ``--quiet`` prints it: a number, or ``< hi``."""
        return _value_cell(self.normalized_norm, self.ci95, self.resolved)

    def _extras_lines(self) -> list[str]:
        if not self.extras:
            return []
        parts = []
        if "trace" in self.extras:
            lo, hi = self.extras["trace_ci95"]
            parts.append(f"trace={self.extras['trace']:.6g} [{lo:.6g}, {hi:.6g}] "
                         f"({self.extras['trace_probes']} probes)")
            if "diagonal_sum" in self.extras:
                parts.append(f"sum(diag)={self.extras['diagonal_sum']:.6g}")
        if "top_eigenvalues" in self.extras:
            parts.append("top eigenvalues=" + ", ".join(f"{e:.6g}" for e in self.extras["top_eigenvalues"]))
        return ["  ".join(parts) + f"  ({self.extras['method']}, {self.extras['hvps']} HVPs)"]

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        rows = self._rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
        )
        legend = "".join(f"<p>{html.escape(line)}</p>" for line in self._legend())
        return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"<p>estimator={html.escape(self.estimator)}, "
                f"{html.escape(self._route().strip())}{', ' if self.hvp_route else ''}"
                f"loss={html.escape(self.loss)}, "
                f"N={self.num_examples}, HVPs={self.hvps}</p>{legend}")

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """Per-layer bar chart of the normalized norm with 95 % intervals.

        Returns the matplotlib ``Axes``. With ``ax``, draws on it. With ``path``, saves the
        figure (format from the extension: png, svg, pdf), drawn on a standalone
        :meth:`figure`. Otherwise the figure is a pyplot one, for Jupyter and
        ``plt.show()``. Matplotlib's backend is never switched.
        """
        if ax is not None:
            self._draw(ax)
            return ax
        if path is not None:
            fig = self.figure()
            fig.savefig(path)
            return fig.axes[0]
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=self._figure_size())
        self._draw(fig.add_subplot())
        fig.tight_layout()
        return fig.axes[0]

    def figure(self) -> Any:
        """The chart of :meth:`plot` as a standalone matplotlib ``Figure`` on its own Agg
        canvas: it renders to files (``fig.savefig``) without pyplot, without switching
        the backend, and without registering an open figure."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=self._figure_size())
        FigureCanvasAgg(fig)
        self._draw(fig.add_subplot())
        fig.tight_layout()
        return fig

    def _figure_size(self) -> tuple[float, float]:
        return max(4.0, 0.6 * len(self.per_layer) + 2), 3.5

    def _draw(self, ax: Any) -> None:
        names = [layer.name for layer in self.per_layer]
        values = [layer.normalized_norm for layer in self.per_layer]
        lower = [layer.normalized_norm - layer.ci95[0] for layer in self.per_layer]
        upper = [layer.ci95[1] - layer.normalized_norm for layer in self.per_layer]
        colors = ["tab:blue" if layer.resolved else "lightgray" for layer in self.per_layer]
        bars = ax.bar(range(len(names)), values, yerr=[lower, upper], capsize=3, color=colors)
        unresolved = [bar for bar, layer in zip(bars, self.per_layer) if not layer.resolved]
        for bar in unresolved:
            bar.set_hatch("//")
        if unresolved:
            unresolved[0].set_label("unresolved: only the upper end is known")
        total = (f"total {self.normalized_norm:.4g}" if self.resolved
                 else f"total < {self.ci95[1]:.4g} (unresolved)")
        ax.axhline(self.normalized_norm, color="tab:red", ls="--", label=total)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("‖diag H‖₂ / √P")
        ax.set_title(f"Hessian diagonal per tensor ({self.estimator}, {self.loss})")
        ax.legend(fontsize=8)
