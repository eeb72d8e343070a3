"""Result: norms from the diagonal and from unbiased statistics, JSON, table, plot."""

import json
import math

import pytest
import torch

from hessdiag.assembly import assemble_result
from hessdiag.report import figure, split_shares
from hessdiag.result import normalized_norm
from hessdiag.types import DiagonalEstimate, GGNSplit, NormStatistics

DIAG = {"a.weight": torch.tensor([[3.0, -4.0]]), "a.bias": torch.tensor([0.0, 0.0, 0.0])}


def make(estimate):
    return assemble_result(estimate, estimator="x", loss="ce", num_examples=9,
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


def test_the_chart_stacks_the_ggn_and_residual_shares_of_each_bar():
    """With a split each bar is the layer's norm, divided in proportion to ‖d_GGN‖² and ‖d_res‖²."""
    ggn = {"a.weight": torch.tensor([[1.0, 0.0]]), "a.bias": torch.tensor([0.0, 0.0, 0.0])}
    residual = {name: DIAG[name] - ggn[name] for name in DIAG}
    res = assemble_result(DiagonalEstimate(diagonal=DIAG, hvps=5), estimator="x", loss="ce", num_examples=9,
                          dtype=torch.float64, seconds=0.5, split=GGNSplit(ggn, residual, "func"))
    weight = res.per_layer[0]
    low, high = split_shares(weight)
    assert low + high == pytest.approx(weight.normalized_norm)
    assert low / high == pytest.approx(1.0 / (2.0 ** 2 + 4.0 ** 2))  # ‖d_GGN‖² = 1, ‖d_res‖² = 20
    ax = figure(res).axes[0]
    lower, upper = ax.containers[0], ax.containers[-1]  # the GGN bars, then the residual bars on top
    assert [bar.get_height() for bar in lower][0] == pytest.approx(low)
    assert [bar.get_y() for bar in upper][0] == pytest.approx(low)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("GGN share" in label for label in labels) and any("residual share" in label for label in labels)
    unsplit = figure(make(DiagonalEstimate(diagonal=DIAG, hvps=5))).axes[0]
    assert [bar.get_height() for bar in unsplit.containers[-1]] == pytest.approx(
        [layer.normalized_norm for layer in make(DiagonalEstimate(diagonal=DIAG, hvps=5)).per_layer])


def test_results_and_estimates_are_plain_data_apart_from_the_machinery():
    """types and result import nothing of the estimators or the objective (result only the
    renderer, for its shortcut methods); neither do report and assembly."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "hessdiag"
    allowed = {"types.py": set(), "result.py": {"_version", "report"}, "report.py": {"result", "stats"},
               "assembly.py": {"result", "stats", "types"}}
    for module, own in allowed.items():
        imported = set()
        for node in ast.walk(ast.parse((package / module).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: hessdiag's own
                imported.add((node.module or "").split(".")[0] or next(a.name for a in node.names))
        assert imported <= own, (module, imported - own)


def test_method_from_the_estimator_reaches_json_and_table():
    res = make(DiagonalEstimate(diagonal=DIAG, hvps=0, info={"method": "analytic-mlp"}))
    assert json.loads(res.to_json())["method"] == "analytic-mlp"
    assert "estimator=x (analytic-mlp)" in res.table()
    assert json.loads(make(DiagonalEstimate(diagonal=DIAG, hvps=5)).to_json())["method"] is None
