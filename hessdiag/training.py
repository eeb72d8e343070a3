"""Seeded training of small classifiers (the bundled example and the experiments)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .losses import LossSpec, resolve_loss


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: LossSpec = "ce",
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Adam on mini-batches in a seeded order; returns the mean loss of each epoch.

    Deterministic for a given seed, torch version and thread count.
    """
    criterion = resolve_loss(loss)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            value = criterion.batch_mean(model(x[idx]), y[idx])
            value.backward()
            optimizer.step()
            total += float(value.detach()) * len(idx)
        history.append(total / len(y))
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    value = float((model(x).argmax(-1) == y).double().mean())
    model.train(was_training)
    return value
