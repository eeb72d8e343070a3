"""The claim tests of hessdiag.experiments.analysis on synthetic sweeps with known answers."""

import json
import math

import numpy as np
import pytest

from hessdiag.cli import main
from hessdiag.experiments.analysis import analyze_records, analyze_sweep, render_markdown
from hessdiag.experiments.sweep import RESULTS

PSIS = [0.5, 1.0, 2.0, 4.0, 7.0, 10.0, 16.0, 32.0]


def _records(norm, pgd, clean, seeds=(0, 1, 2), noise=0.01, model="mlp", method="pgd-at"):
    """One record per (ψ, seed): metric(ψ) · (1 + noise·z), z from a seeded generator."""
    rng = np.random.default_rng(1)
    out = []
    for psi in PSIS:
        for seed in seeds:
            def jitter(f):
                return f(psi) * (1.0 + noise * rng.standard_normal())
            out.append({
                "id": f"{model}-{method}-{psi}-{seed}",
                "config": {"model": model, "method": method, "data": "digits", "seed": seed,
                           "activation": f"rct:n=1,psi={psi}"},
                "psi_max": psi, "pgd_accuracy": jitter(pgd), "clean_accuracy": jitter(clean),
                "autoattack_accuracy": None,
                "measure": {
                    "clean": {"normalized_norm": jitter(norm), "invariant_normalized_norm": jitter(norm)},
                    "adversarial": {"normalized_norm": jitter(norm)},
                },
            })
    # A baseline is not part of any ψ_max curve.
    relu = {"model": model, "method": method, "data": "digits", "seed": 0, "activation": "relu"}
    out.append({"id": f"{model}-{method}-relu", "config": relu, "psi_max": None, "pgd_accuracy": 0.1,
                "clean_accuracy": 0.9, "measure": {}})
    return out


def u_shape(psi):  # minimum at ψ = 7
    return 1.0 + (math.log(psi) - math.log(7.0)) ** 2


def peak(psi):  # maximum at ψ = 7
    return 0.8 - 0.05 * (math.log(psi) - math.log(7.0)) ** 2


def rising(psi):  # monotone, best at the largest ψ
    return 0.5 + 0.01 * math.log(psi)


def test_a_u_shape_with_its_minimum_in_the_window_is_found():
    (g,) = analyze_records(_records(u_shape, peak, lambda p: 0.9 if p < 4 else 0.97), n_boot=300)
    assert (g.model, g.method, g.rct_n, g.seeds) == ("mlp", "pgd-at", 1, (0, 1, 2))
    for metric in ("norm_clean", "norm_adversarial", "invariant_clean"):
        e = g.extrema[metric]
        assert e.best == "min" and e.psi == 7.0 and e.in_window and e.bends
        assert e.bootstrap_in_window > 0.9 and e.p_vs_smallest_psi < 0.01 and e.p_vs_largest_psi < 0.01
    e = g.extrema["pgd_accuracy"]
    assert e.best == "max" and e.psi == 7.0 and e.bends
    assert g.window_test_p is not None and g.window_test_p < 0.05
    below, inside, p = g.clean_drop
    assert below == pytest.approx(0.9, rel=0.02) and inside == pytest.approx(0.97, rel=0.02) and p < 1e-3
    assert "autoattack_accuracy" not in g.extrema  # no values recorded


def test_a_monotone_curve_does_not_bend_and_has_no_test_at_its_end():
    (g,) = analyze_records(_records(lambda p: 1.0 / p, rising, lambda p: 0.95), n_boot=300)
    e = g.extrema["norm_clean"]
    assert e.psi == 32.0 and not e.in_window and not e.bends
    assert e.p_vs_largest_psi is None and e.p_vs_smallest_psi < 0.01
    assert e.bootstrap_in_window < 0.05
    assert g.extrema["pgd_accuracy"].psi == 32.0 and not g.extrema["pgd_accuracy"].bends


def test_pure_noise_gives_no_bend_and_a_wide_location():
    flat = _records(lambda p: 1.0, lambda p: 0.5, lambda p: 0.9, noise=0.05)
    (g,) = analyze_records(flat, n_boot=500)
    e = g.extrema["norm_clean"]
    assert not e.bends
    lo, hi = e.bootstrap_psi_interval
    assert hi / lo >= 8  # at least three octaves: the location is not pinned down


def test_the_analysis_is_reproducible_and_groups_by_model_and_method():
    records = (_records(u_shape, peak, lambda p: 0.9) +
               _records(u_shape, peak, lambda p: 0.9, model="cnn", method="trades"))
    a, b = analyze_records(records, n_boot=200), analyze_records(records, n_boot=200)
    assert [(g.model, g.method) for g in a] == [("cnn", "trades"), ("mlp", "pgd-at")]
    assert [g.to_dict() for g in a] == [g.to_dict() for g in b]


def test_analyze_cli_prints_tables_and_writes_json(tmp_path, capsys):
    with open(tmp_path / RESULTS, "w") as f:
        for r in _records(u_shape, peak, lambda p: 0.9):
            f.write(json.dumps(r) + "\n")
    assert main(["analyze", str(tmp_path), "--json", str(tmp_path / "a.json"), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### mlp, pgd-at, digits, RCT-AF n = 1 (seeds 0, 1, 2)")
    assert "| PGD robust accuracy (max) | 7 |" in out and "Claim (a)" in out and "Claim (c)" in out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc[0]["extrema"]["norm_clean"]["psi"] == 7.0
    assert out == render_markdown(analyze_sweep(tmp_path, n_boot=100))


def test_analyze_without_results_exits_2(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "holds no results" in capsys.readouterr().err
