r"""Robustness evaluation: clean accuracy, PGD-20 and AutoAttack accuracy at an L∞ radius ε.

The attacks are torchattacks' own (not re-implemented here):

- **PGD** (``torchattacks.PGD``): ``steps`` (default 20) projected sign-gradient steps on
  the cross-entropy, step size ``alpha`` (default 2.5·ε/steps), from a uniformly random
  start in the ε-ball;
- **AutoAttack** (``torchattacks.AutoAttack(norm="Linf", version="standard", eps=ε,
  n_classes=C, seed=seed)``): APGD-CE, then targeted APGD (DLR loss, C − 1 targets),
  targeted FAB and Square (5,000 queries), each run on the examples the previous ones did
  not break. torchattacks (3.5) configures APGD and APGD-T with 10 iterations per run,
  where the reference AutoAttack uses 100, so its "standard" version is a cheaper (possibly
  weaker) ensemble than the one in published AutoAttack tables; the attack names and their
  order are the same.

Inputs must lie in [0, 1] (the attacks clip to that box; ``load_data("digits")`` is
scaled so). **Robust accuracy** counts an example as robust when the model classifies it
correctly both clean and at the attack's output, so it never exceeds the clean accuracy,
and at ε = 0 it equals the clean accuracy exactly (every attack returns the input itself).
Only the clean-correct examples are attacked. The model is evaluated in eval mode and its
train/eval flag restored. Attacks run in batches of ``batch_size`` on the model's device,
on float32 images fed to the model in its own dtype; their randomness is seeded with
``seed`` (the caller's RNG state is restored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import (ExperimentError, as_pair, check_eps, check_positive_int, check_unit_box,
                      import_torchattacks, model_device, model_dtype, seeded)

ATTACKS = ("pgd", "autoattack")
PGD_STEPS = 20

__all__ = [
    "ATTACKS",
    "PGD_STEPS",
    "RobustnessResult",
    "autoattack_accuracy",
    "clean_accuracy",
    "evaluate",
    "pgd_accuracy",
]


@dataclass(frozen=True)
class RobustnessResult:
    """Accuracies (fractions in [0, 1]) of one model on ``num_examples`` examples at L∞ radius ``eps``.

    ``pgd_accuracy``/``autoattack_accuracy`` are ``None`` when that attack was not run;
    ``pgd_steps`` and ``pgd_alpha`` describe the PGD that ran; ``seconds`` maps
    ``"clean"``, ``"pgd"`` and ``"autoattack"`` to their wall-clock times.
    """

    eps: float
    num_examples: int
    clean_accuracy: float
    pgd_accuracy: float | None
    autoattack_accuracy: float | None
    pgd_steps: int | None
    pgd_alpha: float | None
    seed: int
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prepared(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ExperimentError(f"x and y need the same, positive number of examples "
                              f"(got {x.shape[0]} and {y.shape[0]})")
    if y.is_floating_point() or y.dim() != 1:
        raise ExperimentError("robust accuracy needs integer class labels of shape (N,)")
    check_unit_box(x, "the attacks")
    # The attacks work on float32 images; _AsDtype casts them to the model's own dtype.
    return x.to(device=model_device(model), dtype=torch.float32), y.to(model_device(model))


class _AsDtype(nn.Module):
    """Runs ``model`` in ``dtype`` on float32 images and returns float32 logits.

    torchattacks builds some tensors in float32 whatever the model (FAB fails on a float64
    model), so the attacks see float32 images and logits only; gradients flow through the
    casts. Predictions for the accuracies come from the model itself, in its own dtype.
    Its train/eval flag is the model's.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.model(x.to(self.dtype)).float()


def _attackable(model: nn.Module) -> nn.Module:
    dtype = model_dtype(model)
    return model if dtype == torch.float32 else _AsDtype(model, dtype)


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    dtype = model_dtype(model)
    return torch.cat([model(x[i : i + batch_size].to(dtype)).argmax(-1)
                      for i in range(0, len(x), batch_size)])


def _robust_count(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                  make_attack: Callable[[nn.Module], Any], seed: int) -> tuple[int, int]:
    """(clean-correct count, robust count); the attack runs on the clean-correct examples only."""
    was_training = model.training
    model.eval()
    try:
        correct = _predict(model, x, batch_size) == y
        xs, ys = x[correct], y[correct]
        robust = 0
        if len(ys):
            with seeded(seed, model_device(model)):
                attack = make_attack(_attackable(model))
                for i in range(0, len(ys), batch_size):
                    xb, yb = xs[i : i + batch_size], ys[i : i + batch_size]
                    x_adv = attack(xb, yb).detach()
                    model.eval()  # torchattacks restores the mode it found; keep eval
                    robust += int((_predict(model, x_adv, batch_size) == yb).sum())
        return int(correct.sum()), robust
    finally:
        model.train(was_training)


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy on unperturbed inputs, in eval mode (the model's flag is restored)."""
    check_positive_int(batch_size, "batch_size")
    x, y = _prepared(model, x, y)
    was_training = model.training
    model.eval()
    try:
        return float((_predict(model, x, batch_size) == y).double().mean())
    finally:
        model.train(was_training)


def pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = PGD_STEPS,
    alpha: float | None = None, seed: int = 0, batch_size: int = 512,
) -> float:
    """Robust accuracy under ``torchattacks.PGD`` (random start; default PGD-20, α = 2.5·ε/steps)."""
    eps = check_eps(eps)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    x, y = _prepared(model, x, y)
    ta = import_torchattacks()
    _, robust = _robust_count(
        model, x, y, batch_size,
        lambda net: ta.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=True), seed)
    return robust / len(y)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1].to(model_dtype(model))).shape[-1])
    finally:
        model.train(was_training)


def autoattack_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, n_classes: int | None = None,
    seed: int = 0, batch_size: int = 512,
) -> float:
    """Robust accuracy under ``torchattacks.AutoAttack(norm="Linf", version="standard")``.

    ``n_classes`` defaults to the model's number of outputs (at least 3: the targeted
    attacks' DLR loss compares the three largest logits).
    """
    eps = check_eps(eps)
    check_positive_int(batch_size, "batch_size")
    x, y = _prepared(model, x, y)
    classes = _num_classes(model, x) if n_classes is None else check_positive_int(n_classes, "n_classes")
    if classes < 3:
        raise ExperimentError(f"AutoAttack's targeted attacks need at least 3 classes, got {classes}")
    ta = import_torchattacks()
    _, robust = _robust_count(
        model, x, y, batch_size,
        lambda net: ta.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=classes,
                                  seed=seed),
        seed)
    return robust / len(y)


def evaluate(
    model: nn.Module, data: Any, eps: float, *, attacks: Iterable[str] = ATTACKS,
    pgd_steps: int = PGD_STEPS, pgd_alpha: float | None = None, n_classes: int | None = None,
    seed: int = 0, batch_size: int = 512,
) -> RobustnessResult:
    """Clean accuracy plus the requested attacks' robust accuracies at L∞ radius ``eps``.

    ``data`` is an ``(x, y)`` pair or a data spec (its ``test`` split, e.g. ``"digits"``);
    ``attacks`` is any subset of ``("pgd", "autoattack")``.
    """
    eps = check_eps(eps)
    wanted = tuple(attacks)
    unknown = [a for a in wanted if a not in ATTACKS]
    if unknown:
        raise ExperimentError(f"unknown attack(s) {', '.join(map(repr, unknown))}; "
                              f"choose from {', '.join(ATTACKS)}")
    x, y = as_pair(data, "test")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    clean = clean_accuracy(model, x, y, batch_size=batch_size)
    seconds["clean"] = time.perf_counter() - start
    pgd = auto = None
    alpha = None
    if "pgd" in wanted:
        check_positive_int(pgd_steps, "pgd_steps")
        alpha = 2.5 * eps / pgd_steps if pgd_alpha is None else float(pgd_alpha)
        start = time.perf_counter()
        pgd = pgd_accuracy(model, x, y, eps, steps=pgd_steps, alpha=alpha, seed=seed, batch_size=batch_size)
        seconds["pgd"] = time.perf_counter() - start
    if "autoattack" in wanted:
        start = time.perf_counter()
        auto = autoattack_accuracy(model, x, y, eps, n_classes=n_classes, seed=seed, batch_size=batch_size)
        seconds["autoattack"] = time.perf_counter() - start
    return RobustnessResult(
        eps=eps, num_examples=len(y), clean_accuracy=clean, pgd_accuracy=pgd,
        autoattack_accuracy=auto, pgd_steps=pgd_steps if "pgd" in wanted else None,
        pgd_alpha=alpha, seed=seed, seconds=seconds,
    )
