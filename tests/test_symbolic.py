"""Symbolic derivations (sympy): RCT-AF closed forms, ψ_max, and the recursion on tiny networks."""

import mpmath
import pytest
import sympy as sp
import torch

import hessdiag.symbolic as symbolic
from hessdiag.activations import RCT_PSI_COEF, rct_af_derivative
from hessdiag.symbolic import (
    check_affine_in_phi2,
    check_network,
    check_rct_closed_forms,
    numerical_max_n2,
    prove_max_at_zero,
    psi_coefficients,
    rct_numeric,
    run_symbolic_checks,
)


def test_closed_forms_equal_the_derivation_from_the_definition():
    assert check_rct_closed_forms() == {(n, k): True for n in range(3) for k in range(3)}


def test_a_wrong_closed_form_is_caught(monkeypatch):
    right = symbolic.rct_closed

    def wrong(n):
        f, f1, f2 = right(n)
        return (f, f1, f2 * 2) if n == 1 else (f, f1, f2)  # e.g. ψ_max = α instead of α/2

    monkeypatch.setattr(symbolic, "rct_closed", wrong)
    result = check_rct_closed_forms()
    assert not result[(1, 2)] and sum(result.values()) == 8


@pytest.mark.parametrize("n,alpha", [(0, 28.0), (1, 14.0), (2, 7.0), (2, 0.5)])
def test_numeric_closed_forms_match_the_derived_expressions(n, alpha):
    xs = [-2.0, -0.4, -0.07, 0.0, 0.013, 0.21, 0.8, 3.0]
    with mpmath.workdps(30):
        for order in range(3):
            got = rct_af_derivative(torch.tensor(xs, dtype=torch.float64), n, alpha, order).tolist()
            fn = rct_numeric(n, order)
            for x, value in zip(xs, got):
                ref = float(fn(mpmath.mpf(x), mpmath.mpf(alpha)))
                # float64 closed forms: relative error ~1e-15 (docs/index.md, "Activations"), absolute near zeros.
                assert value == pytest.approx(ref, rel=1e-12, abs=1e-14 * max(1.0, alpha) ** order)


def test_psi_max_coefficients_are_exact_and_match_the_activations_module():
    coeffs = psi_coefficients()
    assert coeffs == {0: sp.Rational(1, 4), 1: sp.Rational(1, 2), 2: sp.Integer(1)}
    assert {n: float(c) for n, c in coeffs.items()} == RCT_PSI_COEF


def test_maximum_at_zero_is_proved_for_n0_n1_and_found_numerically_for_n2():
    assert prove_max_at_zero() == {0: True, 1: True}
    n2 = numerical_max_n2()
    assert n2["argmax"] == 0.0 and n2["max"] == pytest.approx(1.0, abs=1e-15)
    # docs/index.md, "Activations": minima −0.2314215 at u = ±2.162438, maxima +0.0252907 at u = ±5.521065.
    others = n2["critical_points"][1:]
    assert [round(u, 6) for u, _ in others] == [2.162438, 5.521065]
    assert [round(v, 7) for _, v in others] == [-0.2314215, 0.0252907]


def test_two_two_one_squared_loss_is_exact():
    check = check_network((2, 2, 1), "squared")
    assert len(check.matches) == 9 and not check.failures
    # With ≤ 2 hidden layers the diagonal-only recursion is exact too (docs/appendix.md).
    assert not check_network((2, 2, 1), "squared", per_neuron=True).failures


def test_deep_network_full_recursion_exact_and_diagonal_only_fails():
    full = check_network((1, 2, 2, 2, 1), "squared")
    assert len(full.matches) == 19 and not full.failures
    diagonal_only = check_network((1, 2, 2, 2, 1), "squared", per_neuron=True)
    assert sorted(diagonal_only.failures) == ["W1_11", "W1_21", "b1_1", "b1_2"]


def test_generic_loss_two_outputs():
    check = check_network((2, 2, 2), "generic")
    assert len(check.matches) == 12 and not check.failures


def test_affine_in_phi2_with_ggn_intercept():
    props = check_affine_in_phi2(check_network((1, 2, 2, 2, 1), "squared"))
    assert all(free for _, free in props.values())
    assert {d for _, d in [(k, v[0]) for k, v in props.items()]} == {0, 1}
    assert all(props[k][0] == 0 for k in ("W4_11", "W4_12", "b4_1"))  # output layer: no φ''
    assert all(props[k][0] == 1 for k in ("W1_11", "b2_1", "W3_21"))


def test_battery_passes_and_fails_when_the_diagonal_only_recursion_is_swapped_in(monkeypatch):
    assert all(ok for _, ok, _, _ in run_symbolic_checks())
    exact = symbolic.check_network
    monkeypatch.setattr(symbolic, "check_network",
                        lambda sizes, loss="squared", per_neuron=False: exact(sizes, loss, True))
    results = {name: ok for name, ok, _, _ in run_symbolic_checks()}
    deep = [name for name in results if name.startswith("1-2-2-2-1")]
    assert deep and not results[deep[0]]
    assert results["2-2-1, squared loss"]  # still exact with one hidden layer
