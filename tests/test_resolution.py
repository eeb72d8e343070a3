"""Unresolved estimates: the flag, the table's ``< hi``, the one-line warning with a budget.

A stochastic norm is unresolved when its unbiased squared norm is ≤ 0 or its 95 % interval's
half-width on the norm scale exceeds half the estimate (hessdiag.stats.is_resolved). The
seeded runs below are deterministic: plain Hutchinson with 3-4 probes on a tiny MLP (wide
intervals, ‖H‖_F² ≫ ‖diag H‖²) and 256 low-rank probes (resolved).
"""

import json
import math
import re
import warnings

import pytest
import torch

import hessdiag
from hessdiag.cli import main
from hessdiag.estimators import DiagonalEstimate, NormStatistics, get_estimator
from hessdiag.assembly import assemble_result
from hessdiag.assembly import probes_for_rtol as probes_for_rtol_of
from hessdiag.result import UnresolvedEstimateWarning
from hessdiag.stats import MAX_PROBES, ProbeBudget, is_resolved, probes_for_rtol

from .models import tiny_cnn, image_data, tiny_mlp, write_digits_checkpoint


# -- the arithmetic ------------------------------------------------------------------------


def test_probes_for_rtol_scales_the_variance_like_one_over_n():
    # T = 1, H = 0.5: relative half-width h = H/(2T) = 0.25 after 10 probes; for 0.05:
    # 10 · (0.25/0.05)² = 250.
    assert probes_for_rtol(1.0, (0.5, 1.5), 10, 0.05) == ProbeBudget(250, False)
    # Halving rtol quadruples the probes; twice the probes at the same width, twice again.
    assert probes_for_rtol(1.0, (0.5, 1.5), 10, 0.025).probes == 1000
    assert probes_for_rtol(1.0, (0.5, 1.5), 20, 0.05).probes == 500


def test_an_interval_reaching_zero_gives_a_lower_bound_from_its_upper_end():
    # lo ≤ 0: T is taken at hi = 3, h = (3 − (−1))/(4·3) = 1/3 → 10·(20/3)² = 444.4 → 450.
    assert probes_for_rtol(1.0, (-1.0, 3.0), 10, 0.05) == ProbeBudget(450, True)
    # The same for a negative estimate: hi = 1, h = 4/4 = 1 → 16·20² = 6400.
    assert probes_for_rtol(-1.0, (-3.0, 1.0), 16, 0.05) == ProbeBudget(6400, True)
    # Nothing positive in the interval: no scale to aim at.
    assert probes_for_rtol(-1.0, (-3.0, -0.5), 16, 0.05) is None
    assert probes_for_rtol(0.0, (0.0, 0.0), 16, 0.05) is None


def test_probes_for_rtol_rounds_up_to_two_digits_and_is_capped():
    needed = 10 * (0.25 / 0.0123) ** 2  # 4131.4
    assert probes_for_rtol(1.0, (0.5, 1.5), 10, 0.0123).probes == 4200 > needed
    assert probes_for_rtol(1.0, (0.999, 1.001), 10, 0.05).probes == 3  # the statistics' minimum
    assert probes_for_rtol(1.0, (0.5, 1.5), 10**8, 0.05) == ProbeBudget(MAX_PROBES, True)
    with pytest.raises(ValueError):
        probes_for_rtol(1.0, (0.5, 1.5), 0, 0.05)
    with pytest.raises(ValueError):
        probes_for_rtol(1.0, (0.5, 1.5), 10, 0.0)


def test_is_resolved_at_the_boundary():
    # Half-width on the norm scale (√hi − √lo)/(2√T): exactly 0.5 for T = 1, [0, 1].
    assert is_resolved(NormStatistics(1.0, (0.0, 1.0)))
    assert not is_resolved(NormStatistics(1.0, (0.0, 1.1)))
    assert not is_resolved(NormStatistics(0.0, (-1.0, 1.0)))
    assert not is_resolved(NormStatistics(-0.1, (-0.2, 0.0)))


@pytest.mark.parametrize("name", ["hutchinson", "hutchinson-plain", "hutchinson-ggn"])
def test_budget_for_probes_adds_what_the_estimator_spends_before_probing(name):
    estimator = get_estimator(name)
    for probes in (3, 10, 100, 5300):
        budget = estimator.budget_for_probes(probes)
        assert budget - estimator.sketch_budget(budget) >= probes
        assert budget - 1 - estimator.sketch_budget(budget - 1) < probes  # the smallest
    assert get_estimator("hutchinson").budget_for_probes(5300) == 5300 + 64  # rank-32 sketch


# -- Result --------------------------------------------------------------------------------

DIAG = {"a.weight": torch.tensor([[3.0, -4.0]]), "a.bias": torch.tensor([0.0, 0.0, 0.0])}


def make(estimate):
    return assemble_result(estimate, estimator="x", loss="ce", num_examples=9,
                           dtype=torch.float64, seconds=0.5)


def value_column(table: str) -> dict[str, str]:
    """{row name: text of the ‖d‖/√P column} of a table."""
    lines = table.splitlines()
    start = lines[0].index("‖d‖/√P") + len("‖d‖/√P")
    cells = {}
    for line in lines[2:]:
        if line.startswith(("-", "estimator=", "<")):
            continue
        cells[line.split()[0]] = line[:start].split("  ")[-1].strip()
    return cells


def test_unresolved_layer_under_a_resolved_total():
    stats = {"a.weight": NormStatistics(8.0, (7.0, 9.0)), "a.bias": NormStatistics(-1.0, (-3.0, 3.0)),
             "total": NormStatistics(7.0, (5.0, 9.0))}
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=16, samples=16, norm_statistics=stats))
    layers = {layer.name: layer for layer in res.per_layer}
    assert res.resolved and layers["a.weight"].resolved and not layers["a.bias"].resolved
    assert layers["a.bias"].sq_norm == -1.0 and layers["a.bias"].sq_norm_ci95 == (-3.0, 3.0)
    cells = value_column(res.table())
    assert cells["a.bias"] == f"< {math.sqrt(3 / 3):.6g}"
    assert cells["total"] == f"{math.sqrt(7 / 5):.6g}"
    assert "< x: unresolved" in res.table() and "needs" not in res.table()
    assert res.resolution_warning() is None  # only the totals warn
    assert res.total_text() == f"{math.sqrt(7 / 5):.6g}"


def test_curvprop_budget_is_counted_in_replicates():
    from hessdiag.result import RtolBudget

    stats = {"a.weight": NormStatistics(-1.0, (-3.0, 3.0)), "a.bias": NormStatistics(0.5, (0.0, 1.0)),
             "total": NormStatistics(-0.5, (-3.0, 4.0))}
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=0, samples=16, norm_statistics=stats))
    res.rtol_budget = RtolBudget(0.05, 900, True, "replicates")
    message = res.resolution_warning()
    assert "unresolved after 16 replicates" in message and "at least 900 replicates" in message
    assert "HVPs" not in message and "needs at least 900 replicates" in res.table()


def test_exact_results_are_resolved_even_where_the_diagonal_is_zero():
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=5))
    assert res.resolved and all(layer.resolved for layer in res.per_layer)
    assert res.sq_norm == pytest.approx(25.0) and res.sq_norm_ci95 == (res.sq_norm, res.sq_norm)
    assert probes_for_rtol_of(res, 0.05) is None and res.resolution_warning() is None
    assert "<" not in res.table()


@pytest.mark.parametrize("estimator", ["exact", "backpack"])
def test_exact_estimators_are_always_resolved(estimator, tiny_classification):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnresolvedEstimateWarning)
        res = hessdiag.measure(tiny_mlp(), tiny_classification, estimator=estimator,
                               dtype="float64", split_ggn=True)
    assert res.resolved and res.residual_resolved and res.rtol_budget is None
    assert all(layer.resolved and layer.residual_resolved for layer in res.per_layer)
    doc = json.loads(res.to_json())
    assert doc["resolved"] is True and doc["residual_resolved"] is True


def test_exact_basis_hvp_path_is_resolved():
    res = hessdiag.measure(tiny_cnn(), image_data(), dtype="float64")
    assert res.method == "basis-hvp" and res.resolved and not res.any_unresolved()


# -- measure(): warning, flags, JSON -------------------------------------------------------


def test_negative_unbiased_norm_is_unresolved_with_a_warning_and_a_budget(tiny_classification):
    # Seed 1, 3 probes: the unbiased ‖d‖² comes out negative (deterministic).
    with pytest.warns(UnresolvedEstimateWarning) as caught:
        res = hessdiag.measure(tiny_mlp(), tiny_classification, "ce", "hutchinson-plain",
                               samples=3, seed=1, dtype="float64")
    ours = [w for w in caught if w.category is UnresolvedEstimateWarning]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "\n" not in message
    assert res.sq_norm < 0 and res.normalized_norm == 0.0 and not res.resolved
    lo, hi = res.sq_norm_ci95
    expected = probes_for_rtol(res.sq_norm, (lo, hi), 3, 0.05)
    assert expected.at_least and res.rtol_budget.samples == expected.probes  # plain: no sketch
    assert re.fullmatch(
        rf"hutchinson-plain: unresolved after 3 HVPs: ‖d‖/√P < {res.ci95[1]:.3g} \(unbiased "
        rf"squared norm {res.sq_norm:.3g} ≤ 0\); rtol 0\.05 needs at least {expected.probes:,} "
        rf"HVPs by the observed variance \(--samples {expected.probes} / samples={expected.probes}\), "
        rf"the exact estimator at most {res.num_params}",  # 74 parameters: exact is cheaper
        message), message
    # No bare number for the total: "< hi", and the legend says what it means.
    cells = value_column(res.table())
    assert cells["total"] == f"< {res.ci95[1]:.6g}"
    assert f"rtol 0.05 needs at least {expected.probes:,} HVPs" in res.table()
    assert res.total_text() == f"< {res.ci95[1]:.6g}"
    assert "&lt; x: unresolved" in res._repr_html_()


def test_json_round_trip_keeps_the_numbers_and_the_flags(tiny_classification, tmp_path):
    with pytest.warns(UnresolvedEstimateWarning):
        res = hessdiag.measure(tiny_mlp(), tiny_classification, "ce", "hutchinson",
                               samples=6, seed=0, dtype="float64")
    doc = json.loads(res.to_json())
    assert doc["resolved"] is False
    assert doc["sq_norm"] == res.sq_norm and doc["sq_norm_ci95"] == list(res.sq_norm_ci95)
    assert doc["normalized_norm"] == res.normalized_norm and doc["ci95"] == list(res.ci95)
    assert doc["rtol_budget"] == {"rtol": 0.05, "samples": res.rtol_budget.samples, "unit": "HVPs",
                                  "at_least": res.rtol_budget.at_least}
    # hutchinson: the budget includes the sketch, 2·min(32, budget // 4) HVPs.
    probes = probes_for_rtol_of(res, 0.05).probes
    assert res.rtol_budget.samples == get_estimator("hutchinson").budget_for_probes(probes) > probes
    for entry, layer in zip(doc["per_layer"], res.per_layer):
        assert entry["resolved"] == layer.resolved and entry["sq_norm"] == layer.sq_norm
        assert entry["sq_norm_ci95"] == list(layer.sq_norm_ci95)
    assert doc["residual_resolved"] is None and doc["residual_sq_norm"] is None
    ax = res.plot(tmp_path / "unresolved.png")  # unresolved bars hatched, total labelled "<"
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("total < ") for label in labels)
    assert (tmp_path / "unresolved.png").stat().st_size > 500


def test_a_resolved_stochastic_run_has_no_marker_and_no_warning(tiny_classification):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnresolvedEstimateWarning)
        res = hessdiag.measure(tiny_mlp(), tiny_classification, "ce", "hutchinson",
                               samples=256, dtype="float64")
    assert res.resolved and not res.any_unresolved() and res.resolution_warning() is None
    assert "<" not in res.table()
    assert res.rtol_budget is not None and not res.rtol_budget.at_least  # still reported
    assert json.loads(res.to_json())["resolved"] is True


def test_the_ggn_residual_gets_the_same_treatment(tiny_classification):
    with pytest.warns(UnresolvedEstimateWarning, match=r"; residual .*rtol 0\.05 needs"):
        res = hessdiag.measure(tiny_mlp(), tiny_classification, "ce", "hutchinson-plain",
                               samples=4, seed=0, dtype="float64", split_ggn=True)
    assert res.residual_resolved is False and res.residual_sq_norm is not None
    assert any(layer.residual_resolved is False for layer in res.per_layer)
    # The residual column shows "< hi" where the residual is unresolved; GGN stays a number.
    header, _, *rows = res.table().splitlines()
    start = header.index("residual") + len("residual")
    total = next(r for r in rows if r.startswith("total"))
    assert total[:start].split("  ")[-1].strip() == f"< {res.residual_ci95[1]:.6g}"
    doc = json.loads(res.to_json())
    assert doc["residual_resolved"] is False
    assert doc["residual_sq_norm_ci95"] == list(res.residual_sq_norm_ci95)
    # The budget covers whichever of total and residual needs more probes.
    need = max(probes_for_rtol(res.sq_norm, res.sq_norm_ci95, 4, 0.05).probes,
               probes_for_rtol(res.residual_sq_norm, res.residual_sq_norm_ci95, 4, 0.05).probes)
    assert res.rtol_budget.samples == need


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def small_checkpoint(tmp_path):
    path = tmp_path / "small.pt"
    write_digits_checkpoint(path)
    return path


def test_cli_marks_unresolved_rows_and_warns_once_on_stderr(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["measure", str(small_checkpoint), "--max-examples", "40", "--estimator",
                 "hutchinson-plain", "--samples", "4", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["resolved"] is False and doc["rtol_budget"]["at_least"] is True
    hvps = doc["rtol_budget"]["samples"]
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("hessdiag: warning: hutchinson-plain: unresolved after 4 HVPs: ")
    assert err[0].endswith(f"rtol 0.05 needs at least {hvps:,} HVPs by the observed variance "
                           f"(--samples {hvps} / samples={hvps})")
    cells = value_column(captured.out)
    assert cells["total"] == f"< {doc['ci95'][1]:.6g}"
    assert all(cells[layer["name"]].startswith("< ") for layer in doc["per_layer"] if not layer["resolved"])
    assert f"rtol 0.05 needs at least {hvps:,} HVPs" in captured.out.splitlines()[-1]
    assert main(["measure", str(small_checkpoint), "--max-examples", "40", "--estimator",
                 "hutchinson-plain", "--samples", "4", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out.strip() == f"< {doc['ci95'][1]:.6g}" and len(quiet.err.splitlines()) == 1


def test_cli_resolved_run_prints_numbers_and_no_warning(small_checkpoint, capsys):
    assert main(["measure", str(small_checkpoint), "--max-examples", "40", "--estimator",
                 "hutchinson", "--samples", "256"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "<" not in captured.out and "unresolved" not in captured.out
