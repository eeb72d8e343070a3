r"""Figures of a sweep's ``results.jsonl``: curvature, robustness and accuracy against ψ_max.

:func:`plot_sweep` draws, for each (model, training method, data) group, one figure with
six panels against ψ_max on a log axis: the normalized norm ‖diag H‖₂/√P of the clean and
of the adversarial training loss, PGD-20 robust accuracy (AutoAttack too where recorded),
clean accuracy, the GGN/residual split of the clean loss's diagonal, and the invariant
measure ‖θ² ⊙ diag H‖₂/√P. One line per RCT-AF order n, mean ± standard deviation over
seeds; baseline activations are markers at their ψ_max where it is finite. Each figure is
written as PNG and PDF. matplotlib (Agg backend) is imported inside the function only.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._common import ExperimentError
from .sweep import RCT_ACTIVATION, RESULTS, read_results, record_value, records_by_id

# (panel title, y label, [(label suffix, getter, line style)], log y axis when all positive)
PANELS = [
    ("normalized norm, clean loss", "‖diag H‖₂/√P",
     [("", record_value("measure", "clean", "normalized_norm"), "-")], True),
    ("normalized norm, adversarial loss", "‖diag H‖₂/√P",
     [("", record_value("measure", "adversarial", "normalized_norm"), "-")], True),
    ("robust accuracy", "accuracy", [("PGD-20", record_value("pgd_accuracy"), "-"),
                                     ("AutoAttack", record_value("autoattack_accuracy"), ":")], False),
    ("clean accuracy", "accuracy", [("", record_value("clean_accuracy"), "-")], False),
    ("GGN / residual split, clean loss", "normalized norm",
     [("GGN", record_value("measure", "clean", "ggn_normalized_norm"), "-"),
      ("residual", record_value("measure", "clean", "residual_normalized_norm"), "--")], True),
    ("invariant measure, clean loss", "‖θ² ⊙ diag H‖₂/√P",
     [("", record_value("measure", "clean", "invariant_normalized_norm"), "-")], True),
]


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_sweep(results_dir: str | os.PathLike[str], prefix: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write ``PREFIX-<model>-<method>[-<data>].{png,pdf}`` per group; return the paths.

    ``prefix`` defaults to ``DIR/figures/sweep``. Raises :class:`ExperimentError` when
    ``DIR/results.jsonl`` holds no record.
    """
    # The Agg canvas is attached to each figure explicitly: no global backend switch, no pyplot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    source = Path(results_dir) / RESULTS
    records = list(records_by_id(read_results(source)).values())
    if not records:
        raise ExperimentError(f"{source} holds no results (run hessdiag sweep first)")
    base = Path(prefix) if prefix is not None else Path(results_dir) / "figures" / "sweep"
    base.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        c = r.get("config", {})
        groups[(c.get("model", "?"), c.get("method", "?"), c.get("data", "?"))].append(r)
    several_data = len({key[2] for key in groups}) > 1
    written: list[Path] = []
    for (model, method, data), group in sorted(groups.items()):
        fig = Figure(figsize=(15, 8.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 3).ravel()
        for ax, (title, ylabel, series, log_y) in zip(axes, PANELS):
            ax.set_xscale("log")
            xs = _panel(ax, group, series, log_y)
            ax.set_title(title)
            ax.set_xlabel("ψ_max (log scale)")
            ax.set_ylabel(ylabel)
            if xs:  # label the ψ_max values present, not the decades
                ax.set_xticks(xs, [f"{x:.3g}" for x in xs])
                ax.xaxis.set_minor_formatter(NullFormatter())
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        seeds = sorted({r["config"].get("seed") for r in group})
        unplaced = sorted({r["config"].get("activation") for r in group
                           if not RCT_ACTIVATION.match(r["config"].get("activation", ""))
                           and not isinstance(r.get("psi_max"), (int, float))})
        note = f" ({', '.join(unplaced)}: ψ_max = ∞, not shown)" if unplaced else ""
        fig.suptitle(f"{model}, {method}, {data}: mean ± std over seeds {seeds}{note}")
        name = f"{base.name}-{_slug(model)}-{_slug(method)}" + (f"-{_slug(data)}" if several_data else "")
        for ext in ("png", "pdf"):
            path = base.with_name(f"{name}.{ext}")
            fig.savefig(path, dpi=120)
            written.append(path)
    return written


def _panel(ax: Any, group: list[dict[str, Any]], series: list[Any], log_y: bool) -> list[float]:
    """Draw one panel; return the ψ_max values placed on its axis."""
    rct: dict[int, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    baselines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in group:
        act = r["config"].get("activation", "")
        match = RCT_ACTIVATION.match(act)
        if match and isinstance(r.get("psi_max"), (int, float)):
            rct[int(match.group(1))][float(r["psi_max"])].append(r)
        else:
            baselines[act].append(r)
    positive = True
    placed: set[float] = set()
    color = 0  # one color per RCT-AF order or baseline, the same in every panel
    for n in sorted(rct):
        for (suffix, getter, style), marker in zip(series, "o^"):
            xs, means, stds = [], [], []
            for psi in sorted(rct[n]):
                values = [v for v in map(getter, rct[n][psi]) if v is not None]
                if values:
                    m, s = _stats(values)
                    xs.append(psi)
                    means.append(m)
                    stds.append(s)
                    positive &= m - s > 0 and m > 0
            if xs:
                placed.update(xs)
                label = f"RCT-AF n={n}" + (f" {suffix}" if suffix else "")
                ax.errorbar(xs, means, yerr=stds, fmt=marker + style, color=f"C{color % 10}",
                            capsize=3, label=label)
        color += 1
    for act in sorted(baselines):
        baseline_psi = baselines[act][0].get("psi_max")
        if not isinstance(baseline_psi, (int, float)) or not math.isfinite(baseline_psi):
            continue  # ψ_max = ∞ (ReLU): no place on the axis
        for (suffix, getter, _style), marker in zip(series, "sD"):
            values = [v for v in map(getter, baselines[act]) if v is not None]
            if values:
                m, s = _stats(values)
                positive &= m - s > 0 and m > 0
                placed.add(float(baseline_psi))
                ax.errorbar([baseline_psi], [m], yerr=[s], fmt=marker, color=f"C{color % 10}", capsize=3,
                            label=act + (f" {suffix}" if suffix else ""))
        color += 1
    if log_y and positive and ax.has_data():
        ax.set_yscale("log")
    return sorted(placed)
