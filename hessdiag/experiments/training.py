r"""Seeded training of classifiers: standard, Madry PGD adversarial training, and TRADES.

``train(model, data, method=...)`` trains ``model`` in place with mini-batches in a seeded
order and returns a :class:`TrainingHistory`. The three methods minimize

- ``"standard"``: the cross-entropy CE(f(x), y);
- ``"pgd-at"`` (Madry et al. 2018): CE(f(x'), y) only, where x' maximizes CE within the
  L∞ ball of radius ε around x (intersected with [0, 1]), found by projected sign-gradient
  ascent from a uniformly random start in the ball (``torchattacks.PGD`` with
  ``random_start=True``);
- ``"trades"`` (Zhang et al. 2019): CE(f(x), y) + β · KL(p(x) ‖ p(x')) with β = 6 by
  default, p = softmax ∘ f, the KL averaged over the batch, and x' maximizing that KL
  within the ball, found by projected sign-gradient ascent starting from x plus Gaussian
  noise of standard deviation 0.001 (``torchattacks.TPGD``, the inner maximization of the
  reference TRADES code). Gradients of the outer loss flow through both p(x) and p(x').

Both inner maximizations take ``steps`` sign-gradient steps of size ``alpha`` (default
2.5·ε/steps, a common rule of thumb: the steps add up to 2.5 ball radii, so the iterate
can reach any corner of the ball from any start) with the model in eval mode (BatchNorm
on its running statistics, dropout off), as in the reference implementations; the outer
step runs in train mode. Inputs must lie in [0, 1] for the adversarial methods, since the attacks
clip to that box.

Determinism: the batch order comes from a generator seeded with ``seed`` and the attacks'
random starts from torch's global RNG, seeded with ``seed`` for the duration of the call and
restored afterwards (the caller's RNG state is untouched). On CPU, the same seed, torch
build and thread count give bit-identical weights. The initial weights are the caller's:
seed before building the model (``torch.manual_seed``) to make a whole run reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (ExperimentError, as_pair, check_eps, check_positive_int, check_unit_box,
                      import_torchattacks, model_device, model_dtype, seeded)

METHODS = ("standard", "pgd-at", "trades")
OPTIMIZERS = ("adam", "sgd")
#: Learning-rate schedules, applied per epoch e of E: constant; cosine, lr·(1 + cos(πe/E))/2;
#: piecewise, lr × 0.1 from epoch ⌊E/2⌋ and × 0.01 from ⌊3E/4⌋ (Madry et al. 2018; Rice et
#: al. 2020 use it for PGD-AT on CIFAR-10).
LR_SCHEDULES = ("constant", "cosine", "piecewise")

__all__ = ["LR_SCHEDULES", "METHODS", "OPTIMIZERS", "TrainingConfig", "TrainingHistory", "train"]


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a :func:`train` call, resolved (e.g. the default PGD step size filled in).

    ``eps``, ``alpha`` and ``steps`` are ``None`` for ``"standard"``; ``beta`` is ``None``
    unless the method is ``"trades"``; ``momentum`` is ``None`` for Adam.
    """

    method: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    optimizer: str
    weight_decay: float
    momentum: float | None
    eps: float | None
    alpha: float | None
    steps: int | None
    beta: float | None
    lr_schedule: str = "constant"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, fit for a checkpoint's ``meta`` or a JSON record."""
        return asdict(self)


@dataclass
class TrainingHistory:
    """What :func:`train` did: its resolved config, the mean loss of each epoch, the time.

    ``losses[e]`` is the mean over the training examples of the method's own objective in
    epoch e (for ``"pgd-at"`` the adversarial cross-entropy, for ``"trades"`` CE + β·KL).
    """

    config: TrainingConfig
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "losses": list(self.losses), "seconds": self.seconds}


def _resolve(method: str, epochs: int, lr: float, batch_size: int, eps: float | None,
             alpha: float | None, steps: int, beta: float, seed: int, optimizer: str,
             weight_decay: float, momentum: float, lr_schedule: str) -> TrainingConfig:
    if method not in METHODS:
        raise ExperimentError(f"unknown training method {method!r}; choose one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ExperimentError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr_schedule not in LR_SCHEDULES:
        raise ExperimentError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ExperimentError(f"seed must be an integer, got {seed!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ExperimentError(f"{name} must be a finite number >= 0, got {value!r}")
    adversarial = method != "standard"
    if adversarial:
        if eps is None:
            raise ExperimentError(f"method {method!r} needs eps, the L∞ radius of the inner maximization")
        eps = check_eps(eps)
        check_positive_int(steps, "steps")
        alpha = 2.5 * eps / steps if alpha is None else float(alpha)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ExperimentError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if method == "trades" and not (math.isfinite(beta) and beta >= 0):
        raise ExperimentError(f"beta must be a finite number >= 0, got {beta!r}")
    return TrainingConfig(
        method=method, epochs=epochs, lr=float(lr), batch_size=batch_size, seed=seed,
        optimizer=optimizer, weight_decay=float(weight_decay),
        momentum=float(momentum) if optimizer == "sgd" else None,
        eps=eps if adversarial else None, alpha=alpha if adversarial else None,
        steps=steps if adversarial else None, beta=float(beta) if method == "trades" else None,
        lr_schedule=lr_schedule,
    )


def epoch_lr(cfg: TrainingConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.lr_schedule == "piecewise":
        return cfg.lr * (0.01 if epoch >= (3 * cfg.epochs) // 4 else 0.1 if epoch >= cfg.epochs // 2 else 1.0)
    return cfg.lr


def _optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum or 0.0,
                           weight_decay=cfg.weight_decay)


def train(
    model: nn.Module,
    data: Any,
    method: str = "standard",
    *,
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 64,
    eps: float | None = None,
    alpha: float | None = None,
    steps: int = 10,
    beta: float = 6.0,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    lr_schedule: str = "constant",
) -> TrainingHistory:
    """Train ``model`` in place; returns its :class:`TrainingHistory`. Leaves it in eval mode.

    Args:
        model: a classifier returning logits; trained on its own device and dtype.
        data: an ``(x, y)`` pair of tensors (inputs in [0, 1] for the adversarial methods,
            integer labels), or a data spec such as ``"digits"`` (its ``train`` split).
        method: ``"standard"``, ``"pgd-at"`` or ``"trades"`` (see the module docstring).
        epochs, lr, batch_size: passes over the data, learning rate, examples per step
            (the last batch of an epoch may be smaller).
        eps: L∞ radius of the inner maximization (required by ``"pgd-at"`` and ``"trades"``,
            unused by ``"standard"``).
        alpha, steps: step size (default 2.5·eps/steps) and number of its sign-gradient steps.
        beta: TRADES weight of the KL term.
        seed: seeds the batch order and the attacks' random starts.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (with ``momentum``); both take
            ``weight_decay`` (L2, coupled).
        lr_schedule: ``"constant"`` (default), ``"cosine"`` or ``"piecewise"`` (set per
            epoch; see :data:`LR_SCHEDULES`).

    Raises:
        ExperimentError: a bad argument, or inputs outside [0, 1] for an adversarial method.
    """
    cfg = _resolve(method, epochs, lr, batch_size, eps, alpha, steps, beta, seed, optimizer,
                   weight_decay, momentum, lr_schedule)
    x, y = as_pair(data, "train")
    device, dtype = model_device(model), model_dtype(model)
    if cfg.method != "standard":
        check_unit_box(x, f"method {cfg.method!r}")
    history = TrainingHistory(cfg)
    start = time.perf_counter()
    with seeded(cfg.seed, device):
        attack = _inner_attack(model, cfg)
        opt = _optimizer(model, cfg)
        order_rng = torch.Generator().manual_seed(cfg.seed)
        model.train()
        for epoch in range(cfg.epochs):
            for group in opt.param_groups:
                group["lr"] = epoch_lr(cfg, epoch)
            order = torch.randperm(len(y), generator=order_rng)
            total = 0.0
            for i in range(0, len(y), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                xb = x[idx].to(device=device, dtype=dtype)
                yb = y[idx].to(device)
                loss = _batch_loss(model, cfg, attack, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            history.losses.append(total / len(y))
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _inner_attack(model: nn.Module, cfg: TrainingConfig) -> Any:
    """The torchattacks object solving the inner maximization (``None`` for standard training)."""
    if cfg.method == "standard":
        return None
    ta = import_torchattacks()
    if cfg.method == "pgd-at":
        return ta.PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, random_start=True)
    return ta.TPGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps)


def _batch_loss(model: nn.Module, cfg: TrainingConfig, attack: Any, xb: Tensor, yb: Tensor) -> Tensor:
    if cfg.method == "standard":
        return F.cross_entropy(model(xb), yb)
    # torchattacks switches the model to eval mode for the attack and back to train mode.
    x_adv = attack(xb, yb).detach()
    if cfg.method == "pgd-at":
        return F.cross_entropy(model(x_adv), yb)
    logits = model(xb)
    kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    assert cfg.beta is not None  # set for "trades" (_resolve)
    return F.cross_entropy(logits, yb) + cfg.beta * kl
