"""Result: norms from the diagonal and from unbiased statistics, JSON, table, plot."""

import json
import math

import pytest
import torch

from hessdiag.estimators import DiagonalEstimate, NormStatistics
from hessdiag.result import Result, normalized_norm

DIAG = {"a.weight": torch.tensor([[3.0, -4.0]]), "a.bias": torch.tensor([0.0, 0.0, 0.0])}


def make(estimate):
    return Result.from_estimate(estimate, estimator="x", loss="ce", num_examples=9,
                                dtype=torch.float64, seconds=0.5)


def test_exact_norms_follow_from_the_diagonal():
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=5))
    assert res.normalized_norm == pytest.approx(5 / math.sqrt(5)) == normalized_norm(DIAG)
    assert res.norm == pytest.approx(5.0) and res.ci95 == (res.normalized_norm, res.normalized_norm)
    layer = {entry.name: entry for entry in res.per_layer}
    assert layer["a.weight"].normalized_norm == pytest.approx(5 / math.sqrt(2))
    assert layer["a.bias"].normalized_norm == 0.0


def test_statistics_override_the_plug_in_norm_and_negative_estimates_clip_to_zero():
    stats = {"a.weight": NormStatistics(8.0, (2.0, 18.0)), "a.bias": NormStatistics(-1.0, (-3.0, 3.0)),
             "total": NormStatistics(20.0, (5.0, 45.0), naive_sq_norm=80.0)}
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=64, samples=64, norm_statistics=stats))
    assert res.normalized_norm == pytest.approx(2.0) and res.ci95 == pytest.approx((1.0, 3.0))
    assert res.naive_normalized_norm == pytest.approx(4.0)
    bias = {layer.name: layer for layer in res.per_layer}["a.bias"]
    assert bias.normalized_norm == 0.0 and bias.ci95 == pytest.approx((0.0, 1.0))


def test_json_table_html_and_plot(tmp_path):
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=5))
    doc = json.loads(res.to_json())
    assert doc["per_layer"][0]["name"] == "a.weight" and doc["hvps"] == 5
    assert "total" in res.table() and "<table>" in res._repr_html_()
    for ext in ("png", "svg", "pdf"):
        res.plot(tmp_path / f"p.{ext}")
        assert (tmp_path / f"p.{ext}").stat().st_size > 500


def test_method_from_the_estimator_reaches_json_and_table():
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=0, info={"method": "analytic-mlp"}))
    assert json.loads(res.to_json())["method"] == "analytic-mlp"
    assert "estimator=x (analytic-mlp)" in res.table()
    assert json.loads(make(DiagonalEstimate(diagonal=DIAG, hvps=5)).to_json())["method"] is None
