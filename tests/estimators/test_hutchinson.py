"""Stochastic estimators (hutchinson*, docs/index.md, "Estimators") against exact float64 Hessian diagonals."""

import math

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.estimators import ESTIMATORS, EstimatorError
from hessdiag.models import resnet18_cifar

from ..models import tiny_mlp, write_digits_checkpoint
from ..reference import flat, max_relative_error, reference_diagonal

STOCHASTIC = ["hutchinson", "hutchinson-plain", "hutchinson-ggn"]  # hutchinson = low-rank


class SeparableNet(nn.Module):
    """Outputs tanh(xⱼ wⱼ) for two weight tensors on disjoint inputs: with ``mse`` every
    parameter enters exactly one output term, so the loss Hessian is diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor([0.3, -0.7, 1.1]))
        self.w2 = nn.Parameter(torch.tensor([[0.5, 0.2], [-0.4, 0.9]]))

    def forward(self, x):
        return torch.tanh(torch.cat([x[:, :3] * self.w1, x[:, 3:] * self.w2.reshape(-1)], 1))


def norm(diag):
    values = flat(diag)
    return float(values.norm()) / math.sqrt(values.numel())


# Not hutchinson (low-rank + residual): its residual H − A is not diagonal when the sketch misses
# directions, so single probes are not exact there (its unbiasedness is tested below).
@pytest.mark.parametrize("estimator", ["hutchinson-plain", "hutchinson-ggn"])
def test_exact_when_the_hessian_is_diagonal(estimator):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(15, 7, generator=g), torch.randn(15, 7, generator=g)
    model = SeparableNet()
    ref = reference_diagonal(model, "mse", x, y)
    res = hessdiag.measure(model, (x, y), "mse", estimator, samples=24, dtype="float64",
                           keep_diagonal=True)
    # Every Rademacher probe gives z ⊙ Hz = diag H exactly (and G, H − G are diagonal
    # too), so only rounding remains.
    assert max_relative_error(res.diagonal, ref) < 1e-12
    assert res.normalized_norm == pytest.approx(norm(ref), rel=1e-12)
    assert res.ci95 == pytest.approx((norm(ref), norm(ref)), rel=1e-6)


def test_separable_net_has_a_diagonal_hessian():
    from ..reference import reference_hessian

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(15, 7, generator=g), torch.randn(15, 7, generator=g)
    h = reference_hessian(SeparableNet(), "mse", x, y)
    assert float((h - torch.diag(h.diagonal())).abs().max()) == 0.0
    assert float(h.diagonal().abs().min()) > 0.0


@pytest.mark.parametrize("estimator", STOCHASTIC)
def test_unbiased_norm_and_interval_coverage(estimator, tiny_classification):
    # 60 seeded runs of 16 HVPs on a tiny MLP (P = 65) whose ‖H‖_F²/‖d‖² makes the naive
    # norm overshoot by several percent. Checks: (1) the mean of the squared-norm
    # estimates is within 4 standard errors of the exact ‖d‖² (a biased statistic such as
    # the naive ‖mean‖² lies > 10 SE away — tried); (2) the 95 % intervals cover the exact
    # value in ≥ 50 of 60 runs (4.7 sd below the 57 expected at 95 % coverage); (3) the pooled
    # diagonal is unbiased entrywise.
    model = tiny_mlp()
    x, y = tiny_classification
    ref = reference_diagonal(model, "ce", x, y)
    truth_sq = float(flat(ref).pow(2).sum())
    num_params = flat(ref).numel()
    sq, naive, covered, diags = [], [], 0, []
    for seed in range(60):
        res = hessdiag.measure(model, (x, y), "ce", estimator, samples=16, seed=seed,
                               dtype="float64", keep_diagonal=True)
        sq.append(res.norm**2)
        naive.append(res.naive_normalized_norm**2 * num_params)
        lo, hi = res.ci95
        covered += lo <= norm(ref) <= hi
        diags.append(flat(res.diagonal))
    values = torch.tensor(sq, dtype=torch.float64)
    se = float(values.std()) / math.sqrt(len(sq))
    assert abs(float(values.mean()) - truth_sq) < 4 * se + 1e-12 * truth_sq
    assert covered >= 50
    stacked = torch.stack(diags)
    z = (stacked.mean(0) - flat(ref)) / (stacked.std(0) / math.sqrt(60) + 1e-15)
    assert float(z.abs().max()) < 5.0
    if estimator == "hutchinson-plain":  # the bias the U-statistic removes is visible here
        bias = float(torch.tensor(naive).mean()) - truth_sq
        assert bias > 10 * se


@pytest.mark.parametrize("estimator", STOCHASTIC)
def test_chunk_and_batch_size_do_not_change_the_result(estimator, tiny_classification):
    model = tiny_mlp()
    x, y = tiny_classification
    one = hessdiag.measure(model, (x, y), "ce", estimator, samples=40, dtype="float64",
                           batch_size=7, chunk_size=3, keep_diagonal=True)
    two = hessdiag.measure(model, (x, y), "ce", estimator, samples=40, dtype="float64",
                           batch_size=20, chunk_size=32, keep_diagonal=True)
    assert max_relative_error(one.diagonal, two.diagonal) < 1e-12
    assert one.normalized_norm == pytest.approx(two.normalized_norm, rel=1e-10)
    assert one.ci95 == pytest.approx(two.ci95, rel=1e-8)
    assert one.hvps == two.hvps == 40


@pytest.mark.parametrize("estimator", STOCHASTIC)
@pytest.mark.parametrize("activation", ["silu", "mish", "gelu", "rct:n=1,alpha=14"])
def test_smooth_activations_work(estimator, activation, tiny_classification):
    # 256 HVPs: each variant's interval at this budget is a few percent wide; require the
    # exact value inside it or within 10 % (a failing HVP path gives NaN or nonsense).
    model = tiny_mlp(activation)
    x, y = tiny_classification
    exact = norm(reference_diagonal(model, "ce", x, y))
    res = hessdiag.measure(model, (x, y), "ce", estimator, samples=256, seed=1, dtype="float64")
    assert res.normalized_norm == pytest.approx(exact, rel=0.1)
    lo, hi = res.ci95
    assert lo <= exact <= hi or abs(res.normalized_norm - exact) < 0.03 * exact


def test_float32_runs_and_agrees(tiny_classification):
    model = tiny_mlp("silu")
    x, y = tiny_classification
    a = hessdiag.measure(model, (x, y), "ce", "hutchinson", samples=64, dtype="float32")
    b = hessdiag.measure(model, (x, y), "ce", "hutchinson", samples=64, dtype="float64")
    assert a.dtype == "float32"
    assert a.normalized_norm == pytest.approx(b.normalized_norm, rel=1e-4)


def test_adaptive_stopping_reaches_rtol_or_the_cap(tiny_classification):
    model = tiny_mlp()
    x, y = tiny_classification
    res = hessdiag.measure(model, (x, y), "ce", "hutchinson", rtol=0.05, max_samples=2048,
                           dtype="float64")
    lo, hi = res.ci95
    assert res.hvps < 2048
    assert (hi - lo) / 2 <= 0.05 * res.normalized_norm * 1.0001
    capped = hessdiag.measure(model, (x, y), "ce", "hutchinson", rtol=1e-4, max_samples=64,
                              dtype="float64")
    assert capped.hvps == 64


def test_reproducible_and_seed_dependent(tiny_classification):
    model = tiny_mlp()
    x, y = tiny_classification
    runs = [hessdiag.measure(model, (x, y), "ce", "hutchinson", samples=16, seed=s,
                             dtype="float64").normalized_norm for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


def test_too_small_a_budget_is_a_user_error(tiny_classification):
    x, y = tiny_classification
    with pytest.raises(EstimatorError, match="raise --samples"):
        hessdiag.measure(tiny_mlp(), (x, y), "ce", "hutchinson-plain", samples=2)


def test_registry_names():
    assert set(STOCHASTIC) <= set(ESTIMATORS)


def test_tiny_resnet_with_batchnorm_matches_exact():
    # Width 1, 6×6 inputs: P ≈ 2.8k, small enough for the exact estimator in float64.
    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=3, activation="silu", width=1, in_channels=1)
    model.train()
    with torch.no_grad():  # non-trivial running statistics, then measure in eval mode
        model(torch.randn(16, 1, 6, 6))
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 6, 6, generator=g), torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = hessdiag.measure(model, (x, y), "ce", "exact", dtype="float64").normalized_norm
    for estimator in STOCHASTIC:
        res = hessdiag.measure(model, (x, y), "ce", estimator, samples=64, dtype="float64")
        lo, hi = res.ci95
        assert lo <= exact <= hi, estimator
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_options_flow_through(tmp_path, capsys):
    import json

    from hessdiag.cli import main

    ckpt = tmp_path / "small.pt"
    write_digits_checkpoint(ckpt, activation="mish")
    out = tmp_path / "fixed.json"
    assert main(["measure", str(ckpt), "--max-examples", "40", "--estimator", "hutchinson",
                 "--samples", "24", "--seed", "3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["estimator"] == "hutchinson" and doc["hvps"] == 24 and doc["seed"] == 3
    assert doc["ci95"][0] <= doc["normalized_norm"] <= doc["ci95"][1]
    assert doc["naive_normalized_norm"] is not None
    adaptive = tmp_path / "adaptive.json"
    assert main(["measure", str(ckpt), "--max-examples", "40", "--estimator", "hutchinson-plain",
                 "--rtol", "0.001", "--max-samples", "40", "--json", str(adaptive)]) == 0
    assert json.loads(adaptive.read_text())["hvps"] == 40  # rtol unreachable: the cap stops it
    assert main(["measure", str(ckpt), "--estimator", "hutchinson", "--samples", "4"]) == 2
    assert "raise --samples" in capsys.readouterr().err


def test_models_without_forward_mode_ad(tiny_classification, monkeypatch):
    # hutchinson falls back to double backward (warning once); hutchinson-ggn, whose fused
    # residual product has no such route, stops with a one-line user error.
    from hessdiag.operators import HessianOperator, ResidualOperator

    def broken(self, *args):
        raise NotImplementedError("Trying to use forward AD with aten::foo that does not support it")

    monkeypatch.setattr(HessianOperator, "_func_product", broken)
    monkeypatch.setattr(ResidualOperator, "batch_product", broken)
    model = tiny_mlp()
    x, y = tiny_classification
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        res = hessdiag.measure(model, (x, y), "ce", "hutchinson", samples=256, dtype="float64")
    assert res.normalized_norm == pytest.approx(norm(reference_diagonal(model, "ce", x, y)), rel=0.1)
    with pytest.raises(EstimatorError, match="use hutchinson"):
        hessdiag.measure(model, (x, y), "ce", "hutchinson-ggn", samples=16)
