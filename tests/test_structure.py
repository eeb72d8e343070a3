"""Network structure from one recorded forward pass: piecewise-linear, elementwise or general.

A wrong "piecewise-linear" would make an estimator report diag(GGN) as the exact Hessian
diagonal, so every "general" case below is checked for the kind AND for a reason naming
its cause; the exactness these kinds promise is checked numerically in
tests/test_curvature_tape.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hessdiag
from hessdiag.estimators.structural import objective_structure
from hessdiag.objective import Objective
from hessdiag.structure import network_structure

from .models import residual_cnn, residual_cnn_data


def classify(model: nn.Module, x: torch.Tensor, *, train: bool = False):
    """network_structure of ``model`` (eval mode unless ``train``) on ``x``."""
    model.train(train)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    return network_structure(
        lambda p, inputs: functional_call(model, {**p, **buffers}, (inputs,)), params, x
    )


def vector_net(*middle: nn.Module) -> nn.Module:
    """Linear(4, 4) → middle → Linear(4, 2)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), *middle, nn.Linear(4, 2))


VECTORS = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))


# -- piecewise linear ---------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("inplace_add", [False, True])
def test_relu_cnn_with_batchnorm_max_pool_and_residual_add_is_piecewise_linear(inplace,
                                                                               inplace_add):
    model = residual_cnn(lambda: nn.ReLU(inplace=inplace), inplace_add)
    found = classify(model, residual_cnn_data(2)[0])
    assert found.kind == "piecewise-linear", found.reason
    # Three ReLU calls (stem, and both of the block) and the max pooling were seen.
    assert found.piecewise_linear == {"relu": 3, "max_pool2d": 1}
    assert found.activations == {}


def test_linear_operations_keep_a_network_piecewise_linear():
    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = F.leaky_relu(self.bn(self.conv(x)), 0.1)
            h = nn.functional.avg_pool2d(h, 2) - 0.5 * F.adaptive_max_pool2d(h, 4)
            h = torch.cat([h[:, :2], h[:, 2:].flip(1)], 1).clamp(-1, 1)
            h = F.dropout(h, 0.5, training=False)
            return self.head(h.mean((2, 3)).reshape(x.shape[0], -1).repeat(1, 2) / 3.0)

    found = classify(Ops().double(), residual_cnn_data(2)[0])
    assert found.kind == "piecewise-linear", found.reason


def test_torchvision_resnet18_is_piecewise_linear():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    found = classify(model, torch.randn(2, 3, 32, 32))
    assert found.kind == "piecewise-linear", found.reason
    # The stem's ReLU, two per BasicBlock (8 blocks, the module reused after the add: it
    # has no parameters, so reusing it is harmless) and the stem's max pooling.
    assert found.piecewise_linear == {"relu": 17, "max_pool2d": 1}


def test_resnet18_with_one_smooth_module_is_elementwise():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.relu = nn.SiLU()  # the stem's activation only
    found = classify(model, torch.randn(2, 3, 32, 32))
    assert found.kind == "elementwise", found.reason
    assert found.activations == {"silu": 1}
    assert "silu" in found.reason


# -- elementwise ---------------------------------------------------------------------------


@pytest.mark.parametrize("module, name", [
    (nn.SiLU(), "silu"),
    (nn.SiLU(inplace=True), "silu"),
    (hessdiag.RCTAF(1, 3.0), "rct_af"),
    (nn.Tanh(), "tanh"),
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu"),
    (nn.Softplus(beta=2.0), "softplus"),
    (nn.Mish(), "mish"),
    (nn.ELU(), "elu"),
    (nn.Hardswish(), "hardswish"),
    (nn.Sigmoid(), "sigmoid"),
])
def test_smooth_activation_modules_make_a_network_elementwise(module, name):
    found = classify(vector_net(module, nn.ReLU()), VECTORS)
    assert found.kind == "elementwise", found.reason
    assert found.activations == {name: 1}
    assert found.piecewise_linear == {"relu": 1}


def test_functional_activations_and_tensor_methods_are_seen():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c(self.b(F.silu(self.a(x))).tanh())

    found = classify(Functional(), VECTORS)
    assert found.kind == "elementwise", found.reason
    assert found.activations == {"silu": 1, "Tensor.tanh": 1}


def test_inplace_relu_stays_piecewise_linear_and_inplace_silu_is_elementwise():
    relu = classify(vector_net(nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU(inplace=True)),
                    VECTORS)
    assert relu.kind == "piecewise-linear", relu.reason
    assert relu.piecewise_linear == {"relu": 2}
    silu = classify(vector_net(nn.ReLU(inplace=True), nn.Linear(4, 4), nn.SiLU(inplace=True)),
                    VECTORS)
    assert silu.kind == "elementwise", silu.reason
    assert silu.activations == {"silu": 1}


def test_dropout_and_batchnorm_in_eval_mode_are_linear():
    found = classify(vector_net(nn.BatchNorm1d(4), nn.Dropout(0.5)), VECTORS)
    assert found.kind == "piecewise-linear", found.reason


# -- general -------------------------------------------------------------------------------


class Product(nn.Module):
    """x ↦ head(a(x) ⊙ b(x)): a product of two θ-dependent tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.a(x) * self.b(x))


class Square(nn.Module):
    """x ↦ head(a(x)²) written as a product of a tensor with itself."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(h * h)


class Quotient(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.a(x) / (self.b(x).abs() + 1.0))


class Twice(nn.Module):
    """The same Linear applied twice: its weight is used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.a(torch.relu(self.a(x)))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attention(x, x, x)[0].mean(1))


class Scale(nn.Module):
    """A learnable elementwise scale: θ enters through a multiplication, not an affine layer."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.head(self.a(x) * self.scale)


class Exponential(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.exp(self.a(x)))


@pytest.mark.parametrize("model, inputs, cause", [
    (vector_net(nn.LayerNorm(4)), VECTORS, "layer_norm"),
    (Attention(), torch.randn(2, 3, 4), "multi_head_attention"),
    (Product(), VECTORS, "multiplies two θ-dependent tensors"),
    (Square(), VECTORS, "multiplies two θ-dependent tensors"),
    (Quotient(), VECTORS, "divides by a θ-dependent tensor"),
    (Twice(), VECTORS, "a.weight is used twice"),
    (Scale(), VECTORS, "parameter scale enters through"),
    (Exponential(), VECTORS, "exp is not an operation hessdiag knows"),
    (vector_net(nn.Softmax(-1)), VECTORS, "softmax"),
], ids=["layernorm", "attention", "product", "square", "quotient", "twice", "scale", "exp",
        "softmax"])
def test_general_networks_are_recognised_with_their_cause(model, inputs, cause):
    found = classify(model, inputs)
    assert found.kind == "general"
    assert cause in found.reason


def test_train_mode_dropout_and_batchnorm_are_general():
    dropout = classify(vector_net(nn.Dropout(0.5)), VECTORS, train=True)
    assert dropout.kind == "general" and "dropout is active" in dropout.reason
    batchnorm = classify(vector_net(nn.BatchNorm1d(4)), VECTORS, train=True)
    assert batchnorm.kind == "general" and "batch statistics" in batchnorm.reason


def test_one_general_operation_outweighs_smooth_activations():
    found = classify(vector_net(nn.SiLU(), nn.Linear(4, 4), nn.LayerNorm(4)), VECTORS)
    assert found.kind == "general" and "layer_norm" in found.reason


def test_recording_leaves_the_callers_parameters_untouched():
    model = residual_cnn(nn.SiLU)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    classify(model, residual_cnn_data(2)[0])
    for name, p in params.items():
        assert p.grad is None and torch.equal(p.detach(), before[name])


# -- per objective (estimators.structural) ---------------------------------------------------


def test_objective_structure_runs_in_eval_mode_and_is_cached():
    model = vector_net(nn.Dropout(0.5), nn.SiLU())
    model.train()  # the objective measures in eval mode: dropout off
    objective = Objective(model, (torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])))
    found = objective_structure(objective)
    assert found.kind == "elementwise", found.reason
    assert model.training  # the user's flag is restored
    assert objective_structure(objective) is found
