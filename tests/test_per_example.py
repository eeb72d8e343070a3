"""Per-example square rules: Σₙ wₙ (∂sₙ/∂θ)² from one batched output gradient.

The reference loops over the examples: for example n it runs the layer on xₙ alone,
backpropagates the output gradient gₙ with ``torch.autograd.grad`` and squares the
result. Everything is float64 and both sides sum a handful of products of the same
numbers in different orders, so they agree to ~1e-16 relative; 1e-12 fails any wrong
index, stride, padding or group layout by many orders of magnitude.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import per_example
from hessdiag.curvature_tape import tape_ggn_diagonal
from hessdiag.objective import Objective
from hessdiag.per_example import CHUNK_NUMBERS, AffineCall, conv_padding, param_call_problem

RTOL = 1e-12


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64)


def reference_squares(func, x, grad, weights, params: dict, call) -> dict:
    """Σₙ wₙ (per-example gradient)² by looping over the examples with autograd.

    ``call(func, xₙ, params)`` runs the layer on one example [1, …] with the parameter
    tensors ``params`` (leaves requiring gradients).
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    for n in range(x.shape[0]):
        out = call(func, x[n : n + 1], leaves)
        grads = torch.autograd.grad(out, list(leaves.values()), grad[n : n + 1])
        for (k, _), g in zip(leaves.items(), grads):
            total[k] += weights[n] * g.pow(2)
    return total


def assert_close(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    for name, value in expected.items():
        scale = float(value.abs().max())
        assert scale > 0
        assert float((found[name] - value).abs().max()) <= RTOL * scale, name


def record(func, x, args, kwargs, names) -> AffineCall:
    """An AffineCall as the tape records it (input detached, its version noted)."""
    return AffineCall(func, x.detach(), args, kwargs, names, x._version)


# -- F.linear ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (5, 3, 4), (5, 2, 3, 4)],
                         ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rule_matches_per_example_gradients(shape, bias):
    x = randn(*shape, seed=1)
    weight, b = randn(6, 4, seed=2), randn(6, seed=3)
    grad = randn(*shape[:-1], 6, seed=4)
    weights = torch.rand(shape[0], generator=generator(5), dtype=torch.float64)
    params = {"weight": weight, "bias": b} if bias else {"weight": weight}
    names = {k: f"layer.{k}" for k in params}
    call = record(F.linear, x, (x, weight, b if bias else None), {}, names)
    found = call.square_sums(grad, weights)
    expected = reference_squares(
        F.linear, x, grad, weights, params,
        lambda f, xn, p: f(xn, p["weight"], p.get("bias")),
    )
    assert_close(found, {names[k]: v for k, v in expected.items()})


def test_linear_rule_reports_only_the_parameters_in_theta():
    x, weight, b = randn(5, 4, seed=1), randn(6, 4, seed=2), randn(6, seed=3)
    grad, weights = randn(5, 6, seed=4), torch.ones(5, dtype=torch.float64)
    frozen_weight = record(F.linear, x, (x, weight, b), {}, {"bias": "fc.bias"})
    assert set(frozen_weight.square_sums(grad, weights)) == {"fc.bias"}


def test_linear_rule_chunks_many_positions(monkeypatch):
    """With a tiny chunk budget every example is its own chunk; the sums must not change."""
    x, weight = randn(5, 7, 4, seed=1), randn(6, 4, seed=2)
    grad = randn(5, 7, 6, seed=4)
    weights = torch.rand(5, generator=generator(5), dtype=torch.float64)
    whole = record(F.linear, x, (x, weight), {}, {"weight": "w"}).square_sums(grad, weights)
    monkeypatch.setattr("hessdiag.per_example.CHUNK_NUMBERS", 1)
    monkeypatch.setattr("hessdiag.per_example.CPU_CHUNK_NUMBERS", 1)
    chunked = record(F.linear, x, (x, weight), {}, {"weight": "w"}).square_sums(grad, weights)
    assert CHUNK_NUMBERS > 1
    assert_close(chunked, whole)


# -- F.conv1d / F.conv2d ---------------------------------------------------------------------

CONV_CASES = [
    # (dims, in_channels, out_channels, kernel, stride, padding, dilation, groups)
    (1, 2, 3, 3, 1, 0, 1, 1),
    (1, 2, 4, 3, 2, 1, 1, 2),
    (1, 3, 3, 2, 1, "valid", 2, 3),
    (1, 2, 3, 3, 1, "same", 2, 1),
    (2, 2, 3, 3, 1, 1, 1, 1),
    (2, 2, 3, 3, 2, 1, 1, 1),
    (2, 2, 4, 3, (2, 1), (1, 0), (1, 2), 2),
    (2, 4, 4, 3, 1, "same", 1, 4),
    (2, 2, 3, 3, 1, "same", (2, 1), 1),
    (2, 2, 3, (2, 3), 1, "valid", 1, 1),
    (2, 3, 6, 1, 2, 0, 1, 3),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
def test_conv_rule_matches_per_example_gradients(case, bias, keywords):
    dims, c_in, c_out, kernel, stride, padding, dilation, groups = case
    func = F.conv1d if dims == 1 else F.conv2d
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    x = randn(5, c_in, *(7,) * dims, seed=1)
    weight, b = randn(c_out, c_in // groups, *kernel, seed=2), randn(c_out, seed=3)
    options = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    out = func(x, weight, b, **options)
    grad = randn(*out.shape, seed=4)
    weights = torch.rand(5, generator=generator(5), dtype=torch.float64)
    params = {"weight": weight, "bias": b} if bias else {"weight": weight}
    names = {k: f"conv.{k}" for k in params}
    if keywords:
        args, kwargs = (x, weight), {"bias": b if bias else None, **options}
    else:
        args, kwargs = (x, weight, b if bias else None, stride, padding, dilation, groups), {}
    assert param_call_problem(func, args, kwargs) is None
    found = record(func, x, args, kwargs, names).square_sums(grad, weights)
    expected = reference_squares(
        func, x, grad, weights, params,
        lambda f, xn, p: f(xn, p["weight"], p.get("bias"), **options),
    )
    assert_close(found, {names[k]: v for k, v in expected.items()})


def test_conv_rule_reuses_its_unfolded_input_across_passes():
    x, weight = randn(4, 2, 6, 6, seed=1), randn(3, 2, 3, 3, seed=2)
    call = record(F.conv2d, x, (x, weight, None, 1, 1), {}, {"weight": "w"})
    weights = torch.ones(4, dtype=torch.float64)
    first = call.square_sums(randn(4, 3, 6, 6, seed=3), weights)
    unfolded = call.cache["unfolded"]
    second = call.square_sums(randn(4, 3, 6, 6, seed=4), weights)
    assert call.cache["unfolded"] is unfolded
    assert not torch.equal(first["w"], second["w"])


def test_asymmetric_same_padding_has_no_rule():
    weight = randn(3, 2, 2, 2, seed=2)
    x = randn(4, 2, 5, 5, seed=1)
    assert "asymmetric" in param_call_problem(F.conv2d, (x, weight, None, 1, "same"), {})
    assert conv_padding("same", (3, 3), (1, 1), (1, 1)) == (1, 1)
    assert conv_padding("same", (2, 3), (1, 1), (1, 1)) is None  # even kernel
    assert conv_padding("same", (2,), (2,), (1,)) == (1,)  # dilation makes it symmetric


# -- F.batch_norm (eval mode) -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4), (5, 3, 4, 4)], ids=["1d", "1d-seq", "2d"])
@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
def test_batch_norm_rule_matches_per_example_gradients(shape, keywords):
    x = randn(*shape, seed=1)
    mean, var = 0.3 * randn(3, seed=2), 0.5 + torch.rand(3, generator=generator(3),
                                                         dtype=torch.float64)
    weight, b = 1.0 + randn(3, seed=4), randn(3, seed=5)
    eps = 1e-3  # not the default, so a rule that ignores it fails
    grad = randn(*shape, seed=6)
    weights = torch.rand(5, generator=generator(7), dtype=torch.float64)
    names = {"weight": "bn.weight", "bias": "bn.bias"}
    if keywords:
        args = (x, mean, var)
        kwargs = {"weight": weight, "bias": b, "training": False, "eps": eps}
    else:
        args, kwargs = (x, mean, var, weight, b, False, 0.1, eps), {}
    found = record(F.batch_norm, x, args, kwargs, names).square_sums(grad, weights)
    expected = reference_squares(
        F.batch_norm, x, grad, weights, {"weight": weight, "bias": b},
        lambda f, xn, p: f(xn, mean, var, p["weight"], p["bias"], False, 0.1, eps),
    )
    assert_close(found, {names[k]: v for k, v in expected.items()})


# -- the recorded input must not change ---------------------------------------------------------


@pytest.mark.parametrize("func, shape", [(F.linear, (4, 3)), (F.conv2d, (4, 2, 5, 5)),
                                         (F.batch_norm, (4, 2, 5, 5))],
                         ids=["linear", "conv2d", "batch_norm"])
def test_modifying_a_recorded_input_in_place_raises(func, shape):
    x = randn(*shape, seed=1)
    if func is F.linear:
        args, grad = (x, randn(2, 3, seed=2)), randn(4, 2, seed=3)
    elif func is F.conv2d:
        args, grad = (x, randn(3, 2, 3, 3, seed=2)), randn(4, 3, 3, 3, seed=3)
    else:
        ones = torch.ones(2, dtype=torch.float64)
        args, grad = (x, 0 * ones, ones, ones, 0 * ones, False), randn(*shape, seed=3)
    call = record(func, x, args, {}, {"weight": "w"})
    weights = torch.ones(4, dtype=torch.float64)
    call.square_sums(grad, weights)  # fine before the change
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        call.square_sums(grad, weights)


# -- chunking through the tape ------------------------------------------------------------


def _chunk_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5), nn.SiLU(), nn.Linear(5, 3),
    ).double()
    for module in net:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("chunk", [1 << 24, 64, 1])
def test_ggn_squares_match_torch_func_for_any_chunk(monkeypatch, chunk):
    """Chunks from all examples at once down to one example at a time give the same sums."""
    monkeypatch.setattr(per_example, "CPU_CHUNK_NUMBERS", chunk)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    objective = Objective(_chunk_net(), (x, y), "ce", batch_size=None)
    reference = objective.ggn.per_example_diagonal()
    taped = tape_ggn_diagonal(objective)
    for name, value in reference.items():
        scale = float(value.abs().max())
        assert float((taped[name] - value).abs().max()) <= 1e-12 * scale, name
