"""Activations: RCT-AF closed forms and autograd plumbing, derivative interface, registry, ψ_max."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from hessdiag.activations import (
    ACTIVATION_NAMES,
    RCTAF,
    UnsupportedActivationError,
    activation_derivatives,
    curvature_profile,
    get_activation,
    psi_max,
    rct_af,
    rct_af_derivative,
)

ALPHAS = (0.5, 1.0, 7.0, 14.0, 28.0, 50.0)
C_N = {0: 0.25, 1: 0.5, 2: 1.0}


def plain_rct(x: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """The textbook formulas, differentiated by ordinary autograd as the reference."""
    s = torch.sigmoid(alpha * x)
    if n == 0:
        return torch.log(1 + torch.exp(alpha * x)) / alpha
    if n == 1:
        return x * s
    return x * (s + alpha * x * s * (1 - s))


def autograd_derivatives(fn, x: torch.Tensor, order: int) -> list[torch.Tensor]:
    """[f, f', ..., f^(order)] at x by repeated backward of the sum (fn elementwise)."""
    x = x.detach().clone().requires_grad_(True)
    out = [fn(x)]
    for _ in range(order):
        (d,) = torch.autograd.grad(out[-1].sum(), x, create_graph=True)
        out.append(d)
    return [t.detach() for t in out]


def normwise_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


# ---------------------------------------------------------------------------------------------
# RCT-AF closed forms and autograd plumbing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_rct_derivatives_up_to_fourth_order_match_autograd_of_plain_formula(n, alpha):
    # The reference's autograd forms s(1 - s), which cancels: its relative error grows like
    # e^{|u|}·eps (docs/index.md "Activations" caveat: 2e-10 at |u| ≈ 17). Measured normwise against the largest
    # magnitude, the whole grid at α = 50 (|u| up to 150) still reaches 1.3e-13 of reference error;
    # on |αx| ≤ 8 the closed forms agree to 1.6e-14, so 1e-13 there keeps a 6x margin.
    x = torch.linspace(-3.0, 3.0, 1201, dtype=torch.float64)
    x = x[(alpha * x).abs() <= 8.0]
    ref = autograd_derivatives(lambda v: plain_rct(v, n, alpha), x, 4)
    through_function = autograd_derivatives(lambda v: rct_af(v, n, alpha), x, 3)
    for k in range(5):
        closed = rct_af_derivative(x, n, alpha, k)
        assert normwise_error(closed, ref[k]) < 1e-13, f"closed form of order {k}"
        if k <= 3:
            assert normwise_error(through_function[k], ref[k]) < 1e-13, f"autograd order {k}"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_rct_double_backward_returns_closed_form_curvature_bit_for_bit(n):
    x = torch.linspace(-2.0, 2.0, 101, dtype=torch.float64)
    _, _, d2 = autograd_derivatives(lambda v: rct_af(v, n, 7.0), x, 2)
    assert torch.equal(d2, rct_af_derivative(x, n, 7.0, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_rct_is_finite_and_correct_at_extreme_inputs(n, dtype):
    x = torch.tensor([0.0, 100.0, -100.0, 1e4, -1e4, 1e30, -1e30], dtype=dtype)
    x = x[torch.isfinite(x)]  # 1e30 overflows float16
    f, d1, d2 = autograd_derivatives(lambda v: RCTAF(n, 50.0)(v), x, 2)
    for t in (f, d1, d2, rct_af_derivative(x, n, 50.0, 3)):
        assert torch.isfinite(t).all()
    big = x.abs() >= 100
    pos = x >= 100
    # Far from 0 every member is the ReLU: f = x⁺, f' = 1[x > 0], f'' = 0.
    assert torch.equal(f[pos], x[pos]) and torch.equal(f[big & ~pos], torch.zeros_like(f[big & ~pos]))
    assert torch.equal(d1[big], pos[big].to(dtype))
    assert torch.equal(d2[big], torch.zeros_like(d2[big]))
    assert d2[0].item() == pytest.approx(C_N[n] * 50.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_rct_plain_backward_matches_the_closed_form_derivative(n, dtype):
    # A backward without create_graph (a training step) takes torch's fused kernels for
    # n = 0, 1 (softplus_backward, silu_backward). silu_backward forms 1 - σ(u), so near
    # the point where σ(u) rounds to 1 its relative error reaches u·eps: ≤ 40 ulp for
    # |u| ≤ 40 (float64); 64 ulp is the stated bound. n = 2 uses the closed form itself.
    # Relative to the magnitude of the closed form's terms (s, |u| q, q u² ...), since
    # f_1' and f_2' cross 0, where no formula has a small relative error.
    eps = torch.finfo(dtype).eps
    x = torch.linspace(-4.0, 4.0, 4001, dtype=dtype).requires_grad_(True)
    rct_af(x, n, 10.0).sum().backward()
    closed = rct_af_derivative(x.detach(), n, 10.0, 1)
    u = 10.0 * x.detach()
    s, q = torch.sigmoid(u), torch.sigmoid(u) * torch.sigmoid(-u)
    scale = s + u.abs() * q * (4.0 + u.abs())
    assert float(((x.grad - closed).abs() / scale).max()) <= 64 * eps
    big = torch.tensor([-1e4, -100.0, 100.0, 1e4], dtype=dtype, requires_grad=True)
    RCTAF(n, 50.0)(big).sum().backward()
    assert torch.equal(big.grad, (big.detach() > 0).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_rct_plain_backward_is_finite_where_alpha_x_overflows(n, dtype):
    x = torch.tensor([0.0, 1e4, -1e4], dtype=dtype, requires_grad=True)  # 50·1e4 is inf in float16
    RCTAF(n, 50.0)(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1] == 1 and x.grad[2] == 0


@pytest.mark.parametrize("n", [0, 1, 2])
def test_rct_saves_only_its_input_for_backward(n):
    # One saved tensor per activation, as SiLU: the input (docs/benchmarks.md, "activations").
    x = torch.randn(64, requires_grad=True)
    z = x * 2.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rct_af(z, n, 7.0)
    assert len(saved) == 1 and saved[0] is z


@pytest.mark.parametrize("n", [0, 1, 2])
def test_rct_passes_gradcheck_and_gradgradcheck(n):
    x = torch.linspace(-1.5, 1.5, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: rct_af(v, n, 3.0), (x,))
    assert torch.autograd.gradgradcheck(lambda v: rct_af(v, n, 3.0), (x,))


def _tiny_net_loss(act):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    sizes = [math.prod(s) for s in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = (p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes))
        out = act(x @ w1.T + b1) @ w2.T + b2
        return ((out - y) ** 2).mean()  # explicit MSE: F.mse_loss fails under jvp(grad) (docs/index.md)

    params = torch.randn(sum(sizes), dtype=torch.float64)
    return loss, params


@pytest.mark.parametrize("n", [0, 1, 2])
def test_forward_over_reverse_hvp_equals_double_backward_hvp(n):
    loss, params = _tiny_net_loss(RCTAF(n, 7.0))
    v = torch.randn_like(params)
    _, hvp_fwd = jvp(grad(loss), (params,), (v,))
    _, hvp_rev = torch.autograd.functional.hvp(loss, params, v)
    # Independent of the Function: the same net with the textbook formula (|αz| stays small here).
    plain_loss, _ = _tiny_net_loss(lambda z: plain_rct(z, n, 7.0))
    _, hvp_plain = torch.autograd.functional.hvp(plain_loss, params, v)
    assert hvp_plain.abs().max() > 0
    assert normwise_error(hvp_fwd, hvp_rev) < 1e-12
    assert normwise_error(hvp_fwd, hvp_plain) < 1e-12


def test_vmap_of_grad_and_of_forward_over_reverse_matches_per_sample_loop():
    xs = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
    act = RCTAF(2, 5.0)

    def f(v: torch.Tensor) -> torch.Tensor:
        return act(v).sum()

    batched_grad = vmap(grad(f))(xs)
    batched_curv = vmap(lambda v: jvp(grad(f), (v,), (torch.ones_like(v),))[1])(xs)
    for row, g_row, c_row in zip(xs, batched_grad, batched_curv):
        assert torch.allclose(g_row, rct_af_derivative(row, 2, 5.0, 1), rtol=0, atol=1e-14)
        assert torch.allclose(c_row, rct_af_derivative(row, 2, 5.0, 2), rtol=0, atol=1e-13)
    assert torch.equal(vmap(act)(xs), act(xs))


@pytest.mark.parametrize("n,alpha", [(0, 28.0), (1, 14.0), (2, 7.0), (0, 1.0), (1, 0.3), (2, 50.0)])
def test_rct_psi_max_property_is_c_n_alpha(n, alpha):
    assert RCTAF(n, alpha).psi_max == C_N[n] * alpha
    assert activation_derivatives(RCTAF(n, alpha)).psi_max == C_N[n] * alpha


@pytest.mark.parametrize("n,alpha", [(0, 28.0), (1, 14.0), (2, 7.0)])
def test_paper_optimal_parameters_give_psi_max_seven_exactly_and_numerically(n, alpha):
    module = RCTAF(n, alpha)
    assert psi_max(module) == 7.0
    assert RCTAF.from_psi_max(7.0, n).alpha == alpha
    # A lambda hides the module, so this goes through the grid + Brent path.
    assert psi_max(lambda v: module(v)) == pytest.approx(7.0, abs=1e-6)


def test_numerical_psi_max_of_plain_swish_lambda_is_seven():
    assert psi_max(lambda v: v * torch.sigmoid(14.0 * v)) == pytest.approx(7.0, abs=1e-4)


@pytest.mark.parametrize(
    "bad",
    [dict(n=3), dict(n=-1), dict(n=1.5), dict(n=True), dict(n="1"), dict(alpha=0.0), dict(alpha=-2.0),
     dict(alpha=math.nan), dict(alpha=math.inf), dict(alpha="big")],
)
def test_invalid_rct_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        RCTAF(**bad)


# ---------------------------------------------------------------------------------------------
# ψ_max of the baselines (docs/index.md, "Activations")
# ---------------------------------------------------------------------------------------------

# name -> (the docs/index.md "Activations" table value at 4 significant figures, exact value or None)
PSI_TABLE = {
    "softplus": (0.25, 0.25),
    "silu": (0.5, 0.5),
    "swish": (0.5, 0.5),
    "gelu": (0.7979, math.sqrt(2 / math.pi)),
    "gelu_tanh": (0.7979, math.sqrt(2 / math.pi)),
    "mish": (0.6442, None),
    "elu": (1.0, 1.0),
    "selu": (1.758, 1.0507009873554805 * 1.6732632423543772),
    "tanh": (0.7698, 4 / (3 * math.sqrt(3))),
    "sigmoid": (0.09623, 1 / (6 * math.sqrt(3))),
    "relu": (math.inf, math.inf),
    "leaky_relu": (math.inf, math.inf),
}


def test_psi_table_covers_every_baseline_name():
    assert set(PSI_TABLE) == set(ACTIVATION_NAMES) - {"rct"}


@pytest.mark.parametrize("name", sorted(PSI_TABLE))
def test_numerical_psi_max_matches_math_table_and_closed_form(name):
    table, exact = PSI_TABLE[name]
    module = get_activation(name)
    value = psi_max(module)
    closed = activation_derivatives(module).psi_max
    if math.isinf(table):
        assert value == math.inf and closed == math.inf
        return
    half_unit_4sf = 0.5 * 10 ** (math.floor(math.log10(table)) - 3)
    assert abs(value - table) <= half_unit_4sf
    assert value == pytest.approx(closed, rel=1e-9)
    if exact is not None:
        assert value == pytest.approx(exact, rel=1e-9)


def test_slope_jump_direction_decides_infinite_psi_max():
    # SELU's slope drops by λ(α - 1) ≈ 0.7074 at 0: reported, but it does not make ψ_max infinite.
    (selu_jump,) = curvature_profile(nn.SELU()).slope_jumps
    assert abs(selu_jump[0]) < 1e-3 and selu_jump[1] == pytest.approx(-0.7074, abs=1e-3)
    assert curvature_profile(nn.ELU()).slope_jumps == ()  # C¹: φ'' jumps, φ' does not
    assert psi_max(nn.ELU(alpha=0.5)) == math.inf == activation_derivatives(nn.ELU(alpha=0.5)).psi_max
    assert psi_max(nn.ELU(alpha=2.0)) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("grid", [dict(lo=1.0, hi=-1.0), dict(step=0.0), dict(hi=math.inf)])
def test_psi_max_rejects_an_empty_or_unbounded_grid(grid):
    with pytest.raises(ValueError):
        psi_max(nn.Tanh(), **grid)


def test_psi_max_leaves_a_float32_module_with_parameters_untouched():
    prelu = nn.PReLU(init=0.25)
    assert psi_max(prelu) == math.inf
    assert prelu.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Uniform derivative interface
# ---------------------------------------------------------------------------------------------

DERIVATIVE_MODULES = [
    RCTAF(0, 3.0), RCTAF(1, 14.0), RCTAF(2, 7.0),
    nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Softplus(), nn.Softplus(beta=2.0, threshold=5.0),
    nn.Mish(), nn.Tanh(), nn.Sigmoid(), nn.ELU(), nn.ELU(alpha=0.5), nn.SELU(), nn.ReLU(), nn.LeakyReLU(0.1),
]


@pytest.mark.parametrize("module", DERIVATIVE_MODULES, ids=repr)
def test_closed_form_derivatives_equal_float64_autograd_of_module(module):
    # An even number of points keeps x = 0 (the kink of ELU/SELU/ReLU) off the grid; the
    # Softplus(β=2, threshold=5) switch at x = 2.5 is off it as well.
    x = torch.linspace(-12.0, 12.0, 2400, dtype=torch.float64)
    f, d1, d2 = autograd_derivatives(module, x, 2)
    derivs = activation_derivatives(module)
    # Measured worst case is 4e-15 (GELU tanh, Mish: torch forms 1 - tanh², we do not).
    assert torch.equal(derivs.phi(x), f)
    assert normwise_error(derivs.dphi(x), d1) < 1e-13
    if d2.abs().max() == 0:
        assert torch.equal(derivs.d2phi(x), d2)
    else:
        assert normwise_error(derivs.d2phi(x), d2) < 1e-13


@pytest.mark.parametrize("module", DERIVATIVE_MODULES, ids=repr)
def test_closed_form_derivatives_are_finite_at_huge_inputs(module):
    derivs = activation_derivatives(module)
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([-1e30, -1e4, 1e4, 1e30], dtype=dtype)
        for fn in (derivs.dphi, derivs.d2phi):
            assert torch.isfinite(fn(x)).all()


def test_unsupported_activation_names_the_class():
    class MySiLU(nn.SiLU):
        pass

    for module in (nn.Hardswish(), MySiLU()):  # exact-type lookup: a subclass may change forward
        with pytest.raises(UnsupportedActivationError, match=type(module).__name__):
            activation_derivatives(module)
    assert issubclass(UnsupportedActivationError, ValueError)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_every_registered_name_builds_a_module_with_derivatives(name):
    module = get_activation(name)
    assert isinstance(module, nn.Module)
    x = torch.linspace(-2.0, 2.0, 8)
    assert torch.equal(activation_derivatives(module).phi(x), module(x))


def test_rct_specs_parse_parameters_spaces_and_psi():
    module = get_activation("rct:n=2,alpha=7")
    assert isinstance(module, RCTAF) and module.psi_max == 7.0
    spaced = get_activation(" RCT : n = 1 , alpha = 14 ")
    assert (spaced.n, spaced.alpha) == (1, 14.0)
    by_psi = get_activation("rct:psi=7,n=0")
    assert (by_psi.n, by_psi.alpha, by_psi.psi_max) == (0, 28.0, 7.0)
    assert isinstance(get_activation("gelu_tanh"), nn.GELU) and get_activation("gelu_tanh").approximate == "tanh"
    assert get_activation("leaky_relu:negative_slope=0.2").negative_slope == 0.2


@pytest.mark.parametrize(
    "spec", ["softmax", "", "rct:n=3,alpha=1", "rct:alpha=0", "rct:n=1.5", "rct:alpha=2,psi=1", "relu:beta=2",
             "rct:alpha=abc", "rct:alpha"],
)
def test_bad_activation_specs_raise_one_line_value_error(spec):
    with pytest.raises(ValueError) as info:
        get_activation(spec)
    assert "\n" not in str(info.value)


def test_unknown_activation_message_lists_valid_names():
    with pytest.raises(ValueError, match="softmax") as info:
        get_activation("softmax")
    assert all(name in str(info.value) for name in ACTIVATION_NAMES)
