"""PyHessian context metrics (trace, top eigenvalues) against exact float64 values."""

import sys

import pytest
import torch

import hessdiag
from hessdiag.cli import main
from hessdiag.extras import ExtrasError, parse_extras

from .models import tiny_mlp
from .reference import reference_hessian

pytest.importorskip("pyhessian")


@pytest.mark.parametrize(("activation", "loss"), [("tanh", "ce"), ("rct:n=1,alpha=4", "mse")])
def test_trace_and_top_eigenvalue_match_the_exact_hessian(activation, loss, tiny_classification):
    model = tiny_mlp(activation)
    x, y = tiny_classification
    hessian = reference_hessian(model, loss, x, y)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    res = hessdiag.measure(model, (x, y), loss, "exact", dtype="float64", batch_size=7,
                           extras="trace:300,top-eig")
    extras = res.extras
    exact_trace = float(hessian.trace())
    # Σ diag of an exact float64 diagonal is the trace up to rounding.
    assert extras["diagonal_sum"] == pytest.approx(exact_trace, rel=1e-10)
    # 300 Rademacher probes, fixed seed: the exact trace lies in the reported normal 95 %
    # interval, which is informative (a wrong HVP weighting, e.g. a missing n_b/N, moves the
    # mean by far more than the half-width).
    lo, hi = extras["trace_ci95"]
    assert lo < exact_trace < hi and hi - lo < 0.4 * exact_trace
    assert extras["trace_probes"] == 300
    # Here the largest-magnitude eigenvalue is the top one; power iteration stops at a
    # relative change of 1e-4, which leaves an error of a few 1e-4 (observed 2e-4).
    top = float(eigenvalues[-1])
    assert top > abs(float(eigenvalues[0]))
    assert extras["top_eigenvalues"] == [pytest.approx(top, rel=2e-3)]
    assert extras["hvps"] >= 300 + 2 and extras["method"] == "PyHessian 0.1"
    assert res.to_dict()["extras"] == extras
    assert "trace=" in res.table() and "top eigenvalues=" in res.table()


def test_extras_leave_model_and_default_dtype_alone(tiny_classification):
    model = tiny_mlp()
    model.train()
    res = hessdiag.measure(model, tiny_classification, "ce", dtype="float64", extras=["top-eig"])
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.get_default_dtype() == torch.float32
    assert list(res.extras) == ["top_eigenvalues", "hvps", "seconds", "method"]
    assert hessdiag.measure(model, tiny_classification).to_dict()["extras"] is None


def test_float32_extras_run(tiny_classification):
    res = hessdiag.measure(tiny_mlp(), tiny_classification, "ce", extras="trace:3")
    assert res.dtype == "float32" and res.extras["trace_probes"] == 3


@pytest.mark.parametrize(("spec", "message"), [("density", "unknown extra 'density'"),
                                               ("trace:1", "bad count"), ("top-eig:x", "bad count")])
def test_bad_extras_are_refused(spec, message):
    with pytest.raises(ExtrasError, match=message):
        parse_extras(spec)


def test_parse_extras():
    assert parse_extras("trace, top-eig:3") == {"trace": 100, "top-eig": 3}
    assert parse_extras(("trace:7",)) == {"trace": 7}
    assert parse_extras(None) == {}


def test_missing_pyhessian_is_one_clear_error(tiny_classification, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyhessian", None)  # import now raises ImportError
    with pytest.raises(ExtrasError, match=r"need PyHessian: pip install 'hessdiag\[pyhessian\]'"):
        hessdiag.measure(tiny_mlp(), tiny_classification, extras="trace")


def test_cli_bad_extra_exits_2_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it: no file is opened
        main(["measure", "missing.pt", "--extras", "density"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown extra 'density'" in err
