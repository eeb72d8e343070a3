"""The exact estimator against the independent float64 reference Hessian."""

import re

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.estimators import EstimatorError, EstimatorOptions, ExactEstimator
from hessdiag.objective import Objective
from hessdiag.operators import HessianOperator

from ..models import tiny_mlp, tiny_cnn, image_data
from ..reference import max_relative_error, reference_diagonal, reference_ggn_diagonal

# Both sides are float64 computations of the same quantity by different routes
# (vmapped forward-over-reverse HVPs vs. reverse-over-reverse full Hessian); rounding
# differences are O(1e-15) relative, so 1e-10 leaves ample room yet fails any real bug.
EXACT_RTOL = 1e-10


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "rct:n=1,alpha=14", "rct:n=2,alpha=7", "silu"])
def test_exact_equals_autograd_hessian_diagonal_on_tiny_mlp(loss, activation, tiny_classification):
    model = tiny_mlp(activation)
    x, y = tiny_classification
    diag = hessdiag.hessian_diagonal(model, (x, y), loss=loss, dtype="float64", batch_size=7)
    assert max_relative_error(diag, reference_diagonal(model, loss, x, y)) < EXACT_RTOL


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_exact_equals_autograd_hessian_diagonal_on_tiny_cnn(loss):
    model = tiny_cnn("rct:n=0,alpha=28")
    x, y = image_data()
    diag = hessdiag.hessian_diagonal(model, (x, y), loss=loss, dtype="float64", batch_size=5)
    assert max_relative_error(diag, reference_diagonal(model, loss, x, y)) < EXACT_RTOL


def test_batch_size_does_not_change_the_result(tiny_classification):
    model = tiny_mlp()
    x, y = tiny_classification
    one = hessdiag.measure(model, (x, y), dtype="float64", batch_size=3, keep_diagonal=True)
    two = hessdiag.measure(model, (x, y), dtype="float64", batch_size=20, keep_diagonal=True)
    # Only the summation order differs: float64 rounding.
    assert max_relative_error(one.diagonal, two.diagonal) < 1e-13
    assert one.normalized_norm == pytest.approx(two.normalized_norm, rel=1e-13)


def test_dataloader_and_tensor_pair_agree(tiny_classification):
    model = tiny_mlp()
    x, y = tiny_classification
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    a = hessdiag.hessian_diagonal(model, loader, dtype="float64")
    b = hessdiag.hessian_diagonal(model, (x, y), dtype="float64")
    assert max_relative_error(a, b) < 1e-13


def test_measurement_leaves_parameters_grads_and_mode_unchanged(tiny_classification):
    model = tiny_mlp()
    x, y = tiny_classification
    model.train()
    model[1].eval()  # a mixed train/eval state must come back exactly
    model(x).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    hessdiag.measure(model, (x, y), dtype="float64")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.dtype == torch.float32
        assert torch.equal(p.grad, grads[n])
    assert [m.training for m in model.modules()] == modes


def test_measures_in_eval_mode_with_batchnorm_running_statistics(tiny_classification):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = tiny_classification
    model.train()
    model(x)  # moves the running statistics away from their initial values
    diag = hessdiag.hessian_diagonal(model, (x, y), dtype="float64", batch_size=4)
    assert max_relative_error(diag, reference_diagonal(model, "ce", x, y)) < EXACT_RTOL
    assert model.training


def test_frozen_parameters_are_not_measured(tiny_classification):
    model = tiny_mlp()
    model[1].weight.requires_grad_(False)
    x, y = tiny_classification
    diag = hessdiag.hessian_diagonal(model, (x, y), dtype="float64")
    assert "1.weight" not in diag
    assert max_relative_error(diag, reference_diagonal(model, "ce", x, y)) < EXACT_RTOL


def test_refuses_above_the_parameter_budget_and_says_how_long():
    model = tiny_cnn()  # not an MLP: the HVP path, which the budget is for
    data = image_data()
    with pytest.raises(EstimatorError, match=r"exceed the budget of 10 \(estimated .*\).*hutchinson"):
        hessdiag.measure(model, data, max_params=10)
    forced = hessdiag.measure(model, data, max_params=10, force=True)
    assert forced.hvps == forced.num_params


def test_refusal_is_immediate_runs_no_hvp_and_no_full_batch(monkeypatch):
    # A big batch: the old estimate timed a 128-probe HVP block on all of it (ResNet-18 on
    # a 512-batch ran out of memory before refusing). Now: no HVP, small gradients only.
    from hessdiag.estimators import exact

    hvp_calls, loss_batches = [], []
    batch_hvp, batch_loss = HessianOperator.batch_product, Objective.batch_loss

    def counting_hvp(self, chunk, x, y):
        hvp_calls.append(x.shape[0])
        return batch_hvp(self, chunk, x, y)

    def counting_loss(self, params, x, y):
        loss_batches.append(x.shape[0])
        return batch_loss(self, params, x, y)

    monkeypatch.setattr(HessianOperator, "batch_product", counting_hvp)
    monkeypatch.setattr(Objective, "batch_loss", counting_loss)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4096, 1, 5, 5, generator=g), torch.randint(0, 3, (4096,), generator=g)
    with pytest.raises(EstimatorError) as info:
        hessdiag.measure(tiny_cnn(), (x, y), batch_size=4096, max_params=10)
    message = str(info.value)
    assert hvp_calls == []
    assert loss_batches and max(loss_batches) <= exact.TIMING_EXAMPLES
    assert "\n" not in message
    assert re.fullmatch(
        r"exact: [\d,]+ parameters exceed the budget of 10 \(estimated [^)]+: [\d,]+ HVPs over "
        r"4,096 examples\); use the hutchinson estimator, or force it \(--force / force=True\)",
        message), message


def test_cost_model_of_the_refusal(monkeypatch):
    # seconds ≈ HVP_GRADIENTS · P · N · g, with g the timed gradient's seconds per example;
    # before any data pass N is first batch × batches ("about").
    from hessdiag.estimators import exact

    monkeypatch.setattr(exact, "_gradient_seconds_per_example", lambda objective, x, y: 1e-3)
    objective = Objective(tiny_cnn(), image_data(n=10), "ce", batch_size=4)
    estimator = ExactEstimator(EstimatorOptions(max_params=10))
    expected = exact.HVP_GRADIENTS * objective.num_params * 12 * 1e-3
    assert estimator.estimated_seconds(objective) == pytest.approx(expected)
    assert "HVPs over about 12 examples" in estimator.refusal(objective, 10)
    list(objective.batches())  # a full pass counts the examples exactly
    assert estimator.estimated_seconds(objective) == pytest.approx(expected * 10 / 12)
    assert "HVPs over 10 examples" in estimator.refusal(objective, 10)
    with pytest.raises(EstimatorError, match="exceed the budget of 10"):
        estimator.estimate(objective)


def test_analytic_mlp_path_ignores_the_budget_and_spends_no_hvps(tiny_classification):
    result = hessdiag.measure(tiny_mlp(), tiny_classification, max_params=10)
    assert result.hvps == 0


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mlp_fast_path_and_basis_hvps_agree_with_the_reference(loss, tiny_classification):
    model = tiny_mlp("rct:n=2,alpha=7")
    x, y = tiny_classification
    objective = Objective(model, (x, y), loss, dtype=torch.float64, batch_size=7)
    fast = ExactEstimator().estimate(objective)
    slow = ExactEstimator(analytic=False).estimate(objective)
    assert fast.info["method"] == "analytic-mlp" and fast.hvps == 0
    assert slow.info["method"] == "basis-hvp" and slow.hvps == objective.num_params
    reference = reference_diagonal(model, loss, x, y)
    assert max_relative_error(fast.diagonal, reference) < EXACT_RTOL
    assert max_relative_error(slow.diagonal, reference) < EXACT_RTOL
    # the recursion's exact GGN diagonal is handed to the objective's GGN operator
    assert objective.ggn.diagonal_method == "analytic-mlp"
    assert max_relative_error(objective.ggn.known_diagonal, reference_ggn_diagonal(model, loss, x, y)) < EXACT_RTOL


def test_unsupported_models_fall_back_silently(recwarn):
    model = tiny_cnn()
    objective = Objective(model, image_data(), "ce", dtype=torch.float64)
    assert ExactEstimator().estimate(objective).info["method"] == "basis-hvp"
    # An MLP whose inputs are not [batch, features] (Linear over the last axis): HVPs too.
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(5, 2, 4), torch.randn(5, 2, 2)
    objective = Objective(seq, (x, y), "mse", dtype=torch.float64)
    estimate = ExactEstimator().estimate(objective)
    assert estimate.info["method"] == "basis-hvp"
    assert max_relative_error(estimate.diagonal, reference_diagonal(seq, "mse", x, y)) < EXACT_RTOL
    assert not recwarn.list


def test_double_backward_fallback_matches(monkeypatch):
    model = tiny_cnn()
    x, y = image_data()

    def broken(self, *args):
        raise NotImplementedError("Trying to use forward AD with aten::foo that does not support it")

    monkeypatch.setattr(HessianOperator, "_func_product", broken)
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        diag = hessdiag.hessian_diagonal(model, (x, y), dtype="float64", batch_size=8)
    assert max_relative_error(diag, reference_diagonal(model, "ce", x, y)) < EXACT_RTOL
