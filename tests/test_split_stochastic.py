"""``split_ggn=True`` with stochastic estimators: unbiased residual norm, interval, exact GGN.

The residual d_res = d − d_GGN shares the probes of d: with d = b + r and d_GGN exact,
d_res = (b − d_GGN) + r, whose squared norm gets the same U-statistic and jackknife as
‖d‖² (hessdiag.stats). References are the float64 P×P residual/GGN of tests/reference.py.
"""

import json
import math

import pytest
import torch

import hessdiag
from hessdiag.cli import main
from hessdiag.estimators import ESTIMATORS, EstimatorOptions
from hessdiag.ggn import ggn_diagonal
from hessdiag.models import mlp
from hessdiag.objective import Objective

from .models import write_digits_checkpoint
from .reference import (
    max_relative_error,
    reference_ggn_diagonal,
    reference_residual_diagonal,
)

STOCHASTIC = ["hutchinson", "hutchinson-plain", "hutchinson-ggn"]


def tiny_tanh_mlp():
    """6-5-4-3 tanh MLP (P = 74): tanh'' ≠ 0, so the residual is far from zero."""
    torch.manual_seed(1)
    return mlp(in_features=6, hidden=(5, 4), num_classes=3, activation="tanh")


@pytest.fixture(scope="module")
def setting():
    """Model, data, float64 objective, exact diag(GGN) (as measure computes it) and references."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    model = tiny_tanh_mlp()
    objective = Objective(model, (x, y), "ce", dtype=torch.float64)
    ggn, _ = ggn_diagonal(objective)
    residual = reference_residual_diagonal(model.double(), "ce", x.double(), y)
    model.float()
    return {"model": model, "x": x, "y": y, "objective": objective, "ggn": ggn,
            "residual": residual,
            "ggn_reference": reference_ggn_diagonal(model.double(), "ce", x.double(), y)}


def residual_statistics(setting, estimator, samples, seeds):
    """Per seed, the residual statistics an estimator returns given the exact GGN."""
    out = []
    objective = setting["objective"]
    objective.ggn.remember(setting["ggn"], "func")  # as measure(split_ggn=True) does before probing
    for seed in seeds:
        chosen = ESTIMATORS[estimator](EstimatorOptions(samples=samples, seed=seed))
        out.append(chosen.estimate(objective).residual_statistics)
    return out


@pytest.mark.parametrize("estimator", STOCHASTIC)
def test_residual_squared_norm_is_unbiased_and_the_plug_in_is_not(setting, estimator):
    exact = {name: float(t.pow(2).sum()) for name, t in setting["residual"].items()}
    exact["total"] = sum(exact.values())
    # 16 HVPs (hutchinson: a rank-4 sketch and 8 probes) on 200 seeds: few probes make the
    # plug-in ‖d̂ − d_GGN‖² overshoot by E‖r̄ − r‖² ≈ tr Var(rᵢ)/N, larger than ‖d_res‖² here.
    stats = residual_statistics(setting, estimator, samples=16, seeds=range(200))
    for name in exact:
        unbiased = torch.tensor([s[name].sq_norm for s in stats])
        plug_in = torch.tensor([s[name].naive_sq_norm for s in stats])
        se = float(unbiased.std()) / math.sqrt(len(stats))
        # 4 standard errors of the mean over seeds: a correct estimator passes with
        # probability > 0.9999 per block (observed |z| ≤ 2); the plug-in on the total sits
        # ≥ 20 σ above (checked below, so this tolerance does fail a biased estimator).
        assert abs(float(unbiased.mean()) - exact[name]) <= 4 * se + 1e-14, name
        if name == "total":
            assert float(plug_in.mean()) - exact[name] > 4 * se


@pytest.mark.parametrize("estimator", STOCHASTIC)
def test_residual_interval_covers_the_exact_residual(setting, estimator):
    exact = hessdiag.normalized_norm(setting["residual"])
    covered = 0
    seeds = range(40)
    for seed in seeds:
        res = hessdiag.measure(setting["model"], (setting["x"], setting["y"]), "ce", estimator,
                               samples=32, seed=seed, dtype="float64", split_ggn=True)
        lo, hi = res.residual_ci95
        assert lo <= res.residual_normalized_norm <= hi
        covered += lo <= exact <= hi
        for layer in res.per_layer:
            assert layer.residual_ci95[0] <= layer.residual_normalized_norm <= layer.residual_ci95[1]
    # Nominal 95 %; the jackknife t interval (16 groups) is approximate: observed 39–40/40.
    # 34/40 passes a correct interval with probability > 0.99 at true coverage 0.95; the same
    # half-widths centred on the plug-in ‖d̂ − d_GGN‖² instead cover 0/40 (tried once).
    assert covered >= 34


@pytest.mark.parametrize("estimator", STOCHASTIC)
def test_ggn_part_is_exact_and_the_split_adds_up(setting, estimator):
    res = hessdiag.measure(setting["model"], (setting["x"], setting["y"]), "ce", estimator,
                           samples=32, dtype="float64", split_ggn=True, keep_diagonal=True)
    # BackPACK (or torch.func) vs full autograd Jacobians in float64: ~1e-15 observed.
    assert max_relative_error(res.ggn_diagonal, setting["ggn_reference"]) < 1e-9
    assert res.ggn_normalized_norm == pytest.approx(
        hessdiag.normalized_norm(setting["ggn_reference"]), rel=1e-9)
    for name in res.diagonal:
        assert torch.allclose(res.ggn_diagonal[name] + res.residual_diagonal[name],
                              res.diagonal[name], rtol=1e-15, atol=1e-17)
    # The split does not change d's own statistics (same seed, same probes).
    plain = hessdiag.measure(setting["model"], (setting["x"], setting["y"]), "ce", estimator,
                             samples=32, dtype="float64")
    assert res.normalized_norm == pytest.approx(plain.normalized_norm, rel=1e-12)
    assert res.ci95 == pytest.approx(plain.ci95, rel=1e-12)
    assert plain.residual_ci95 is None and plain.residual_normalized_norm is None


def test_hutchinson_ggn_reuses_the_split_ggn(setting, monkeypatch):
    # measure computes diag(GGN) once (BackPACK here) and the control variate uses it as b.
    import hessdiag.ggn

    computed = []
    once = hessdiag.ggn.ggn_diagonal

    def counted(*args, **kwargs):
        computed.append(1)
        assert len(computed) == 1, "diag(GGN) computed a second time"
        return once(*args, **kwargs)

    monkeypatch.setattr(hessdiag.ggn, "ggn_diagonal", counted)
    res = hessdiag.measure(setting["model"], (setting["x"], setting["y"]), "ce", "hutchinson-ggn",
                           samples=16, dtype="float64", split_ggn=True, keep_diagonal=True)
    monkeypatch.undo()
    alone = hessdiag.measure(setting["model"], (setting["x"], setting["y"]), "ce",
                             "hutchinson-ggn", samples=16, dtype="float64", keep_diagonal=True)
    # The same diag(GGN) either way (BackPACK's, in measure or in the estimator).
    assert max_relative_error(res.diagonal, alone.diagonal) < 1e-12
    assert res.ci95 == pytest.approx(alone.ci95, rel=1e-9)


def test_exact_estimators_keep_an_exact_residual_with_zero_width(setting):
    res = hessdiag.measure(setting["model"], (setting["x"], setting["y"]), "ce", "exact",
                           dtype="float64", split_ggn=True)
    exact = hessdiag.normalized_norm(setting["residual"])
    assert res.residual_normalized_norm == pytest.approx(exact, rel=1e-9)
    assert res.residual_ci95 == (res.residual_normalized_norm, res.residual_normalized_norm)
    assert all(layer.residual_ci95 == (layer.residual_normalized_norm,) * 2 for layer in res.per_layer)
    assert "residual 95%" not in res.table()


def test_cli_split_ggn_with_hutchinson_prints_and_writes_the_residual_interval(tmp_path, capsys):
    path = tmp_path / "small.pt"
    write_digits_checkpoint(path)
    out = tmp_path / "result.json"
    code = main(["measure", str(path), "--estimator", "hutchinson", "--split-ggn", "--samples", "64",
                 "--max-examples", "50", "--dtype", "float64", "--json", str(out)])
    assert code == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "GGN" in head.split() and "residual 95%" in head
    doc = json.loads(out.read_text())
    lo, hi = doc["residual_ci95"]
    assert lo <= doc["residual_normalized_norm"] <= hi and lo < hi
    for layer in doc["per_layer"]:
        assert len(layer["residual_ci95"]) == 2


def test_statistics_with_another_base_equal_a_fresh_accumulator_with_that_base():
    from hessdiag.stats import ProbeStatistics

    g = torch.Generator().manual_seed(3)
    sizes = [("a", 5), ("b", 3)]
    b, b2 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    probes = torch.randn(37, 8, generator=g, dtype=torch.float64)
    shared, fresh = ProbeStatistics(sizes, b), ProbeStatistics(sizes, b2)
    shared.add(probes)
    fresh.add(probes)
    rebased, expected = shared.statistics(base=b2), fresh.statistics()
    assert shared.statistics()["total"].sq_norm != pytest.approx(expected["total"].sq_norm)
    for name in ("a", "b", "total"):
        assert rebased[name].sq_norm == pytest.approx(expected[name].sq_norm, rel=1e-12)
        assert rebased[name].ci95 == pytest.approx(expected[name].ci95, rel=1e-12)
        assert rebased[name].naive_sq_norm == pytest.approx(expected[name].naive_sq_norm, rel=1e-12)
