"""Robust accuracy from torchattacks' PGD and AutoAttack, checked where the answer is known.

At ε = 0 every attack returns its input, so robust accuracy equals clean accuracy; at ε = 1
on inputs in [0, 1] the attacker may output any image, so a model that is not constant
is always fooled (robust accuracy 0). AutoAttack runs in torchattacks' full "standard"
version, no reduced setting, on 4 examples (about 6 s: at ε = 0 nothing is broken, so
Square spends all its 5,000 queries).
"""

import copy

import pytest
import torch
import torchattacks

from hessdiag.experiments import (ExperimentError, RobustnessResult, autoattack_accuracy,
                                  clean_accuracy, evaluate, pgd_accuracy, train)
from hessdiag.experiments.attacks import _attackable
from hessdiag.io.data import load_data
from hessdiag.models import mlp


@pytest.fixture(scope="module")
def trained():
    """A 64-16-10 RCT-AF MLP trained briefly on digits, and 40 test examples."""
    torch.manual_seed(0)
    model = mlp(hidden=(16,), activation="rct:n=1,alpha=2")
    train(model, "digits", epochs=3, seed=0)
    x, y = load_data("digits", split="test", max_examples=40)
    return model, x, y


def test_clean_accuracy_of_a_non_constant_model(trained):
    model, x, y = trained
    assert 0.6 < clean_accuracy(model, x, y) < 1.0
    with torch.no_grad():
        assert len(set(model(x).argmax(-1).tolist())) > 1


def test_pgd_at_eps_0_is_clean_accuracy_and_at_eps_1_is_zero(trained):
    model, x, y = trained
    clean = clean_accuracy(model, x, y)
    assert pgd_accuracy(model, x, y, 0.0) == clean
    assert pgd_accuracy(model, x, y, 1.0) == 0.0
    mid = pgd_accuracy(model, x, y, 0.1)
    assert 0.0 <= mid <= clean


def test_autoattack_at_eps_0_is_clean_accuracy_and_at_eps_1_is_zero(trained):
    model, x, y = trained
    xs, ys = x[:4], y[:4]
    assert autoattack_accuracy(model, xs, ys, 0.0) == clean_accuracy(model, xs, ys) > 0
    assert autoattack_accuracy(model, x, y, 1.0) == 0.0


def test_attacks_are_seeded_and_leave_the_model_and_rng_alone(trained):
    model, x, y = trained
    model.train()
    rng = torch.random.get_rng_state()
    first = pgd_accuracy(model, x, y, 0.08, steps=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training  # the train/eval flag is restored
    model.eval()
    assert pgd_accuracy(model, x, y, 0.08, steps=5, seed=3) == first


def test_evaluate_reports_every_number(trained):
    model, x, y = trained
    res = evaluate(model, (x, y), 1.0, attacks=("pgd", "autoattack"))
    assert isinstance(res, RobustnessResult)
    assert res.num_examples == 40 and res.eps == 1.0
    assert res.pgd_accuracy == 0.0 and res.autoattack_accuracy == 0.0
    assert res.pgd_steps == 20 and res.pgd_alpha == pytest.approx(2.5 / 20)
    assert set(res.seconds) == {"clean", "pgd", "autoattack"}
    only_clean = evaluate(model, (x, y), 0.1, attacks=())
    assert only_clean.pgd_accuracy is None and only_clean.to_dict()["clean_accuracy"] == res.clean_accuracy


def test_bad_inputs_are_refused(trained):
    model, x, y = trained
    with pytest.raises(ExperimentError, match=r"\[0, 1\]"):
        pgd_accuracy(model, x * 2 - 1, y, 0.1)
    with pytest.raises(ExperimentError, match="eps"):
        pgd_accuracy(model, x, y, float("nan"))
    with pytest.raises(ExperimentError, match="unknown attack"):
        evaluate(model, (x, y), 0.1, attacks=("cw",))


def test_a_float64_model_is_attacked_in_its_own_dtype(trained):
    model, x, y = trained
    model64 = copy.deepcopy(model).double()
    assert pgd_accuracy(model64, x, y, 0.0) == clean_accuracy(model64, x, y) == clean_accuracy(model, x, y)
    assert pgd_accuracy(model64, x, y, 1.0) == 0.0
    assert autoattack_accuracy(model64, x[:8], y[:8], 1.0) == 0.0
    assert next(model64.parameters()).dtype == torch.float64
    # AutoAttack's FAB mixes float32 buffers with the logits: the attacks see float32 only
    net = _attackable(model64)
    adv = torchattacks.FAB(net, eps=0.1, multi_targeted=True, n_classes=10)(x[:4], y[:4])
    assert adv.dtype == torch.float32 and float((adv - x[:4]).abs().max()) <= 0.1 + 1e-6
