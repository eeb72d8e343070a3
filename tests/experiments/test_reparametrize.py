"""Reparametrizing RCT-AF networks to α = 1: same outputs, a different raw curvature, the
same invariant curvature."""

import copy

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.activations import RCTAF, get_activation
from hessdiag.experiments import (ReparametrizationError, invariant_normalized_norm,
                                  parameter_scales, relative_diagonal, reparametrize)
from hessdiag.models import BasicBlock, cnn, mlp, resnet18_cifar, wide_resnet
from hessdiag.result import normalized_norm

ALPHAS = {0: 2.5, 1: 14.0, 2: 0.4}  # α ≠ 1, above and below


def _randomize_batchnorm(model):
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2),
                              (m.weight.data, 0.5, 2), (m.bias.data, -1, 1)):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model


def _build(kind, n, alpha):
    spec = f"rct:n={n},alpha={alpha}"
    torch.manual_seed(1)
    if kind == "mlp":
        return mlp(in_features=6, hidden=(5, 4), num_classes=3, activation=spec), (6,)
    if kind == "cnn":
        return cnn(in_channels=1, image_size=5, channels=(2, 3), num_classes=3, activation=spec), (1, 5, 5)
    if kind == "resnet18_cifar":
        return resnet18_cifar(num_classes=3, activation=spec, width=2, in_channels=1), (1, 8, 8)
    return wide_resnet(depth=10, widen=1, num_classes=3, activation=spec, in_channels=1), (1, 8, 8)


def _data(shape, n=10):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet18_cifar", "wide_resnet"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_outputs_are_identical_after_reparametrizing(kind, n):
    model, shape = _build(kind, n, ALPHAS[n])
    model = _randomize_batchnorm(model.double()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = _data(shape)
    new = reparametrize(model)
    assert all(m.alpha == 1.0 and m.n == n for m in new.modules() if isinstance(m, RCTAF))
    assert all(m.alpha == ALPHAS[n] for m in model.modules() if isinstance(m, RCTAF))  # untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _rel(model(x), new(x)) <= 1e-12
    model.train(), new.train()  # batch statistics: BatchNorm inputs keep their scale
    assert _rel(model(x), new(x)) <= 1e-12
    # not a vacuous check: switching α without rescaling changes the outputs
    naive = copy.deepcopy(model).eval()
    for m in naive.modules():
        if isinstance(m, RCTAF):
            m.alpha = 1.0
    model.eval()
    assert _rel(model(x), naive(x)) > 1e-3


def test_any_target_alpha_and_the_scale_factors_of_an_mlp():
    model, shape = _build("mlp", 1, 6.0)
    model = model.double()
    x, _ = _data(shape)
    assert _rel(model(x), reparametrize(model, alpha=0.5)(x)) <= 1e-12
    scales = parameter_scales(model)  # c = α/1 = 6
    assert scales == {"1.weight": 6.0, "1.bias": 6.0,  # before the first activation
                      "3.weight": 1.0, "3.bias": 6.0,  # between two activations
                      "5.weight": 1 / 6, "5.bias": 1.0}  # after the last one
    new = reparametrize(model)
    for name, p in new.named_parameters():
        q = dict(model.named_parameters())[name]
        assert torch.allclose(p, q * scales[name], rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_raw_norm_changes_but_invariant_norm_does_not(kind, n):
    model, shape = _build(kind, n, ALPHAS[n])
    model = model.double()
    data = _data(shape)
    new = reparametrize(model)
    d = hessdiag.hessian_diagonal(model, data, estimator="exact", dtype="float64")
    d_new = hessdiag.hessian_diagonal(new, data, estimator="exact", dtype="float64")
    raw, raw_new = normalized_norm(d), normalized_norm(d_new)
    assert abs(raw_new - raw) / raw > 0.05  # the raw measure depends on the coordinates
    inv, inv_new = invariant_normalized_norm(model, d), invariant_normalized_norm(new, d_new)
    assert abs(inv_new - inv) / inv <= 1e-10
    # entry by entry, biases included
    rel, rel_new = relative_diagonal(model, d), relative_diagonal(new, d_new)
    for name in rel:
        assert torch.allclose(rel[name], rel_new[name], rtol=1e-10, atol=1e-12 * inv), name


def test_invariance_covers_batchnorm_parameters_and_residual_blocks():
    """resnet18_cifar's building blocks (identity and 1×1-conv shortcuts), small enough for
    the exact diagonal: conv–BN–φ stem, two BasicBlocks, pooling, Linear (273 parameters)."""
    spec = "rct:n=2,alpha=3"
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), get_activation(spec),
        BasicBlock(2, 2, 1, spec), BasicBlock(2, 3, 2, spec),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    model = _randomize_batchnorm(model.double()).eval()
    data = _data((1, 4, 4), n=6)
    new = reparametrize(model)
    d = hessdiag.hessian_diagonal(model, data, estimator="exact", dtype="float64")
    d_new = hessdiag.hessian_diagonal(new, data, estimator="exact", dtype="float64")
    assert abs(normalized_norm(d_new) - normalized_norm(d)) / normalized_norm(d) > 0.05
    inv, inv_new = invariant_normalized_norm(model, d), invariant_normalized_norm(new, d_new)
    assert abs(inv_new - inv) / inv <= 1e-10


class _TwoActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.a, self.b = RCTAF(1, 2.0), RCTAF(1, 3.0)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.out(self.a(h) + self.b(h))


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), RCTAF(1, 2.0)

    def forward(self, x):
        return self.lin(self.act(self.lin(x)))


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "Tanh"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), RCTAF(1, 2.0), nn.Linear(4, 2)), "LayerNorm"),
    (nn.Sequential(nn.Linear(4, 4), RCTAF(1, 2.0), nn.BatchNorm1d(4), nn.Linear(4, 2)), "BatchNorm"),
    (nn.Sequential(nn.Linear(4, 4), RCTAF(1, 2.0)), "output"),
    (_TwoActivations(), "alpha=3"),
    (_Reused(), "twice"),
])
def test_unsupported_structures_are_refused_with_a_clear_error(model, message):
    with pytest.raises(ReparametrizationError, match=message):
        reparametrize(model)


def test_relative_diagonal_checks_names():
    model, _ = _build("mlp", 1, 2.0)
    with pytest.raises(hessdiag.HessdiagError, match="not a parameter"):
        relative_diagonal(model, {"nope": torch.zeros(1)})
