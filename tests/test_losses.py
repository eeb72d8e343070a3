"""hessdiag.losses: every loss against float64 autograd on torch's own loss modules.

Tolerances: the exact estimators and the exact GGN diagonal are deterministic float64
computations of the same quantity as the reference by a different route (closed forms vs
autograd through torch's loss), so they agree to rounding: 1e-10 relative to the largest
entry leaves four orders of magnitude above the ~1e-15 observed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessdiag
from hessdiag.cli import main
from hessdiag.demo import bundled_checkpoint
from hessdiag.errors import HessdiagError
from hessdiag.ggn import ggn_diagonal
from hessdiag.losses import LOSSES, CallableLoss, CrossEntropyLoss, LossError, resolve_loss
from hessdiag.objective import Objective
from tests.reference import flat, max_relative_error, reference_diagonal, reference_ggn_diagonal

RTOL = 1e-10
N, D, C = 24, 5, 3
WEIGHT = torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64)


def _targets(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "labels":
        return torch.randint(0, C, (N,), generator=g)
    if kind == "probabilities":
        return torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
    if kind == "binary":
        return torch.randint(0, 2, (N, C), generator=g).double()
    return torch.randn(N, C, generator=g, dtype=torch.float64)


def _mean_quartic(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A convex custom loss without a closed form here: mean over examples of Σ r² + r⁴/4."""
    r = output - target
    return (r ** 2 + r ** 4 / 4).sum(-1).mean()


# (id, the loss as the user passes it, the same loss for the torch reference, targets, log-softmax output)
CASES = [
    ("ce-smoothing", nn.CrossEntropyLoss(label_smoothing=0.1), None, "labels", False),
    ("ce-weights", nn.CrossEntropyLoss(weight=WEIGHT), None, "labels", False),
    ("ce-weights-smoothing", nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.2), None, "labels", False),
    ("ce-probabilities", nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.2), None, "probabilities", False),
    ("nll-weights", nn.NLLLoss(weight=WEIGHT), None, "labels", True),
    ("bce", nn.BCEWithLogitsLoss(weight=WEIGHT, pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)),
     None, "binary", False),
    ("bce-by-name", "bce", nn.BCEWithLogitsLoss(), "binary", False),
    ("mse-labels", "mse", lambda o, y: F.mse_loss(o, F.one_hot(y, C).double()), "labels", False),
    ("huber", nn.HuberLoss(delta=0.5), None, "regression", False),
    ("huber-by-name", "huber", nn.HuberLoss(), "regression", False),
    ("custom", _mean_quartic, None, "regression", False),
    ("custom-module", nn.SmoothL1Loss(beta=2.0), None, "regression", False),
]


def _close(estimate, reference) -> bool:
    """max |est − ref| ≤ RTOL · max |ref|; an all-zero reference (nll's GGN) must be met exactly."""
    a, b = flat(estimate), flat(reference)
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max())


def _mlp(log_softmax: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)] + ([nn.LogSoftmax(-1)] if log_softmax else [])
    return nn.Sequential(*layers).double()


class _SkipNet(nn.Module):
    """Not an MLP: a residual branch and LayerNorm send exact through basis HVPs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(D, 4), nn.LayerNorm(4), nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + torch.nn.functional.silu(self.norm(h)))


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64), _targets(kind)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_diagonal_and_ggn_match_torch_losses(case):
    _, loss, reference_loss, kind, log_softmax = case
    reference_loss = reference_loss or loss
    x, y = _data(kind)
    for model in (_mlp(log_softmax), nn.Sequential(_SkipNet(), *([nn.LogSoftmax(-1)] if log_softmax else []))):
        model = model.double()
        reference = reference_diagonal(model, reference_loss, x, y)
        # batches of 7 split the data unevenly: weighted losses must still combine to torch's mean
        result = hessdiag.measure(model, (x, y), loss=loss, estimator="exact", batch_size=7,
                                  split_ggn=True, keep_diagonal=True)
        assert max_relative_error(result.diagonal, reference) < RTOL
        ggn_reference = reference_ggn_diagonal(model, reference_loss, x, y)
        assert _close(result.ggn_diagonal, ggn_reference)
        assert _close(_ggn(model, loss, x, y, "func"), ggn_reference)


def _ggn(model, loss, x, y, method):
    return ggn_diagonal(Objective(model, (x, y), loss, batch_size=7), method)[0]


@pytest.mark.parametrize("loss", ["bce", "huber", nn.CrossEntropyLoss(label_smoothing=0.1)],
                         ids=["bce", "huber", "ce-smoothing"])
def test_hooked_ggn_diagonal_carries_the_loss_hessian(loss):
    """The tape GGN (per-example squared gradients of the factor columns) for each loss."""
    x, y = _data("binary" if loss == "bce" else "regression" if loss == "huber" else "labels")
    model = _mlp(False)
    assert max_relative_error(_ggn(model, loss, x, y, "tape"),
                              reference_ggn_diagonal(model, nn.BCEWithLogitsLoss() if loss == "bce"
                                                     else nn.HuberLoss() if loss == "huber" else loss, x, y)) < RTOL


def test_objective_equals_torch_weighted_mean_over_all_data():
    """torch's weighted mean divides by Σ w_y, not N; the objective is that value for any batching."""
    x, y = _data("labels")
    model = _mlp(False)
    with torch.no_grad():
        expected = float(nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1)(model(x), y))
    for batch_size in (None, 5):
        objective = Objective(model, (x, y), nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1),
                              batch_size=batch_size)
        assert objective.loss_value() == pytest.approx(expected, rel=1e-12)


def test_stochastic_estimators_take_any_loss():
    """Hutchinson's estimate is unbiased for a custom loss too: the 95 % interval covers the truth."""
    x, y = _data("regression")
    model = _mlp(False)
    truth = hessdiag.measure(model, (x, y), loss=_mean_quartic, estimator="exact").normalized_norm
    result = hessdiag.measure(model, (x, y), loss=_mean_quartic, estimator="hutchinson-plain", samples=400)
    low, high = result.ci95
    assert low <= truth <= high
    assert result.loss == "custom:_mean_quartic"


def test_closed_forms_match_autograd_hessians_of_the_output():
    """Each built-in Qₙ Qₙᵀ equals the autograd Hessian of ℓₙ in the output."""
    output = torch.randn(6, C, dtype=torch.float64)
    for loss, kind in [(CrossEntropyLoss(WEIGHT, 0.3, scale=0.7), "labels"), (resolve_loss("ce"), "probabilities"),
                       (resolve_loss("nll"), "labels"), (resolve_loss("bce"), "binary"),
                       (resolve_loss("mse"), "regression"), (resolve_loss("huber"), "regression")]:
        target = _targets(kind)[:6]
        factors = loss.hessian_factors(output, target)
        hessians = CallableLoss(loss.batch_mean).output_hessians(output, target)
        assert torch.allclose(factors @ factors.transpose(1, 2), hessians, atol=1e-12), loss


def test_loss_descriptions_and_names():
    assert LOSSES == ("ce", "nll", "bce", "mse", "huber")
    assert resolve_loss(nn.CrossEntropyLoss(label_smoothing=0.1)).describe() == "ce(label_smoothing=0.1)"
    assert resolve_loss("ce", label_smoothing=0.05).describe() == "ce(label_smoothing=0.05)"
    assert resolve_loss(nn.HuberLoss(delta=2.0)).describe() == "huber(delta=2)"
    assert resolve_loss(nn.SmoothL1Loss()).describe() == "custom:SmoothL1Loss"


@pytest.mark.parametrize("loss, message", [
    ("hinge", "unknown loss 'hinge'"),
    (nn.MSELoss(reduction="sum"), "reduction='mean'"),
    (lambda o, y: ((o - y) ** 2).sum(), "not the mean of its per-example values"),
    (lambda o, y: -((o - y) ** 2).mean(), "not convex"),
    (lambda o, y: (o - y) ** 2, "must return a scalar"),
    (42, "a loss must be a name"),
])
def test_bad_losses_are_one_line_errors(loss, message):
    x, y = _data("regression")
    with pytest.raises(HessdiagError, match=message) as err:
        hessdiag.measure(_mlp(False), (x, y), loss=loss, estimator="exact")
    assert "\n" not in str(err.value)


def test_label_smoothing_is_for_ce_only():
    with pytest.raises(LossError, match="ce loss only"):
        resolve_loss("mse", label_smoothing=0.1)
    with pytest.raises(LossError, match=r"\[0, 1\)"):
        CrossEntropyLoss(label_smoothing=1.0)


def test_backpack_refuses_losses_it_has_no_extension_for():
    x, y = _data("labels")
    with pytest.raises(HessdiagError, match="no extension for the ce\\(label_smoothing=0.1\\) loss"):
        hessdiag.measure(_mlp(False), (x, y), loss=nn.CrossEntropyLoss(label_smoothing=0.1), estimator="backpack")


def test_the_user_model_and_loss_module_are_untouched():
    x, y = _data("labels")
    model, loss = _mlp(False), nn.CrossEntropyLoss(weight=WEIGHT.clone())
    before = [p.detach().clone() for p in model.parameters()]
    hessdiag.measure(model, (x, y), loss=loss, estimator="exact")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(loss.weight, WEIGHT)


@pytest.mark.parametrize("flags, loss", [
    (["--loss", "ce", "--label-smoothing", "0.1"], "ce(label_smoothing=0.1)"),
    (["--loss", "nll"], "nll"),
    (["--loss", "bce"], "bce"),
    (["--loss", "huber"], "huber"),
])
def test_cli_losses(flags, loss, capsys, tmp_path):
    import json

    out = tmp_path / "r.json"
    code = main(["measure", str(bundled_checkpoint()), "--max-examples", "40", "--estimator", "exact",
                 "--quiet", "--json", str(out), *flags])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["loss"] == loss


def test_cli_label_smoothing_with_another_loss_is_bad_input(capsys):
    code = main(["measure", str(bundled_checkpoint()), "--max-examples", "40", "--loss", "mse",
                 "--label-smoothing", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "label-smoothing applies to the ce loss" in err and err.count("\n") == 1
