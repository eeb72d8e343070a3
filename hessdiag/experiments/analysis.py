r"""The paper's three claims, tested on a sweep's ``results.jsonl`` with the seeds' spread.

For each (model, training method, data, RCT-AF order n) group the runs form curves
against ψ_max, one value per seed at each grid point. The claims (docs/findings.md) are:

(a) robust (PGD) accuracy peaks for ψ_max in the window [4, 10];
(b) the normalized norm ‖diag H‖₂/√P is U-shaped in ψ_max with its minimum in that window
    (tested for the clean and for the adversarial training loss, and for the invariant
    measure ‖θ² ⊙ diag H‖₂/√P beside them, which a rescaling of coordinates cannot move);
(c) clean accuracy drops for ψ_max below 4.

What is computed, per group and metric (:class:`Extremum`):

- the grid point where the seed mean is best (maximum of an accuracy, minimum of a norm);
- how stable that location is: the seeds at every grid point are resampled with
  replacement (``n_boot`` times, a fixed seed, so the numbers are reproducible) and the
  location recomputed; reported are the fraction of resamples whose best point lies in the
  window and the 2.5 %/97.5 % quantiles of the location;
- the shape: one-sided Welch t-tests of the best point against the grid's two ends (is the
  best point better than the smallest-ψ point, and than the largest-ψ point?). A U-shape
  (or an inverted U for accuracies) is supported when both p-values are below 0.05; a
  best point at an end of the grid has no test on that side (p = None);
- claim (a) also gets a direct test: the best in-window point against the best point
  outside the window (two-sided Welch t-test on the seeds of the two points);
- claim (c): the seeds of all grid points below 4 pooled against those in the window
  (one-sided Welch t-test, "lower below 4").

With 3 seeds per point the tests have little power: a p-value above 0.05 means "not shown
at this seed count", not "shown false". Several metrics and groups are tested, so a few
p-values below 0.05 are expected by chance; read them together with the bootstrap
fractions and the figures.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import stats as sps

from ._common import ExperimentError
from .sweep import RCT_ACTIVATION, RESULTS, read_results, record_value, records_by_id

#: The ψ_max window of the paper's claims.
CLAIM_WINDOW = (4.0, 10.0)
#: name → (value getter, "max" or "min": which end is "best", label).
METRICS: dict[str, tuple[Callable[[dict[str, Any]], float | None], str, str]] = {
    "pgd_accuracy": (record_value("pgd_accuracy"), "max", "PGD robust accuracy"),
    "autoattack_accuracy": (record_value("autoattack_accuracy"), "max", "AutoAttack robust accuracy"),
    "clean_accuracy": (record_value("clean_accuracy"), "max", "clean accuracy"),
    "norm_clean": (record_value("measure", "clean", "normalized_norm"), "min",
                   "‖diag H‖₂/√P, clean loss"),
    "norm_adversarial": (record_value("measure", "adversarial", "normalized_norm"), "min",
                         "‖diag H‖₂/√P, adversarial loss"),
    "invariant_clean": (record_value("measure", "clean", "invariant_normalized_norm"), "min",
                        "‖θ² ⊙ diag H‖₂/√P, clean loss"),
}


@dataclass(frozen=True)
class CurvePoint:
    """One grid point: ψ_max, the per-seed values, their mean and standard deviation."""

    psi: float
    values: tuple[float, ...]
    mean: float
    std: float


@dataclass(frozen=True)
class Extremum:
    """Where a metric is best along ψ_max, how stable that is, and whether the curve bends."""

    metric: str
    best: str  # "max" or "min"
    psi: float
    in_window: bool
    bootstrap_in_window: float
    bootstrap_psi_interval: tuple[float, float]
    p_vs_smallest_psi: float | None
    p_vs_largest_psi: float | None
    bends: bool  # both one-sided tests below 0.05: U-shape (min) or inverted U (max)


@dataclass(frozen=True)
class GroupAnalysis:
    """The curves and tests of one (model, method, data, n) group."""

    model: str
    method: str
    data: str
    rct_n: int
    seeds: tuple[int, ...]
    curves: dict[str, list[CurvePoint]]
    extrema: dict[str, Extremum]
    window_test_p: float | None  # claim (a): best in-window vs best out-of-window PGD point
    clean_drop: tuple[float, float, float | None] | None  # claim (c): mean below 4, in window, p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _welch(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...],
           alternative: str) -> float | None:
    """Welch's t-test p-value; None when it is undefined (fewer than 2 values, no spread)."""
    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return None
    return float(sps.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def _in_window(psi: float) -> bool:
    return CLAIM_WINDOW[0] <= psi <= CLAIM_WINDOW[1]


def _extremum(metric: str, best: str, curve: list[CurvePoint], rng: np.random.Generator,
              n_boot: int) -> Extremum:
    sign = 1.0 if best == "max" else -1.0
    means = np.array([p.mean for p in curve])
    i = int(np.argmax(sign * means))
    psis = np.array([p.psi for p in curve])
    # (n_boot, points): each column the means of the point's seeds resampled with replacement.
    resampled = np.stack([rng.choice(np.array(p.values), size=(n_boot, len(p.values))).mean(axis=1)
                          for p in curve], axis=1)
    boot = psis[np.argmax(sign * resampled, axis=1)]
    better = "greater" if best == "max" else "less"
    p_lo = _welch(curve[i].values, curve[0].values, better) if i > 0 else None
    p_hi = _welch(curve[i].values, curve[-1].values, better) if i < len(curve) - 1 else None
    lo, hi = np.quantile(np.log(boot), [0.025, 0.975])
    return Extremum(
        metric=metric, best=best, psi=float(psis[i]), in_window=_in_window(float(psis[i])),
        bootstrap_in_window=float(np.mean([_in_window(v) for v in boot])),
        bootstrap_psi_interval=(float(np.exp(lo)), float(np.exp(hi))),
        p_vs_smallest_psi=p_lo, p_vs_largest_psi=p_hi,
        bends=p_lo is not None and p_hi is not None and p_lo < 0.05 and p_hi < 0.05,
    )


def analyze_records(records: list[dict[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> list[GroupAnalysis]:
    """:class:`GroupAnalysis` per (model, method, data, n) of the RCT-AF runs in ``records``.

    Baseline activations (no ψ_max grid) are left out of the tests; groups with fewer than
    three grid points are skipped (no interior point to bend at).
    """
    groups: dict[tuple[str, str, str, int], dict[float, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in records:
        c = r.get("config", {})
        match = RCT_ACTIVATION.match(str(c.get("activation", "")))
        if match and isinstance(r.get("psi_max"), (int, float)):
            key = (str(c.get("model")), str(c.get("method")), str(c.get("data")), int(match.group(1)))
            groups[key][float(r["psi_max"])].append(r)
    out = []
    for (model, method, data, n), by_psi in sorted(groups.items()):
        if len(by_psi) < 3:
            continue
        rng = np.random.default_rng(seed)
        curves: dict[str, list[CurvePoint]] = {}
        extrema: dict[str, Extremum] = {}
        for metric, (getter, best, _label) in METRICS.items():
            curve = []
            for psi in sorted(by_psi):
                values = tuple(v for v in map(getter, by_psi[psi]) if v is not None)
                if values:
                    curve.append(CurvePoint(psi, values, float(np.mean(values)),
                                            float(np.std(values, ddof=1)) if len(values) > 1 else 0.0))
            if len(curve) >= 3:
                curves[metric] = curve
                extrema[metric] = _extremum(metric, best, curve, rng, n_boot)
        window_p = clean_drop = None
        pgd = curves.get("pgd_accuracy")
        if pgd:
            inside = [p for p in pgd if _in_window(p.psi)]
            outside = [p for p in pgd if not _in_window(p.psi)]
            if inside and outside:
                window_p = _welch(max(inside, key=lambda p: p.mean).values,
                                  max(outside, key=lambda p: p.mean).values, "two-sided")
        clean = curves.get("clean_accuracy")
        if clean:
            below = [v for p in clean if p.psi < CLAIM_WINDOW[0] for v in p.values]
            inside_v = [v for p in clean if _in_window(p.psi) for v in p.values]
            if below and inside_v:
                clean_drop = (float(np.mean(below)), float(np.mean(inside_v)),
                              _welch(below, inside_v, "less"))
        seeds = tuple(sorted({int(r["config"]["seed"]) for rs in by_psi.values() for r in rs}))
        out.append(GroupAnalysis(model, method, data, n, seeds, curves, extrema, window_p, clean_drop))
    return out


def analyze_sweep(results_dir: str | os.PathLike[str], **kwargs: Any) -> list[GroupAnalysis]:
    """:func:`analyze_records` on ``DIR/results.jsonl``."""
    source = Path(results_dir) / RESULTS
    records = list(records_by_id(read_results(source)).values())
    if not records:
        raise ExperimentError(f"{source} holds no results (run hessdiag sweep first)")
    analyses = analyze_records(records, **kwargs)
    if not analyses:
        raise ExperimentError(f"{source}: no RCT-AF group with 3 or more ψ_max points to analyze")
    return analyses


def _p(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3g}"


def render_markdown(analyses: list[GroupAnalysis]) -> str:
    """The tables of docs/findings.md, per group: the tests (one row per metric), then the
    curves (seed mean ± standard deviation at every ψ_max)."""
    lo, hi = CLAIM_WINDOW
    lines = []
    for g in analyses:
        lines += [f"### {g.model}, {g.method}, {g.data}, RCT-AF n = {g.rct_n} "
                  f"(seeds {', '.join(map(str, g.seeds))})", ""]
        lines += ["| metric | best at ψ_max | seed mean ± std there | in [4, 10] (bootstrap) "
                  "| 95 % range of the location | p vs smallest ψ | p vs largest ψ | bends |",
                  "|---|---|---|---|---|---|---|---|"]
        for metric, e in g.extrema.items():
            point = next(p for p in g.curves[metric] if p.psi == e.psi)
            word = "max" if e.best == "max" else "min"
            lines.append(
                f"| {METRICS[metric][2]} ({word}) | {e.psi:g} | {point.mean:.4g} ± {point.std:.2g} "
                f"| {'yes' if e.in_window else 'no'} ({e.bootstrap_in_window:.0%}) "
                f"| {e.bootstrap_psi_interval[0]:g}–{e.bootstrap_psi_interval[1]:g} "
                f"| {_p(e.p_vs_smallest_psi)} | {_p(e.p_vs_largest_psi)} | {'yes' if e.bends else 'no'} |")
        lines.append("")
        metrics = list(g.curves)
        psis = sorted({p.psi for m in metrics for p in g.curves[m]})
        lines += ["| ψ_max | " + " | ".join(METRICS[m][2] for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for psi in psis:
            cells = []
            for m in metrics:
                at = next((p for p in g.curves[m] if p.psi == psi), None)
                cells.append("—" if at is None else f"{at.mean:.4g} ± {at.std:.2g}")
            lines.append(f"| {psi:g} | " + " | ".join(cells) + " |")
        lines.append("")
        if g.window_test_p is not None:
            lines.append(f"Claim (a), best PGD point in [{lo:g}, {hi:g}] vs best outside: "
                         f"p = {_p(g.window_test_p)} (two-sided Welch).")
        if g.clean_drop is not None:
            below, inside, p = g.clean_drop
            lines.append(f"Claim (c), clean accuracy below ψ_max {lo:g} vs in the window: "
                         f"{below:.4f} vs {inside:.4f}, p = {_p(p)} (one-sided Welch, lower below).")
        lines.append("")
    return "\n".join(lines)


def write_analysis(analyses: list[GroupAnalysis], path: str | os.PathLike[str]) -> None:
    """The analyses as one JSON document, atomically."""
    from ..io.files import atomic_write_text

    atomic_write_text(path, json.dumps([g.to_dict() for g in analyses], indent=1, sort_keys=True,
                                       allow_nan=False) + "\n")
