"""The objective: data pass, losses, HVP routes, batching invariance and bad input."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessdiag
import hessdiag.ggn
from hessdiag.errors import HessdiagError
from hessdiag.models import cnn, mlp
from hessdiag.objective import HVP_ROUTES, Objective, ObjectiveError
from hessdiag.operators import GGNOperator, HessianOperator, ResidualOperator


def test_empty_data_and_bad_loss_are_user_errors():
    model = mlp(in_features=2, hidden=(2,), num_classes=2)
    with pytest.raises(ObjectiveError, match="empty"):
        Objective(model, (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(HessdiagError, match="unknown loss"):
        Objective(model, (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), loss="hinge")


def _silu_mlp_problem():
    torch.manual_seed(0)
    model = mlp(in_features=6, hidden=(5, 4), num_classes=3, activation="silu")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    v = torch.randn(4, 74, generator=g, dtype=torch.float64)  # P = 35 + 24 + 15
    return model, x, y, v


def test_both_hvp_routes_agree_and_the_route_is_fixed():
    model, x, y, v = _silu_mlp_problem()
    results = {}
    for route in HVP_ROUTES:
        obj = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=8, hvp_route=route)
        assert obj.hvp_route_used is None
        results[route] = obj.flatten(obj.hessian.apply(obj.unflatten(v)))
        # auto means func, by rule rather than by a timing race
        assert obj.hvp_route_used == ("func" if route == "auto" else route)
        assert obj.hvp_fallback is None
    # Same product by two routes in float64: rounding only.
    assert torch.allclose(results["func"], results["autograd"], rtol=1e-12, atol=1e-15)
    assert torch.equal(results["auto"], results["func"])


def test_unknown_hvp_route_is_a_user_error():
    model, x, y, _ = _silu_mlp_problem()
    with pytest.raises(ObjectiveError, match="unknown HVP route 'fastest'"):
        Objective(model, (x, y), hvp_route="fastest")


UNSUPPORTED = ("Trying to use forward AD with aten::hardswish_backward that does not support it "
               "because it has not been implemented yet.")


def _refuse(message, error=NotImplementedError):
    def broken(self, *args):
        raise error(message)

    return broken


def test_auto_falls_back_once_on_torch_func_refusal_and_records_it(monkeypatch):
    model, x, y, v = _silu_mlp_problem()
    reference = Objective(model, (x, y), "ce", dtype=torch.float64, hvp_route="autograd")
    expected = reference.flatten(reference.hessian.apply(reference.unflatten(v)))
    monkeypatch.setattr(HessianOperator, "_func_product", _refuse(UNSUPPORTED))
    obj = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=8)
    with pytest.warns(RuntimeWarning, match="falling back to double backward") as record:
        first = obj.flatten(obj.hessian.apply(obj.unflatten(v)))
        second = obj.flatten(obj.hessian.apply(obj.unflatten(v)))
    assert len(record) == 1 and "hardswish_backward" in str(record[0].message)  # once, with the reason
    assert obj.hvp_route_used == "autograd" and obj.hvp_fallback == UNSUPPORTED
    assert torch.allclose(first, expected, rtol=1e-12, atol=1e-15) and torch.equal(first, second)
    with pytest.warns(RuntimeWarning, match="hardswish_backward"):
        res = hessdiag.measure(model, (x, y), estimator="hutchinson", samples=8, dtype="float64")
    assert res.hvp_route == "autograd" and res.hvp_fallback == UNSUPPORTED
    doc = json.loads(res.to_json())
    assert doc["hvp_route"] == "autograd" and doc["hvp_fallback"] == UNSUPPORTED
    assert "hvp-route=autograd (fallback)" in res.table()


def test_func_route_refused_by_torch_func_is_a_user_error(monkeypatch):
    model, x, y, v = _silu_mlp_problem()
    monkeypatch.setattr(HessianOperator, "_func_product", _refuse(UNSUPPORTED))
    obj = Objective(model, (x, y), "ce", hvp_route="func")
    with pytest.raises(ObjectiveError, match="hvp_route 'func': torch.func cannot .*hardswish"):
        obj.hessian.apply(obj.unflatten(v.float()))


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (vmap: batching rule)"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
    NotImplementedError("something else entirely"),
    ValueError("a bug in the model's forward"),
], ids=["oom", "runtime", "notimplemented", "value"])
@pytest.mark.parametrize("route", ["auto", "func"])
def test_other_errors_in_the_product_propagate(monkeypatch, error, route):
    # Never swallowed into a fallback: an out-of-memory error under vmap must reach the
    # user (to lower chunk_size), not silently switch routes.
    model, x, y, v = _silu_mlp_problem()

    def broken(self, *args):
        raise error

    monkeypatch.setattr(HessianOperator, "_func_product", broken)
    obj = Objective(model, (x, y), "ce", hvp_route=route)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(type(error)) as caught:
            obj.hessian.apply(obj.unflatten(v.float()))
    assert caught.value is error
    assert obj.hvp_fallback is None and obj.hvp_route_used is None


def test_out_of_memory_in_double_backward_and_fused_products_propagates(monkeypatch):
    model, x, y, _ = _silu_mlp_problem()
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    def broken(self, *args):
        raise oom

    monkeypatch.setattr(HessianOperator, "_autograd_product", broken)
    with pytest.raises(torch.OutOfMemoryError):
        hessdiag.measure(model, (x, y), estimator="hutchinson", samples=8, hvp_route="autograd")
    monkeypatch.setattr(ResidualOperator, "batch_product", broken)
    with pytest.raises(torch.OutOfMemoryError):
        hessdiag.measure(model, (x, y), estimator="hutchinson-ggn", samples=8)
    monkeypatch.setattr(GGNOperator, "per_example_diagonal", broken)
    with pytest.raises(torch.OutOfMemoryError):
        hessdiag.ggn.ggn_diagonal(Objective(model, (x, y)), method="func")


def test_a_model_no_route_can_differentiate_twice_is_a_user_error():
    # EmbeddingBag(mode="max"): no forward-mode derivative and no double backward.
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="max"), nn.Linear(4, 3))
    x, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="_embedding_bag"), \
            pytest.raises(HessdiagError, match="cannot be differentiated twice .*_embedding_bag_backward"):
        hessdiag.measure(model, (x, y), estimator="hutchinson", samples=8)


@pytest.mark.parametrize("estimator, kwargs", [
    ("hutchinson", {"samples": 12}),
    ("exact", {"dtype": "float32"}),  # a CNN: the basis-HVP path
])
def test_same_seed_same_bits(estimator, kwargs):
    model = cnn(in_channels=1, image_size=5, channels=(2, 3), num_classes=3, activation="silu")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(10, 1, 5, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    first, second = (hessdiag.measure(model, (x, y), estimator=estimator, batch_size=4, seed=7,
                                      chunk_size=4, keep_diagonal=True, **kwargs) for _ in range(2))
    assert first.hvp_route == second.hvp_route == "func"
    for name in first.diagonal:
        assert torch.equal(first.diagonal[name], second.diagonal[name])
    assert (first.normalized_norm, first.ci95) == (second.normalized_norm, second.ci95)
    assert first.to_dict() | {"seconds": 0} == second.to_dict() | {"seconds": 0}


class TiedLanguageModel(nn.Module):
    """Embedding → tanh layer → decoder whose weight IS the embedding's (weight tying)."""

    def __init__(self, vocab: int = 7, dim: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.hidden(self.embed(tokens)))).mean(1)


def test_tied_weights_are_one_parameter():
    torch.manual_seed(0)
    model = TiedLanguageModel().double()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["embed.weight", "hidden.weight", "hidden.bias", "decoder.bias"]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (5, 4), generator=g), torch.randint(0, 7, (5,), generator=g)

    # Independent reference: the loss written out as a function of the ONE shared matrix E.
    def loss(theta):
        e, w, b, c = theta.split([21, 9, 3, 7])
        e, w = e.reshape(7, 3), w.reshape(3, 3)
        logits = (torch.tanh(e[x] @ w.T + b) @ e.T + c).mean(1)
        return F.cross_entropy(logits, y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = torch.autograd.functional.hessian(loss, theta).diagonal()
    for route in ("func", "autograd"):
        diag = hessdiag.hessian_diagonal(model, (x, y), batch_size=2, hvp_route=route)
        assert list(diag) == names
        flat = torch.cat([d.reshape(-1) for d in diag.values()])
        assert float((flat - reference).abs().max() / reference.abs().max()) < 1e-12
        # Not the diagonal of the untied model (the shared matrix counted as two).
    untied = TiedLanguageModel().double()
    untied.load_state_dict(model.state_dict())
    untied.decoder.weight = nn.Parameter(model.embed.weight.detach().clone())
    split = hessdiag.hessian_diagonal(untied, (x, y))
    assert not torch.allclose(split["embed.weight"], diag["embed.weight"])
