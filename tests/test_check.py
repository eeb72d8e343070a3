"""`hessdiag check`: the quick battery passes, a broken decomposition fails it, bad filters exit 2."""

import pytest

import hessdiag.check as check
from hessdiag.analytic import MLPDecomposition
from hessdiag.check import battery, run_case
from hessdiag.cli import main


def test_quick_battery_passes(capsys):
    # What CI runs (`make test` and `make check`): exit 0 only if every exactness check holds.
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and "FAIL" not in out
    assert "1-2-2-2-1" in out and "diagonal-only M fails on 4" in out


def test_quick_battery_covers_every_dimension():
    cases = battery()
    assert {c.activation for c in cases} == set(check.ACTIVATIONS)
    assert {c.depth for c in cases} == {1, 2, 3, 4, 5}
    assert {(c.loss, c.outputs) for c in cases} == set(check.LOSSES_OUTPUTS)
    assert {c.batch for c in cases} == set(check.BATCH_SIZES)
    assert len(battery(full=True)) == 7 * 5 * 3 * 2


def test_per_neuron_errors_are_reported_and_zero_only_where_exact():
    shallow = run_case(check.Case(2, 3, "tanh", "ce", 5))
    deep = run_case(check.Case(4, 3, "tanh", "ce", 5))
    assert shallow.passed and deep.passed
    assert max(shallow.per_neuron) < 1e-13
    assert deep.per_neuron[0] > 1e-2 and max(deep.per_neuron[2:]) < 1e-13


def test_a_wrong_decomposition_fails_the_check(monkeypatch, capsys):
    right = check.mlp_decomposition

    def diagonal_only(objective, **kwargs):
        dec = right(objective, **kwargs)
        return MLPDecomposition(dec.ggn, dec.per_neuron_residual, dec.per_neuron_residual)

    monkeypatch.setattr(check, "mlp_decomposition", diagonal_only)
    assert main(["check", "--depths", "4", "--activations", "tanh", "--no-symbolic"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--activations", "swishy"], ["--depths", "7"], ["--losses", "nll"]])
def test_bad_filters_exit_2(args, capsys):
    try:
        code = main(["check", *args, "--no-symbolic"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2


@pytest.mark.slow
def test_full_battery_passes():
    assert main(["check", "--full", "--no-symbolic"]) == 0
