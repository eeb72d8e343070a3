"""The backpack estimator against the exact estimator and the float64 reference."""

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.backpack_ext import BackpackUnsupportedError
from hessdiag.estimators import EstimatorError

from ..models import tiny_mlp, tiny_cnn, image_data
from ..reference import max_relative_error, reference_diagonal

# BackPACK (factorized curvature backpropagated through module extensions) and the exact
# estimator (vmapped forward-over-reverse HVPs) compute the same float64 quantity by
# unrelated routes; observed differences are ~1e-16 relative. 1e-8 is the bar and
# still fails any missing term (a dropped residual or a wrong φ'' changes entries by O(1)).
BACKPACK_RTOL = 1e-8

ACTIVATIONS = ["rct:n=0,alpha=28", "rct:n=1,alpha=14", "rct:n=2,alpha=7", "silu", "gelu",
               "softplus", "mish", "tanh"]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backpack_equals_exact_on_mlp(activation, loss, tiny_classification):
    model = tiny_mlp(activation)
    x, y = tiny_classification
    # batch 7 over 20 examples: unequal batches check the n_b/N weighting.
    bp = hessdiag.hessian_diagonal(model, (x, y), loss, "backpack", dtype="float64", batch_size=7)
    ex = hessdiag.hessian_diagonal(model, (x, y), loss, "exact", dtype="float64", batch_size=7)
    assert max_relative_error(bp, ex) < BACKPACK_RTOL


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backpack_equals_exact_on_cnn(activation, loss):
    model = tiny_cnn(activation)
    x, y = image_data()
    bp = hessdiag.hessian_diagonal(model, (x, y), loss, "backpack", dtype="float64", batch_size=4)
    ex = hessdiag.hessian_diagonal(model, (x, y), loss, "exact", dtype="float64", batch_size=4)
    assert max_relative_error(bp, ex) < BACKPACK_RTOL


def test_backpack_matches_independent_reference_and_reports_cost(tiny_classification):
    model = tiny_mlp("rct:n=2,alpha=7")
    x, y = tiny_classification
    res = hessdiag.measure(model, (x, y), "ce", "backpack", dtype="float64", batch_size=8,
                           keep_diagonal=True)
    assert max_relative_error(res.diagonal, reference_diagonal(model, "ce", x, y)) < BACKPACK_RTOL
    assert res.hvps == 0 and res.ci95 == (res.normalized_norm, res.normalized_norm)


def test_residual_term_is_present(tiny_classification):
    # Guards the test above against a GGN-only implementation: with RCT-AF at α = 28 the
    # residual part is far from negligible, so the GGN diagonal differs from the Hessian's.
    model = tiny_mlp("rct:n=0,alpha=28")
    x, y = tiny_classification
    from hessdiag.objective import Objective

    ggn = Objective(model, (x, y), "ce", dtype=torch.float64).ggn.per_example_diagonal()
    bp = hessdiag.hessian_diagonal(model, (x, y), "ce", "backpack", dtype="float64")
    assert max_relative_error(ggn, bp) > 1e-3


def test_user_model_is_not_extended_or_changed(tiny_classification):
    model = tiny_mlp("silu")
    x, y = tiny_classification
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hessdiag.measure(model, (x, y), "ce", "backpack", dtype="float64")
    assert model.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not any(hasattr(m, "_backpack_extend") for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.dtype == torch.float32 and p.grad is None
    # torch.func still works on the user's model afterwards.
    ex = hessdiag.hessian_diagonal(model, (x, y), "ce", "exact", dtype="float64")
    assert max_relative_error(ex, reference_diagonal(model, "ce", x, y)) < BACKPACK_RTOL


def test_frozen_parameters_are_skipped(tiny_classification):
    model = tiny_mlp("gelu")
    model[1].weight.requires_grad_(False)
    x, y = tiny_classification
    bp = hessdiag.hessian_diagonal(model, (x, y), "mse", "backpack", dtype="float64")
    assert "1.weight" not in bp
    assert max_relative_error(bp, reference_diagonal(model, "mse", x, y)) < BACKPACK_RTOL


def test_nested_sequential_and_float32(tiny_classification):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 5), hessdiag.RCTAF(1, 14.0)),
                          nn.Sequential(nn.Linear(5, 3)))
    x, y = tiny_classification
    bp = hessdiag.hessian_diagonal(model, (x, y), "ce", "backpack")
    assert all(t.dtype == torch.float32 for t in bp.values())
    # float32 end to end against the float64 reference: single-precision rounding only.
    assert max_relative_error(bp, reference_diagonal(model, "ce", x, y)) < 1e-5


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)

    def forward(self, x):
        return x + self.inner(x)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)), r"'1' \(BatchNorm1d\)"),
        (nn.Sequential(nn.Linear(6, 5), Residual(), nn.Tanh(), nn.Linear(5, 3)), r"'1' \(Residual\)"),
        (Wrapper(), r"nn.Sequential model, got Wrapper"),
        (nn.Sequential(nn.Linear(6, 5), nn.Hardswish(), nn.Linear(5, 3)), r"'1' \(Hardswish\)"),
    ],
)
def test_untraversable_models_are_refused_naming_the_module(model, named, tiny_classification):
    with pytest.raises(BackpackUnsupportedError, match=named + r".*--estimator hutchinson"):
        hessdiag.measure(model, tiny_classification, "ce", "backpack")
    assert issubclass(BackpackUnsupportedError, EstimatorError)


def test_works_under_no_grad(tiny_classification):
    model = tiny_mlp("softplus")
    x, y = tiny_classification
    with torch.no_grad():
        bp = hessdiag.hessian_diagonal(model, (x, y), "ce", "backpack", dtype="float64")
    assert max_relative_error(bp, reference_diagonal(model, "ce", x, y)) < BACKPACK_RTOL
