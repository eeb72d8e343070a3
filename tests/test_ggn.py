"""The Gauss–Newton/residual split against independent float64 references."""

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag.backpack_ext import BackpackUnsupportedError
from hessdiag.ggn import ggn_diagonal, split_diagonal
from hessdiag.models import cnn
from hessdiag.objective import Objective
from hessdiag.operators import GGNOperator

from .models import tiny_mlp, image_data
from .reference import (
    max_relative_error,
    reference_ggn,
    reference_hessian,
    reference_residual,
    split_like,
)

# Float64 on both sides by unrelated routes (BackPACK factor backpropagation or torch.func
# per-example VJPs vs. full autograd Jacobians/Hessians): ~1e-15 observed. 1e-9 fails any
# missing factor (e.g. a 2/C in the MSE loss Hessian) or a GGN leaking into the residual.
SPLIT_RTOL = 1e-9


class Block(nn.Module):
    """conv-BN-φ-conv-BN plus the identity, then φ: a residual addition BackPACK's
    DiagHessian cannot traverse but its graph converter can (for the GGN)."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = act
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.act = act
        self.block = Block(2, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.act(self.stem(x)))), 1))


def tiny_resnet(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet(act)
    model.train()
    model(image_data(size=4)[0] * 2 + 1)  # move the BatchNorm running statistics off their defaults
    return model.eval()


def test_references_add_up(tiny_classification):
    model = tiny_mlp("rct:n=2,alpha=7")
    x, y = tiny_classification
    for loss in ("ce", "mse"):
        total = reference_ggn(model, loss, x, y) + reference_residual(model, loss, x, y)
        assert torch.allclose(total, reference_hessian(model, loss, x, y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("estimator", ["exact", "backpack"])
@pytest.mark.parametrize("activation", ["rct:n=1,alpha=14", "mish", "tanh"])
def test_split_parts_match_references_on_mlp(activation, estimator, loss, tiny_classification):
    model = tiny_mlp(activation)
    x, y = tiny_classification
    res = hessdiag.measure(model, (x, y), loss, estimator, dtype="float64", batch_size=7,
                           split_ggn=True, keep_diagonal=True)
    ggn = split_like(reference_ggn(model, loss, x, y).diagonal(), model)
    residual = split_like(reference_residual(model, loss, x, y).diagonal(), model)
    # exact on an MLP takes the analytic path, which computes the GGN itself; backpack's
    # split takes the default GGN dispatch, whose first choice for an MLP is the hooked one.
    assert res.ggn_method == ("analytic-mlp" if estimator == "exact" else "tape")
    assert max_relative_error(res.ggn_diagonal, ggn) < SPLIT_RTOL
    assert max_relative_error(res.residual_diagonal, residual) < SPLIT_RTOL
    assert res.ggn_normalized_norm == pytest.approx(hessdiag.normalized_norm(ggn), rel=1e-9)
    assert res.residual_normalized_norm == pytest.approx(hessdiag.normalized_norm(residual), rel=1e-9)
    for layer in res.per_layer:
        assert layer.ggn_normalized_norm == pytest.approx(
            hessdiag.normalized_norm(ggn[layer.name]), rel=1e-9)
        assert layer.residual_normalized_norm == pytest.approx(
            hessdiag.normalized_norm(residual[layer.name]), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_backpack_and_func_ggn_agree_on_cnn(loss):
    torch.manual_seed(2)
    model = cnn(in_channels=1, image_size=4, channels=(2, 2), num_classes=3, activation="gelu")
    x, y = image_data(size=4)
    objective = Objective(model, (x, y), loss, dtype=torch.float64, batch_size=4)
    backpack, used = ggn_diagonal(objective, "backpack")
    func, _ = ggn_diagonal(objective, "func")
    ref = split_like(reference_ggn(model, loss, x, y).diagonal(), model)
    assert used == "backpack"
    assert max_relative_error(backpack, ref) < SPLIT_RTOL
    assert max_relative_error(func, ref) < SPLIT_RTOL


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_resnet_with_batchnorm_goes_through_the_converter(loss):
    model = tiny_resnet(hessdiag.RCTAF(1, 3.0))
    x, y = image_data(size=4)
    res = hessdiag.measure(model, (x, y), loss, "exact", dtype="float64", batch_size=4,
                           split_ggn=True, keep_diagonal=True)
    assert res.ggn_method == "tape"  # the default dispatch's first choice for this structure
    objective = Objective(model, (x, y), loss, dtype=torch.float64, batch_size=4)
    converted, used = ggn_diagonal(objective, "backpack")
    # Not "func": the converter ran without leaving non-module nodes (those are errors).
    assert used == "backpack-converter"
    assert torch.get_default_dtype() == torch.float32  # BackPACK ran pooling in float64 only
    ggn = split_like(reference_ggn(model, loss, x, y).diagonal(), model)
    residual = split_like(reference_residual(model, loss, x, y).diagonal(), model)
    assert max_relative_error(converted, ggn) < SPLIT_RTOL
    assert max_relative_error(res.ggn_diagonal, ggn) < SPLIT_RTOL
    assert max_relative_error(res.residual_diagonal, residual) < SPLIT_RTOL


class FunctionalTanh(nn.Module):
    """Not an nn.Sequential, with a functional op the hooks would never see."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * torch.sigmoid(self.a(x)))


def test_untraversable_model_falls_back_to_func(tiny_classification):
    torch.manual_seed(3)
    model = FunctionalTanh()
    x, y = tiny_classification
    objective = Objective(model, (x, y), "ce", dtype=torch.float64)
    with pytest.raises(BackpackUnsupportedError, match="graph converter failed on FunctionalTanh"):
        ggn_diagonal(objective, "backpack")
    diag, used = ggn_diagonal(objective)
    assert used == "func"
    assert max_relative_error(diag, split_like(reference_ggn(model, "ce", x, y).diagonal(), model)) < SPLIT_RTOL


def test_split_sums_to_the_diagonal(tiny_classification):
    model = tiny_mlp("silu")
    x, y = tiny_classification
    objective = Objective(model, (x, y), "mse", dtype=torch.float64)
    diag = hessdiag.hessian_diagonal(model, (x, y), "mse", dtype="float64")
    split = split_diagonal(objective, diag)
    for name in diag:
        # (d − g) + g == d up to one rounding of each entry.
        assert torch.allclose(split.ggn[name] + split.residual[name], diag[name], rtol=1e-15, atol=1e-17)
        assert (split.ggn[name] >= 0).all()


def test_result_document_and_table_carry_the_split(tiny_classification):
    model = tiny_mlp("rct:n=0,alpha=28")
    res = hessdiag.measure(model, tiny_classification, "ce", "backpack", dtype="float64",
                           split_ggn=True)
    doc = res.to_dict()
    assert doc["ggn_method"] == "tape"
    assert doc["ggn_normalized_norm"] > 0 and doc["residual_normalized_norm"] > 0
    assert all(layer["ggn_normalized_norm"] is not None for layer in doc["per_layer"])
    assert "GGN" in res.table().splitlines()[0] and "residual" in res.table().splitlines()[0]
    plain = hessdiag.measure(model, tiny_classification, "ce", "backpack", dtype="float64")
    assert plain.to_dict()["ggn_normalized_norm"] is None and plain.ggn_diagonal is None


def test_ggn_of_a_model_neither_backpack_nor_torch_func_handles_is_a_one_line_user_error(
    tiny_classification, monkeypatch
):
    from hessdiag.errors import HessdiagError
    from hessdiag.objective import Objective

    class Opaque(nn.Module):  # not nn.Sequential: BackPACK cannot traverse it directly
        def __init__(self):
            super().__init__()
            self.inner = tiny_mlp()

        def forward(self, x):
            return self.inner(x)

    def refuse(self, examples_per_chunk=None):
        raise NotImplementedError("Batching rule not implemented for aten::foo.\nsecond line")

    monkeypatch.setattr(GGNOperator, "per_example_diagonal", refuse)
    objective = Objective(Opaque(), tiny_classification, dtype=torch.float64)
    with pytest.raises(HessdiagError, match=r"needs a model BackPACK can traverse.*no --split-ggn"):
        ggn_diagonal(objective, "func")
