"""Estimators as objects with their own options, and the registry (``register_estimator``)."""

import json
import sys

import pytest
import torch

import hessdiag
from hessdiag.cli import main
from hessdiag.estimators import (
    ESTIMATORS,
    CurvpropEstimator,
    DiagonalEstimate,
    Estimator,
    EstimatorError,
    EstimatorOptions,
    ExactEstimator,
    HutchinsonEstimator,
    PlainHutchinsonEstimator,
    estimator_names,
    get_estimator,
    register_estimator,
)

from ..models import image_data, tiny_cnn, tiny_mlp, write_digits_checkpoint


class ViaExact(Estimator):
    """A user-defined estimator: the exact diagonal times 1, through ``exact``'s HVP path."""

    exact = True

    def __init__(self, *, max_params: int | None = None, factor: float = 1.0) -> None:
        self.max_params = max_params
        self.factor = factor

    def estimate(self, objective):
        inner = ExactEstimator(analytic=False, structural=False, max_params=self.max_params)
        found = inner.estimate(objective)
        return DiagonalEstimate({k: self.factor * v for k, v in found.diagonal.items()},
                                hvps=found.hvps, info={"method": "via exact"})


@pytest.fixture
def registered():
    """``via-exact`` in the registry for one test."""
    register_estimator("via-exact", ViaExact)
    yield "via-exact"
    ESTIMATORS.pop("via-exact", None)
    del ViaExact.name


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)


def _same(a, b):
    assert a.normalized_norm == b.normalized_norm and a.ci95 == b.ci95 and a.hvps == b.hvps
    assert all(torch.equal(a.diagonal[k], b.diagonal[k]) for k in a.diagonal)


@pytest.mark.parametrize("name, obj, options", [
    ("hutchinson", HutchinsonEstimator(samples=24, seed=3), dict(samples=24, seed=3)),
    ("hutchinson-plain", PlainHutchinsonEstimator(rtol=0.3, max_samples=40, seed=2),
     dict(rtol=0.3, max_samples=40, seed=2)),
    ("curvprop", CurvpropEstimator(samples=5, seed=1), dict(samples=5, seed=1)),
    ("exact", ExactEstimator(max_params=1000), dict(max_params=1000)),
])
def test_an_object_gives_what_the_name_with_the_same_options_gives(name, obj, options):
    model, data = tiny_cnn(), image_data()
    by_object = hessdiag.measure(model, data, estimator=obj, dtype="float64", keep_diagonal=True)
    by_name = hessdiag.measure(model, data, estimator=name, dtype="float64", keep_diagonal=True, **options)
    _same(by_object, by_name)
    assert by_object.estimator == by_name.estimator == name
    assert by_object.seed == by_name.seed and by_object.rtol_budget == by_name.rtol_budget


def test_each_estimator_uses_its_own_options(data):
    model = tiny_mlp()
    basis = hessdiag.measure(model, data, estimator=ExactEstimator(analytic=False), dtype="float64",
                             keep_diagonal=True)
    analytic = hessdiag.measure(model, data, estimator=ExactEstimator(), dtype="float64", keep_diagonal=True)
    small_blocks = hessdiag.measure(model, data, estimator=ExactEstimator(analytic=False, block_size=7),
                                    dtype="float64", keep_diagonal=True)
    assert (basis.method, analytic.method) == ("basis-hvp", "analytic-mlp") and basis.hvps == basis.num_params == 74
    assert all(torch.allclose(basis.diagonal[k], analytic.diagonal[k], rtol=1e-10, atol=1e-14)
               for k in basis.diagonal)
    _same(basis, small_blocks)
    with pytest.raises(EstimatorError, match="exceed the budget of 10"):
        hessdiag.measure(tiny_cnn(), image_data(), estimator=ExactEstimator(max_params=10))
    # a fixed sketch rank: 2k of the budget, the rest probes
    chosen = HutchinsonEstimator(samples=20, sketch_rank=3)
    estimate = chosen.estimate(hessdiag.Objective(model, data))
    assert estimate.info["sketch_rank"] == 3 and estimate.samples == 14 and estimate.hvps == 20
    assert chosen.budget_for_probes(100) == 106
    mc = CurvpropEstimator(samples=3, ggn="mc", allocation="uniform").estimate(
        hessdiag.Objective(tiny_cnn(), image_data()))
    assert mc.info["ggn"] == "monte-carlo" and mc.info["allocation"] == "uniform"


def test_the_older_options_form_still_builds_the_same_estimator():
    assert vars(ExactEstimator(EstimatorOptions(max_params=10), analytic=False)) == \
        vars(ExactEstimator(max_params=10, analytic=False))
    legacy = CurvpropEstimator(EstimatorOptions(samples=4, seed=3), ggn="exact")
    assert (legacy.samples, legacy.seed, legacy.ggn) == (4, 3, "exact")
    assert vars(get_estimator("hutchinson", EstimatorOptions(samples=64, max_params=5))) == \
        vars(HutchinsonEstimator(samples=64))  # by name: only the options it takes


def test_bad_constructor_options_fail_when_the_estimator_is_built():
    for build, message in [
        (lambda: HutchinsonEstimator(samples=0), "samples must be a positive integer, got 0"),
        (lambda: HutchinsonEstimator(rtol=1.5), r"rtol must lie in \(0, 1\)"),
        (lambda: HutchinsonEstimator(samples=10, sketch_rank=4), "leave fewer than 3 probes"),
        (lambda: HutchinsonEstimator(sketch_rank=0), "sketch_rank must be a positive integer"),
        (lambda: PlainHutchinsonEstimator(samples=2), "raise --samples"),
        (lambda: CurvpropEstimator(allocation="greedy"), "allocation must be one of"),
        (lambda: CurvpropEstimator(samples=2), "at least 3 replicates"),
        (lambda: ExactEstimator(block_size=0), "block_size must be a positive integer"),
        (lambda: ExactEstimator(samples=3), "unexpected keyword argument 'samples'"),
    ]:
        with pytest.raises((EstimatorError, TypeError), match=message):
            build()


def test_measure_options_that_conflict_with_an_object_are_refused(data):
    model = tiny_mlp()
    with pytest.raises(EstimatorError) as err:
        hessdiag.measure(model, data, estimator=HutchinsonEstimator(samples=32, seed=1),
                         samples=64, seed=2, rtol=0.05)
    message = str(err.value)
    assert "samples=64 (it has samples=32)" in message and "seed=2 (it has seed=1)" in message
    assert "rtol" not in message and "\n" not in message  # 0.05 agrees with the object's own
    with pytest.raises(EstimatorError, match=r"samples=8 \(it takes no samples\)"):
        hessdiag.measure(model, data, estimator=ExactEstimator(), samples=8)
    with pytest.raises(EstimatorError, match="pass an instance"):
        hessdiag.measure(model, data, estimator=HutchinsonEstimator)
    with pytest.raises(EstimatorError, match="a name or an Estimator object"):
        hessdiag.measure(model, data, estimator=3)
    # agreeing options, and a seed for an estimator without one (it seeds extras), pass
    res = hessdiag.measure(model, data, estimator=HutchinsonEstimator(samples=32, seed=1),
                           samples=32, seed=1)
    assert res.samples is not None and res.seed == 1
    assert hessdiag.measure(model, data, estimator=ExactEstimator(), seed=4).seed is None


def test_a_registered_estimator_works_by_name_and_as_an_object(registered, data):
    model = tiny_mlp()
    assert ViaExact.name == "via-exact" and registered in estimator_names()
    reference = hessdiag.hessian_diagonal(model, data, estimator="exact", dtype="float64")
    by_name = hessdiag.measure(model, data, estimator="via-exact", dtype="float64", max_params=100,
                               keep_diagonal=True)
    by_object = hessdiag.measure(model, data, estimator=ViaExact(factor=1.0), dtype="float64",
                                 keep_diagonal=True)
    for res in (by_name, by_object):
        assert res.estimator == "via-exact" and res.method == "via exact" and res.seed is None
        assert all(torch.allclose(res.diagonal[k], reference[k], rtol=1e-10, atol=1e-14) for k in reference)
    _same(by_name, by_object)
    # by name it gets the measure options its constructor takes (max_params), no others
    with pytest.raises(EstimatorError, match="exceed the budget of 10"):
        hessdiag.measure(model, data, estimator="via-exact", max_params=10, samples=5)


def test_a_registered_estimator_runs_on_the_command_line(registered, tmp_path, capsys):
    checkpoint = tmp_path / "small.pt"
    write_digits_checkpoint(checkpoint)
    out = tmp_path / "r.json"
    assert main(["measure", str(checkpoint), "--max-examples", "10", "--dtype", "float64",
                 "--estimator", registered, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["estimator"] == "via-exact" and doc["method"] == "via exact"


def test_duplicate_names_are_refused_unless_replaced(registered):
    class Other(ViaExact):
        name = "via-exact"

    with pytest.raises(EstimatorError, match="registered already.*replace=True"):
        register_estimator("via-exact", Other)

    class MyHutchinson(HutchinsonEstimator):  # name "hutchinson", inherited
        pass

    with pytest.raises(EstimatorError, match="registered already"):
        register_estimator("hutchinson", MyHutchinson)
    assert register_estimator("via-exact", ViaExact) is ViaExact  # the same class again: nothing
    register_estimator("via-exact", Other, replace=True)
    assert ESTIMATORS["via-exact"] is Other
    with pytest.raises(EstimatorError, match="name is 'via-exact'"):
        register_estimator("via", Other)
    with pytest.raises(EstimatorError, match="subclass of hessdiag.estimators.Estimator"):
        register_estimator("thing", dict)

    class NoKind(Estimator):
        def estimate(self, objective):
            raise AssertionError

    with pytest.raises(EstimatorError, match="exact = True"):
        register_estimator("no-kind", NoKind)
    with pytest.raises(EstimatorError, match="unknown estimator 'nope'"):
        get_estimator("nope")


PLUGIN = '''
from hessdiag.estimators import DiagonalEstimate, Estimator, ExactEstimator

class Plugged(Estimator):
    exact = True

    def estimate(self, objective):
        return ExactEstimator().estimate(objective)
'''


def test_installed_packages_add_estimators_through_entry_points(tmp_path, monkeypatch, data):
    """A package declaring ``[project.entry-points."hessdiag.estimators"] plugged = ...``."""
    (tmp_path / "hd_plugin.py").write_text(PLUGIN)
    info = tmp_path / "hd_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hd-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hessdiag.estimators]\nplugged = hd_plugin:Plugged\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "plugged" in estimator_names() and "plugged" not in ESTIMATORS  # listed, not loaded
        res = hessdiag.measure(tiny_mlp(), data, estimator="plugged", dtype="float64")
        assert res.estimator == "plugged" and res.method == "analytic-mlp"
        assert ESTIMATORS["plugged"].__module__ == "hd_plugin"
    finally:
        ESTIMATORS.pop("plugged", None)
        sys.modules.pop("hd_plugin", None)
