"""Which L∞ radius ε is meaningful for the 8×8 digits? Data statistics and measured accuracies.

    python examples/digits_epsilon.py

Prints (1) the pixel levels and the L∞ distance from each image to the nearest image of
another class, (2) clean and PGD-20 test accuracy of the demo MLP (64-48-48-10, RCT-AF
n = 1, α = 14) after standard training and after PGD-AT and TRADES at ε = 1/8, at several
ε, and AutoAttack at ε = 1/16 and 1/8. Seeded; about two minutes on 2 CPU cores. The
numbers are quoted in docs/experiments.md.
"""

import time

import torch

from hessdiag.experiments import autoattack_accuracy, clean_accuracy, pgd_accuracy, train
from hessdiag.io.data import load_data
from hessdiag.models import mlp

EPSILONS = (0.0, 1 / 32, 1 / 16, 0.1, 1 / 8, 3 / 16, 0.25, 0.3)
TRAIN_EPS = 1 / 8


def data_statistics() -> None:
    x, y = load_data("digits", split="all")
    levels = torch.unique(x * 16)
    print(f"pixel values: {len(levels)} levels, all multiples of 1/16: "
          f"{bool(((x * 16) == (x * 16).round()).all())}")
    flat = x.flatten(1)
    dist = torch.cdist(flat, flat, p=float("inf"))
    dist[y[:, None] == y[None, :]] = float("inf")
    nearest = dist.min(1).values
    qs = torch.quantile(nearest, torch.tensor([0.01, 0.05, 0.5]))
    print(f"L∞ distance to the nearest image of another class: min {nearest.min():.4f}, "
          f"1 % {qs[0]:.4f}, 5 % {qs[1]:.4f}, median {qs[2]:.4f}")


def main() -> None:
    torch.set_num_threads(1)
    data_statistics()
    xt, yt = load_data("digits", split="test")
    rows = {}
    for method in ("standard", "pgd-at", "trades"):
        torch.manual_seed(0)
        model = mlp(hidden=(48, 48), activation="rct:n=1,alpha=14")
        start = time.perf_counter()
        extra = {} if method == "standard" else {"eps": TRAIN_EPS}
        train(model, "digits", method, epochs=20, seed=0, **extra)
        trained = time.perf_counter() - start
        pgd = [pgd_accuracy(model, xt, yt, eps) for eps in EPSILONS]
        auto = [autoattack_accuracy(model, xt, yt, eps) for eps in (1 / 16, 1 / 8)]
        rows[method] = (clean_accuracy(model, xt, yt), pgd, auto, trained)
    print("\n| training | clean | " + " | ".join(f"PGD-20 ε={e:.4g}" for e in EPSILONS)
          + " | AA ε=1/16 | AA ε=1/8 | train s |")
    print("|---" * (len(EPSILONS) + 5) + "|")
    for method, (clean, pgd, auto, seconds) in rows.items():
        label = method if method == "standard" else f"{method} (ε=1/8)"
        cells = [f"{clean:.3f}", *(f"{a:.3f}" for a in pgd), *(f"{a:.3f}" for a in auto), f"{seconds:.0f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
