"""The curvature tape: exact GGN diagonal and exact activation residual from backward passes.

References, all float64:

- ``objective.ggn.per_example_diagonal()``: per-example VJPs of the loss-Hessian factor by torch.func;
- the exact Hessian diagonal from basis-vector HVPs (``ExactEstimator(analytic=False)``),
  and once from the full Hessian by ``torch.autograd.functional.hessian``
  (tests/reference.py).

Both sides compute the same quantities by different routes, so they differ by float64
rounding only (observed ≤ 1e-15 relative). The tolerance 1e-10 is far above that and far
below any real error: on these networks the residual is 15–100 % of the diagonal, so
dropping it, or any one activation site's share, fails by orders of magnitude.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessdiag
from hessdiag.curvature_tape import TapedBatch, TapeError, tape_ggn_diagonal
from hessdiag.estimators import EstimatorOptions, ExactEstimator
from hessdiag.objective import Objective

from .models import randomize_batchnorm, residual_cnn, residual_cnn_data
from .reference import max_relative_error, reference_diagonal

RTOL = 1e-10

SMOOTH = {
    "silu": nn.SiLU,
    "silu-inplace": lambda: nn.SiLU(inplace=True),
    "rct": lambda: hessdiag.RCTAF(1, 3.0),
    "rct-n2": lambda: hessdiag.RCTAF(2, 2.0),
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": lambda: nn.Softplus(beta=2.0),
    "mish": nn.Mish,
    "elu": nn.ELU,
    "hardswish": nn.Hardswish,
}


def exact_diagonal(objective: Objective) -> dict:
    return ExactEstimator(EstimatorOptions(), analytic=False).estimate(objective).diagonal


def taped_hessian_diagonal(objective: Objective) -> dict:
    """(1/N) Σ over batches of ggn_squares() + residual_squares(): the exact diag H of a
    network with elementwise activations only."""
    total = {n: torch.zeros_like(p) for n, p in objective.params.items()}
    for x, y, _ in objective.batches():
        batch = TapedBatch(objective, x, y)
        batch.loss_gradient()
        for part in (batch.ggn_squares(), batch.residual_squares()):
            for name, value in part.items():
                total[name] += value
    return {n: v / objective.num_examples for n, v in total.items()}


# -- GGN diagonal ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["relu", "silu", "tanh"])
def test_tape_ggn_diagonal_equals_the_torch_func_ggn_diagonal(loss, activation):
    act = nn.ReLU if activation == "relu" else SMOOTH[activation]
    objective = Objective(residual_cnn(act, inplace_add=True), residual_cnn_data(), loss,
                          batch_size=3)
    found = tape_ggn_diagonal(objective)
    assert max_relative_error(found, objective.ggn.per_example_diagonal()) <= RTOL


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_piecewise_linear_net_tape_ggn_is_the_exact_hessian_diagonal(loss, inplace):
    """ReLU CNN with eval BatchNorm, max pooling and a residual add: diag H = diag GGN."""
    model = residual_cnn(lambda: nn.ReLU(inplace=inplace), inplace_add=inplace)
    objective = Objective(model, residual_cnn_data(), loss, batch_size=3)
    exact = exact_diagonal(objective)
    assert max_relative_error(tape_ggn_diagonal(objective), exact) <= RTOL
    if loss == "ce" and inplace:
        # Once, the basis HVPs themselves against the full autograd Hessian (tests/reference.py).
        x, y = residual_cnn_data()
        assert max_relative_error(exact, reference_diagonal(model, loss, x, y)) <= RTOL


# -- GGN + residual = Hessian diagonal -----------------------------------------------------------


# Each network mixes three activations (stem, inside the block, after the residual sum), so
# every listed activation is covered while only a few networks need the costly per-unit
# residual (2 backward passes per activation unit and batch).
MIXED = [
    ("silu", "rct", "tanh"),
    ("gelu", "softplus", "mish"),
    ("elu", "hardswish", "rct-n2"),
    ("silu-inplace", "silu-inplace", "silu-inplace"),
]


@pytest.mark.parametrize("activations", MIXED, ids=["-".join(a) for a in MIXED])
def test_ggn_plus_residual_is_the_exact_hessian_diagonal(activations):
    """Uneven batches (5 examples in batches of 3 and 2), residual add written in place."""
    model = residual_cnn(tuple(SMOOTH[a] for a in activations), inplace_add=True)
    objective = Objective(model, residual_cnn_data(), "ce", batch_size=3)
    exact = exact_diagonal(objective)
    # The residual matters here: without it the error is ≥ 15 % (see the module docstring).
    assert max_relative_error(objective.ggn.per_example_diagonal(), exact) > 0.1
    assert max_relative_error(taped_hessian_diagonal(objective), exact) <= RTOL


def test_ggn_plus_residual_with_mse_and_an_out_of_place_residual_add():
    model = residual_cnn((SMOOTH["rct"], SMOOTH["silu"], SMOOTH["softplus"]), inplace_add=False)
    objective = Objective(model, residual_cnn_data(), "mse", batch_size=4)
    exact = exact_diagonal(objective)
    assert max_relative_error(objective.ggn.per_example_diagonal(), exact) > 0.1
    assert max_relative_error(taped_hessian_diagonal(objective), exact) <= RTOL


class Sequence(nn.Module):
    """Conv1d ('same', dilated) → Tensor.tanh → Linear over the positions of [n, L, C] →
    tanh-approximated GELU → grouped strided Conv1d → BN → Softplus(β=2) → sigmoid → Linear:
    the 3-d linear and 1-d conv rules, functional calls with options, chained activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding="same", dilation=2)
        self.mix = nn.Linear(4, 4)
        self.grouped = nn.Conv1d(4, 4, 3, stride=2, groups=2, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x).tanh().transpose(1, 2)  # [n, 6, 4]
        h = F.gelu(self.mix(h), approximate="tanh").transpose(1, 2)  # [n, 4, 6]
        h = torch.sigmoid(F.softplus(self.bn(self.grouped(h)), beta=2.0))  # [n, 4, 2]
        return self.head(h.flatten(1))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_plus_residual_on_a_sequence_model_with_functional_activations(loss):
    torch.manual_seed(0)
    model = randomize_batchnorm(Sequence()).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    objective = Objective(model, (x, y), loss, batch_size=3)
    exact = exact_diagonal(objective)
    assert max_relative_error(tape_ggn_diagonal(objective), objective.ggn.per_example_diagonal()) <= RTOL
    assert max_relative_error(taped_hessian_diagonal(objective), exact) <= RTOL


# -- the pieces ----------------------------------------------------------------------------


def test_loss_gradient_records_the_activation_gradients():
    """Site gradients ∂(Σₙ ℓₙ)/∂aᵤ against autograd on the same forward graph."""
    model = residual_cnn(nn.SiLU)
    x, y = residual_cnn_data()
    objective = Objective(model, (x, y), "ce")
    batch = TapedBatch(objective, x, y)
    batch.loss_gradient()
    assert len(batch.sites) == 3
    activations = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: activations.append(out))
             for m in model.modules() if isinstance(m, nn.SiLU)]
    out = model.eval()(x)
    for hook in hooks:
        hook.remove()
    total = F.cross_entropy(out, y, reduction="sum")
    grads = torch.autograd.grad(total, activations)
    # The forward hooks see the activations in the order the tape recorded its sites.
    for site, expected in zip(batch.sites, grads):
        assert torch.allclose(site.grad, expected, rtol=1e-12, atol=1e-14)
        assert torch.equal(site.coefficient(), site.grad * site.curvature)


def test_output_squares_are_weighted_per_example():
    """Weights wₙ scale example n's squares: weight one example only and compare."""
    objective = Objective(residual_cnn(nn.Tanh), residual_cnn_data(), "ce")
    x, y, _ = next(objective.batches())
    batch = TapedBatch(objective, x, y)
    column = batch.factor[:, :, 0]
    whole = batch.output_squares(column)
    parts = [batch.output_squares(column, torch.eye(5, dtype=torch.float64)[n]) for n in range(5)]
    doubled = batch.output_squares(column, 2.0 * torch.ones(5, dtype=torch.float64))
    for name in whole:
        assert torch.allclose(sum(p[name] for p in parts), whole[name], rtol=1e-12)
        assert torch.allclose(doubled[name], 2.0 * whole[name], rtol=1e-14)


def test_the_coefficient_needs_the_loss_gradient_pass():
    objective = Objective(residual_cnn(nn.SiLU), residual_cnn_data(), "ce")
    x, y, _ = next(objective.batches())
    with pytest.raises(TapeError, match="loss-gradient"):
        TapedBatch(objective, x, y).residual_squares()


def test_the_tape_leaves_the_model_untouched():
    model = residual_cnn(nn.SiLU)
    model.train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    objective = Objective(model, residual_cnn_data(), "ce")
    tape_ggn_diagonal(objective)
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # running statistics included
    assert all(p.grad is None for p in model.parameters())


class ModifiesLayerInput(nn.Module):
    """Scales a hidden tensor in place after a Linear layer has read it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        out = self.b(h)
        h.mul_(2.0)
        return out


def test_modifying_a_layer_input_in_place_is_refused():
    torch.manual_seed(0)
    objective = Objective(ModifiesLayerInput().double(),
                          (torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])))
    x, y, _ = next(objective.batches())
    with pytest.raises(TapeError, match="modified in place"):
        TapedBatch(objective, x, y)


def test_asymmetric_same_padding_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Flatten(),
                          nn.Linear(32, 3)).double()
    objective = Objective(model, (torch.randn(3, 1, 4, 4, dtype=torch.float64),
                                  torch.tensor([0, 1, 2])))
    x, y, _ = next(objective.batches())
    with pytest.raises(TapeError, match="asymmetric"):
        TapedBatch(objective, x, y)


def test_a_dropped_batch_is_freed_without_the_cycle_collector():
    """Nothing of a batch may sit in a reference cycle. Two cycles were found and fixed:
    recorded layer calls holding their inputs with the graph (a cycle through autograd
    nodes, never collected: about 1 GB more per curvprop run on resnet18_cifar(silu,
    width=8) with 64 examples) and sites pointing back at their tape (collected only when
    the cycle collector runs, which need not happen between batches: three batches of 128
    on width 16 peaked at 12.5 GB, against 5.9 GB without). Either one fails this test."""
    x, y = residual_cnn_data(6)
    objective = Objective(residual_cnn(nn.SiLU), (x, y), "ce")
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        batch = TapedBatch(objective, x, y)
        batch.loss_gradient()
        batch.injected_squares([site.coefficient() for site in batch.sites])
        batch.ggn_squares()
        assert batch.sites and batch._tape.calls
        alive = [weakref.ref(batch._tape)] + [weakref.ref(site) for site in batch.sites]
        del batch
        assert all(ref() is None for ref in alive)
    finally:
        if enabled:
            gc.enable()
