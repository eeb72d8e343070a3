"""Parameter subsets (``params=``, ``--params``): the diagonal of the principal sub-block.

Holding the other parameters fixed, the Hessian of L with respect to a subset S is the
S×S block of the full Hessian, so every estimator measuring S must give the full
diagonal's entries for S, and P, the norms and the per-layer table must refer to S alone.
"""

import json

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.cli import main
from hessdiag.estimators import ExactEstimator, HutchinsonEstimator
from hessdiag.selection import ParameterSelectionError, select_parameters

from .models import image_data, tiny_cnn, tiny_mlp, write_digits_checkpoint
from .reference import max_relative_error, reference_diagonal


def _mlp_case():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    model = tiny_mlp()
    # names, a pattern and a Parameter object, mixed
    return model, (x, y), ["1.weight", "*.bias", model[5].weight], \
        {"1.weight", "1.bias", "3.bias", "5.weight", "5.bias"}


def _cnn_case():
    model = tiny_cnn()
    return model, image_data(), ["2.*", model[0].bias], {"0.bias", "2.weight", "2.bias"}


CASES = {"mlp": _mlp_case, "cnn": _cnn_case}


def _full_exact(model, data):
    return hessdiag.hessian_diagonal(model, data, estimator="exact", dtype="float64")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("estimator", [
    ExactEstimator(),  # MLP: the analytic recursion, restricted to the subset
    ExactEstimator(analytic=False, structural=False),  # basis HVPs of the sub-block
], ids=["exact", "exact-basis-hvp"])
def test_exact_subset_equals_the_full_diagonal_restricted(case, estimator):
    model, data, params, names = CASES[case]()
    full = _full_exact(model, data)
    sub = hessdiag.hessian_diagonal(model, data, estimator=estimator, params=params, dtype="float64")
    assert set(sub) == names
    assert max_relative_error(sub, {n: full[n] for n in sub}) <= 1e-12
    # and against the independent autograd reference of the whole network
    reference = reference_diagonal(model, "ce", *data)
    assert max_relative_error(sub, {n: reference[n] for n in sub}) <= 1e-10


@pytest.mark.parametrize("case", sorted(CASES))
def test_seeded_stochastic_subset_equals_the_full_diagonal_restricted(case):
    """``hutchinson`` with a sketch as wide as the subset captures the sub-block exactly, so
    its seeded estimate is the subset's exact diagonal up to rounding: a wrong block (the
    full Hessian's, or one with the others' curvature folded in) would be far off."""
    model, data, _, _ = CASES[case]()
    first = next(iter(model.parameters()))  # the first weight, as a Parameter object
    params = ["*.bias", first]
    names = {n for n, p in model.named_parameters() if n.endswith(".bias") or p is first}
    size = sum(p.numel() for n, p in model.named_parameters() if n in names)  # 42 and 26
    chosen = HutchinsonEstimator(samples=2 * size + 8, sketch_rank=size, seed=5)
    res = hessdiag.measure(model, data, estimator=chosen, params=params, dtype="float64",
                           keep_diagonal=True)
    full = _full_exact(model, data)
    assert set(res.diagonal) == names and res.num_params == size
    # (max_relative_error flattens in dict order: the reference follows the estimate's keys)
    restricted = {n: full[n] for n in res.diagonal}
    assert max_relative_error(res.diagonal, restricted) <= 1e-10
    assert res.normalized_norm == pytest.approx(hessdiag.normalized_norm(restricted), rel=1e-8)


@pytest.mark.parametrize("estimator, case", [
    ("hutchinson-plain", "mlp"), ("hutchinson-ggn", "mlp"), ("curvprop", "cnn"),
    ("backpack", "mlp"), ("auto", "cnn"), ("auto", "mlp"),
])
def test_every_estimator_measures_only_the_subset(estimator, case):
    model, data, params, names = CASES[case]()
    full = _full_exact(model, data)
    res = hessdiag.measure(model, data, estimator=estimator, params=params, dtype="float64",
                           samples=64, seed=1, keep_diagonal=True)
    assert set(res.diagonal) == names == {layer.name for layer in res.per_layer}
    restricted = {n: full[n] for n in res.diagonal}
    assert res.num_params == sum(full[n].numel() for n in names)
    exact_norm = hessdiag.normalized_norm(restricted)
    if res.samples is None:  # exact estimators
        assert max_relative_error(res.diagonal, restricted) <= 1e-10
        assert res.normalized_norm == pytest.approx(exact_norm, rel=1e-10)
    else:  # unbiased: the interval covers the subset's norm, or the estimate is close to it
        lo, hi = res.ci95
        assert lo <= exact_norm <= hi or res.normalized_norm == pytest.approx(exact_norm, rel=0.1)


def test_the_ggn_split_of_a_subset_is_the_full_split_restricted():
    model, data, params, names = _cnn_case()
    full = hessdiag.measure(model, data, estimator="exact", dtype="float64", split_ggn=True,
                            keep_diagonal=True)
    sub = hessdiag.measure(model, data, estimator="exact", dtype="float64", split_ggn=True,
                           keep_diagonal=True, params=params)
    assert set(sub.ggn_diagonal) == set(sub.residual_diagonal) == names
    assert max_relative_error(sub.ggn_diagonal, {n: full.ggn_diagonal[n] for n in sub.ggn_diagonal}) <= 1e-12
    assert max_relative_error(sub.residual_diagonal,
                              {n: full.residual_diagonal[n] for n in sub.residual_diagonal}) <= 1e-10


def test_the_model_is_not_modified_and_the_selection_overrides_requires_grad():
    model, data, _, _ = _mlp_case()
    model[3].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = hessdiag.measure(model, data, params=["3.weight", "5.*"], dtype="float64", keep_diagonal=True)
    # the frozen tensor was named, so it is measured; the flags are the model's as before
    assert set(res.diagonal) == {"3.weight", "5.weight", "5.bias"}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, values[n]) and p.grad is None for n, p in model.named_parameters())
    # by default the frozen tensor stays out, as before
    default = hessdiag.measure(model, data, dtype="float64")
    assert "3.weight" not in {layer.name for layer in default.per_layer} and default.params is None


def test_the_selection_is_recorded_in_the_result_json_and_table():
    model, data, _, _ = _mlp_case()
    res = hessdiag.measure(model, data, params=["5.*", model[1].bias], dtype="float64")
    assert res.params == ["5.*", "1.bias"] and res.num_params == 3 * 4 + 3 + 5
    doc = json.loads(res.to_json())
    assert doc["params"] == ["5.*", "1.bias"] and doc["num_params"] == res.num_params
    assert [layer["name"] for layer in doc["per_layer"]] == ["1.bias", "5.weight", "5.bias"]
    assert "params=5.*,1.bias" in res.table()
    assert json.loads(hessdiag.measure(model, data).to_json())["params"] is None


def test_a_pattern_may_name_an_alias_of_a_tied_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.decoder = nn.Linear(4, 4)
            self.decoder.weight = self.encoder.weight

    model = Tied()
    assert select_parameters(model, "decoder.weight") == (["encoder.weight"], ["decoder.weight"])
    assert select_parameters(model, "*.weight")[0] == ["encoder.weight"]
    assert select_parameters(model, None)[0] == ["encoder.weight", "encoder.bias", "decoder.bias"]


@pytest.mark.parametrize("params, message", [
    ("layer4.*", "'layer4.*' matches no parameter of the model (names look like 1.weight, 1.bias, 3.weight, ...)"),
    ([], "the selection is empty"),
    ([nn.Parameter(torch.zeros(2, 3))], "a tensor of shape (2, 3) is not a parameter of the model"),
    ([3], "expected parameter names, glob patterns or Parameter objects, got int"),
])
def test_bad_selections_are_one_line_errors(params, message):
    model, data, _, _ = _mlp_case()
    with pytest.raises(ParameterSelectionError) as err:
        hessdiag.measure(model, data, params=params)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, hessdiag.HessdiagError)


def test_cli_params_repeated_and_comma_separated(tmp_path, capsys):
    checkpoint = tmp_path / "small.pt"
    write_digits_checkpoint(checkpoint)  # 64-6-10: 1.weight, 1.bias, 3.weight, 3.bias
    out = tmp_path / "r.json"
    code = main(["measure", str(checkpoint), "--max-examples", "20", "--dtype", "float64",
                 "--params", "3.*", "--params", "1.bias", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["params"] == ["3.*", "1.bias"] and doc["num_params"] == 6 + 6 * 10 + 10
    assert [layer["name"] for layer in doc["per_layer"]] == ["1.bias", "3.weight", "3.bias"]
    capsys.readouterr()
    assert main(["measure", str(checkpoint), "--max-examples", "20", "--params", "3.bias,1.bias",
                 "--quiet"]) == 0
    assert float(capsys.readouterr().out) > 0
    assert main(["measure", str(checkpoint), "--max-examples", "20", "--params", "layer4.*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'layer4.*' matches no parameter" in err[0]
