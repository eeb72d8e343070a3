"""Training: standard, PGD-AT and TRADES are seeded, deterministic, and reduce to each other
where they must (ε = 0, β = 0)."""

import math

import pytest
import torch

from hessdiag.experiments import ExperimentError, TrainingHistory, train
from hessdiag.io.data import load_data
from hessdiag.models import mlp
from hessdiag.training import accuracy


@pytest.fixture(scope="module")
def digits_small():
    x, y = load_data("digits", split="train")
    return x[:96], y[:96]


def _model(seed=0):
    torch.manual_seed(seed)
    return mlp(in_features=64, hidden=(12,), num_classes=10, activation="rct:n=1,alpha=3")


def _run(data, method, seed=0, **kw):
    model = _model()
    history = train(model, data, method, epochs=2, batch_size=32, seed=seed, **kw)
    return model, history


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("method", ["standard", "pgd-at", "trades"])
def test_same_seed_gives_bit_identical_weights(digits_small, method):
    kw = {} if method == "standard" else {"eps": 0.1, "steps": 3}
    a, ha = _run(digits_small, method, **kw)
    b = _model()
    rng = torch.random.get_rng_state()
    hb = train(b, digits_small, method, epochs=2, batch_size=32, seed=0, **kw)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's RNG is untouched
    c, _ = _run(digits_small, method, seed=1, **kw)
    assert _same(a, b) and ha.losses == hb.losses
    assert not _same(a, c)
    assert isinstance(ha, TrainingHistory) and len(ha.losses) == 2 and not a.training
    assert ha.config.method == method and ha.to_dict()["config"]["seed"] == 0


def test_pgd_at_at_eps_0_and_trades_at_beta_0_are_standard_training(digits_small):
    ref, hist = _run(digits_small, "standard")
    assert hist.config.eps is None and hist.config.beta is None
    pgd, h = _run(digits_small, "pgd-at", eps=0.0, steps=2)
    assert h.config.alpha == 0.0  # 2.5·ε/steps
    assert _same(ref, pgd)  # the attack returns x itself: CE(f(x), y)
    trades, h = _run(digits_small, "trades", eps=0.1, steps=2, beta=0.0)
    assert h.config.alpha == pytest.approx(0.125)
    assert _same(ref, trades)  # CE(f(x), y) + 0·KL


def test_trades_loss_includes_the_kl_term(digits_small):
    _, plain = _run(digits_small, "trades", eps=0.2, steps=2, beta=0.0)
    _, robust = _run(digits_small, "trades", eps=0.2, steps=2, beta=6.0)
    assert robust.losses[0] > plain.losses[0]


def test_standard_training_learns_digits():
    x, y = load_data("digits", split="train")
    xt, yt = load_data("digits", split="test")
    torch.manual_seed(0)
    model = mlp(hidden=(32,), activation="rct:n=1,alpha=2")
    history = train(model, (x, y), epochs=4, seed=0)
    assert history.losses[-1] < history.losses[0]
    assert accuracy(model, xt, yt) > 0.8  # 0.88 observed


def test_sgd_and_data_spec(digits_small):
    model = _model()
    history = train(model, "digits", epochs=1, batch_size=256, optimizer="sgd", lr=0.05,
                    weight_decay=5e-4)
    assert history.config.momentum == 0.9 and history.config.optimizer == "sgd"


def test_lr_schedules_set_the_rate_of_each_epoch(digits_small, monkeypatch):
    from hessdiag.experiments import training as tr

    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    per_epoch = {}
    for schedule in tr.LR_SCHEDULES:
        seen.clear()
        history = train(_model(), digits_small, epochs=8, batch_size=96, lr=0.1, lr_schedule=schedule)
        assert history.config.lr_schedule == schedule
        per_epoch[schedule] = list(seen)  # one step per epoch: batch = all 96 examples
    assert per_epoch["constant"] == [0.1] * 8
    assert per_epoch["piecewise"] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    cosine = per_epoch["cosine"]
    assert cosine[0] == 0.1 and cosine[4] == pytest.approx(0.05)
    assert cosine[7] == pytest.approx(0.1 * 0.5 * (1 + math.cos(7 * math.pi / 8)))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "fgsm"}, "unknown training method"),
    ({"method": "pgd-at"}, "needs eps"),
    ({"method": "trades", "eps": -0.1}, "eps must be"),
    ({"method": "standard", "optimizer": "rmsprop"}, "unknown optimizer"),
    ({"method": "standard", "lr_schedule": "step"}, "unknown lr_schedule"),
    ({"method": "standard", "epochs": 0}, "epochs"),
])
def test_bad_arguments_are_refused(digits_small, kwargs, message):
    with pytest.raises(ExperimentError, match=message):
        train(_model(), digits_small, **kwargs)


def test_adversarial_training_refuses_inputs_outside_the_unit_box(digits_small):
    x, y = digits_small
    with pytest.raises(ExperimentError, match=r"\[0, 1\]"):
        train(_model(), (x * 2 - 1, y), "pgd-at", eps=0.1)
