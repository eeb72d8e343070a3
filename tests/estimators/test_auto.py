"""``auto`` picks the cheapest route the structure allows and says which and why."""

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.estimators import select_estimator
from hessdiag.estimators.auto import AUTO_EXACT_MAX_PARAMS
from hessdiag.models import resnet18_cifar
from hessdiag.objective import Objective

from ..models import image_data, tiny_mlp


def _images(n: int = 4, size: int = 8, channels: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _choice(model, data):
    chosen, why = select_estimator(Objective(model, data))
    return chosen.name, why


def test_mlp_takes_the_analytic_exact_path(tiny_classification):
    name, why = _choice(tiny_mlp("tanh"), tiny_classification)
    assert name == "exact" and "analytic" in why


def test_piecewise_linear_resnet_is_exact_at_any_size():
    torch.manual_seed(0)
    model = resnet18_cifar(activation="relu", width=4)
    assert sum(p.numel() for p in model.parameters()) > AUTO_EXACT_MAX_PARAMS
    name, why = _choice(model, _images())
    assert name == "exact" and "piecewise-linear" in why


def test_smooth_resnet_gets_hutchinson_naming_curvprop_and_layernorm_gets_hutchinson():
    torch.manual_seed(0)
    name, why = _choice(resnet18_cifar(activation="silu", width=4), _images())
    assert name == "hutchinson" and "curvprop applies" in why and "silu" in why
    wide = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.LayerNorm(64), nn.GELU(),
                         nn.Linear(64, 10))
    name, why = _choice(wide, _images())
    assert name == "hutchinson" and "layer_norm" in why


def test_small_general_network_is_exact_by_basis_hvps():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(18), nn.Linear(18, 3))
    name, why = _choice(small, image_data())
    assert name == "exact" and "parameters" in why


def test_measure_records_the_choice_in_json_and_table():
    torch.manual_seed(0)
    model = resnet18_cifar(activation="relu", width=2)
    res = hessdiag.measure(model, _images(2), dtype="float64")
    assert res.estimator == "exact" and "piecewise-linear" in res.selection
    doc = res.to_dict()
    assert doc["estimator"] == "exact" and doc["selection"] == res.selection
    assert f"chosen by auto: {res.selection}" in res.table()
    explicit = hessdiag.measure(model, _images(2), estimator="exact", dtype="float64")
    assert explicit.selection is None
    assert explicit.normalized_norm == pytest.approx(res.normalized_norm, rel=1e-12)


def test_hardswish_is_an_elementwise_activation_with_or_without_the_compat_layer():
    """The compat layer rewrites Hardswish as x·clamp(x+3, 0, 6)/6 for double backward; the
    structure recorder must still see one elementwise activation, not a product."""
    from hessdiag.compat import twice_differentiable
    from hessdiag.estimators.structural import objective_structure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardswish(inplace=True), nn.Linear(6, 3))
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert objective_structure(Objective(model, data)).kind == "elementwise"
    with twice_differentiable():
        assert objective_structure(Objective(model, data)).kind == "elementwise"
