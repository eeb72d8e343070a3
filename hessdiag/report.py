"""Rendering of a :class:`~hessdiag.result.Result`: the text table, the ``--quiet`` total,
the HTML table for Jupyter, the one-line warning for unresolved estimates and the per-layer
chart (docs/cli.md, "Output"). Functions of plain data; they compute nothing new.

Unresolved norms print as ``< hi``, the 95 % interval's upper end (docs/index.md,
"Stochastic estimators").
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .result import LayerResult, Result
from .stats import RESOLVED_HALF_WIDTH


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


def _rows(result: Result) -> list[tuple[str, ...]]:
    split = result.ggn_normalized_norm is not None
    # The residual's interval gets a column only where it has a width (stochastic).
    res_ci = split and result.samples is not None and result.residual_ci95 is not None
    head = ("tensor", "params", "‖d‖/√P", "95% interval") + (("GGN", "residual") if split else ())
    head += ("residual 95%",) if res_ci else ()
    rows = [head]
    entries = [(layer.name, layer.num_params, layer.normalized_norm, layer.ci95, layer.ggn_normalized_norm,
                layer.residual_normalized_norm, layer.residual_ci95, layer.resolved,
                layer.residual_resolved) for layer in result.per_layer]
    entries.append(("total", result.num_params, result.normalized_norm, result.ci95,
                    result.ggn_normalized_norm, result.residual_normalized_norm,
                    result.residual_ci95, result.resolved, result.residual_resolved))
    for name, num, value, ci, ggn, res, rci, ok, res_ok in entries:
        row: tuple[str, ...] = (name, f"{num:,}", _value_cell(value, ci, ok), f"[{ci[0]:.6g}, {ci[1]:.6g}]")
        if split:
            row += (f"{ggn:.6g}" if ggn is not None else "-",
                    _value_cell(res, rci, res_ok) if res is not None else "-")
        if res_ci:
            row += (f"[{rci[0]:.6g}, {rci[1]:.6g}]" if rci is not None else "-",)
        rows.append(row)
    return rows


def table(result: Result) -> str:
    """Plain-text table: one row per parameter tensor, then the total."""
    rows = _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    how = f" ({result.method})" if result.method else ""
    extra = f"estimator={result.estimator}{how}  {_route(result)}{_selection(result)}loss={result.loss}  " \
            f"N={result.num_examples:,}  dtype={result.dtype}  HVPs={result.hvps:,}  {result.seconds:.2f} s"
    if result.naive_normalized_norm is not None:
        extra += f"  naive={result.naive_normalized_norm:.6g}"
    chosen = [f"chosen by auto: {result.selection}"] if result.selection else []
    return "\n".join(lines + [extra] + chosen + _ranks(result) + _legend(result) + _extras_lines(result))


def _ranks(result: Result) -> list[str]:
    """``ranks=2  examples per rank: 899, 898`` after a distributed run; nothing otherwise."""
    if result.world_size == 1:
        return []
    shares = "" if result.examples_per_rank is None else \
        f"  examples per rank: {', '.join(f'{n:,}' for n in result.examples_per_rank)}"
    return [f"ranks={result.world_size}{shares}"]


def _selection(result: Result) -> str:
    """``params=layer4.*,fc.bias  `` for a parameter selection, or nothing."""
    return "" if result.params is None else f"params={','.join(result.params)}  "


def _route(result: Result) -> str:
    """``hvp-route=func  `` (with ``(fallback)`` after a fall back), or nothing."""
    if result.hvp_route is None:
        return ""
    return f"hvp-route={result.hvp_route}{' (fallback)' if result.hvp_fallback else ''}  "


def _legend(result: Result) -> list[str]:
    if not result.any_unresolved():
        return []
    line = (f"< x: unresolved (95 % interval wider than {_WIDE} of the estimate, or unbiased "
            f"squared norm ≤ 0); x is the interval's upper end")
    budget = result.rtol_budget
    if budget is not None and (not result.resolved or result.residual_resolved is False):
        how = "at least" if budget.at_least else "about"
        line += f"; rtol {budget.rtol:g} needs {how} {budget.samples:,} {budget.unit}"
    return [line]


def total_text(result: Result) -> str:
    """The total normalized norm as ``--quiet`` prints it: a number, or ``< hi``."""
    return _value_cell(result.normalized_norm, result.ci95, result.resolved)


def _extras_lines(result: Result) -> list[str]:
    if not result.extras:
        return []
    parts = []
    if "trace" in result.extras:
        lo, hi = result.extras["trace_ci95"]
        parts.append(f"trace={result.extras['trace']:.6g} [{lo:.6g}, {hi:.6g}] "
                     f"({result.extras['trace_probes']} probes)")
        if "diagonal_sum" in result.extras:
            parts.append(f"sum(diag)={result.extras['diagonal_sum']:.6g}")
    if "top_eigenvalues" in result.extras:
        parts.append("top eigenvalues=" + ", ".join(f"{e:.6g}" for e in result.extras["top_eigenvalues"]))
    return ["  ".join(parts) + f"  ({result.extras['method']}, {result.extras['hvps']} HVPs)"]


def html_table(result: Result) -> str:
    rows = _rows(result)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    legend = "".join(f"<p>{html.escape(line)}</p>" for line in _legend(result))
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>estimator={html.escape(result.estimator)}, "
            f"{html.escape(_route(result).strip())}{', ' if result.hvp_route else ''}"
            f"loss={html.escape(result.loss)}, "
            f"N={result.num_examples}, HVPs={result.hvps}</p>{legend}")


def resolution_warning(result: Result) -> str | None:
    """One line naming the unresolved totals and the budget ``rtol`` needs (``rtol_budget``);
    ``None`` when the total and the residual (if it has an interval) are resolved."""
    parts = []
    if not result.resolved:
        parts.append(_describe("‖d‖/√P", result.normalized_norm, result.ci95, result.sq_norm))
    if result.residual_resolved is False:
        parts.append(_describe("residual", result.residual_normalized_norm or 0.0,
                               result.residual_ci95 or (0.0, 0.0), result.residual_sq_norm))
    if not parts:
        return None
    budget = result.rtol_budget
    spent = (f"{result.samples:,} replicates" if budget is not None and budget.unit == "replicates"
             else f"{result.hvps:,} HVPs")
    text = f"{result.estimator}: unresolved after {spent}: " + "; ".join(parts)
    if budget is None:
        return text + "; raise the budget (--samples / samples=)"
    how = "at least" if budget.at_least else "about"
    text += (f"; rtol {budget.rtol:g} needs {how} {budget.samples:,} {budget.unit} by the "
             f"observed variance (--samples {budget.samples} / samples={budget.samples})")
    if budget.unit == "HVPs" and budget.samples >= result.num_params:
        text += f", the exact estimator at most {result.num_params:,}"
    return text


def plot(result: Result, path: str | Path | None = None, ax: Any = None) -> Any:
    """Per-layer bar chart of the normalized norm with 95 % intervals (:func:`draw`).

    Returns the matplotlib ``Axes``. With ``ax``, draws on it. With ``path``, saves the
    figure (format from the extension: png, svg, pdf), drawn on a standalone
    :func:`figure`. Otherwise the figure is a pyplot one, for Jupyter and
    ``plt.show()``. Matplotlib's backend is never switched.
    """
    if ax is not None:
        draw(result, ax)
        return ax
    if path is not None:
        fig = figure(result)
        fig.savefig(path)
        return fig.axes[0]
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=_figure_size(result))
    draw(result, fig.add_subplot())
    fig.tight_layout()
    return fig.axes[0]


def figure(result: Result) -> Any:
    """The chart of :func:`plot` as a standalone matplotlib ``Figure`` on its own Agg
    canvas: it renders to files (``fig.savefig``) without pyplot, without switching
    the backend, and without registering an open figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_figure_size(result))
    FigureCanvasAgg(fig)
    draw(result, fig.add_subplot())
    fig.tight_layout()
    return fig


def _figure_size(result: Result) -> tuple[float, float]:
    return max(4.0, 0.6 * len(result.per_layer) + 2), 3.5


def split_shares(layer: LayerResult) -> tuple[float, float] | None:
    """The heights of a layer's GGN and residual segments in the stacked bar, or ``None``
    without a split.

    The bar's height is the layer's normalized norm ‖d‖/√P. The parts' norms do not add up
    to it (d_GGN and d_res may cancel entry by entry), so the bar is divided in proportion
    to ‖d_GGN‖² and ‖d_res‖²: the segments show which part carries the curvature's
    magnitude, the bar what was measured.
    """
    ggn, residual = layer.ggn_normalized_norm, layer.residual_normalized_norm
    if ggn is None or residual is None:
        return None
    energy = ggn ** 2 + residual ** 2
    if energy == 0:
        return 0.0, 0.0
    return layer.normalized_norm * ggn ** 2 / energy, layer.normalized_norm * residual ** 2 / energy


def draw(result: Result, ax: Any) -> None:
    """Bars of ‖d_block‖/√P per parameter tensor with their 95 % intervals and the total
    as a dashed line; with a GGN/residual split, each bar stacked by :func:`split_shares`.
    Unresolved layers are grey and hatched (only their upper end is known)."""
    layers = result.per_layer
    positions = range(len(layers))
    lower = [layer.normalized_norm - layer.ci95[0] for layer in layers]
    upper = [layer.ci95[1] - layer.normalized_norm for layer in layers]
    shares = [split_shares(layer) for layer in layers]
    if all(share is not None for share in shares):
        ggn = [share[0] for share in shares if share is not None]
        residual = [share[1] for share in shares if share is not None]
        ax.bar(positions, ggn, color="tab:blue", label="GGN share (∝ ‖d_GGN‖²)")
        bars = ax.bar(positions, residual, bottom=ggn, yerr=[lower, upper], capsize=3,
                      color="tab:orange", label="residual share (∝ ‖d_res‖²)")
    else:
        colors = ["tab:blue" if layer.resolved else "lightgray" for layer in layers]
        bars = ax.bar(positions, [layer.normalized_norm for layer in layers], yerr=[lower, upper],
                      capsize=3, color=colors)
    unresolved = [bar for bar, layer in zip(bars, layers) if not layer.resolved]
    for bar in unresolved:
        bar.set_hatch("//")
    if unresolved:
        unresolved[0].set_label("unresolved: only the upper end is known")
    total = (f"total {result.normalized_norm:.4g}" if result.resolved
             else f"total < {result.ci95[1]:.4g} (unresolved)")
    ax.axhline(result.normalized_norm, color="tab:red", ls="--", label=total)
    ax.set_xticks(positions, [layer.name for layer in layers], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("‖diag H‖₂ / √P")
    ax.set_title(f"Hessian diagonal per tensor ({result.estimator}, {result.loss})")
    ax.legend(fontsize=8)
