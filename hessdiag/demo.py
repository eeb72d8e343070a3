"""The bundled example: an RCT-AF MLP trained on the digits data.

``examples/train_digits.py`` writes the checkpoint committed under ``hessdiag/data/``,
which ships inside the package (package data), so ``hessdiag demo`` measures it from an
installed wheel as well as from a source checkout. The recipe lives here so the test suite
can regenerate the checkpoint and compare.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io.checkpoints import build_model
from .io.data import digits
from .training import accuracy, train_classifier

DEMO_FACTORY = "hessdiag.models:mlp"
DEMO_KWARGS: dict[str, Any] = {
    "in_features": 64,
    "hidden": [48, 48],
    "num_classes": 10,
    "activation": "rct:n=1,alpha=14",  # ψ_max = 7, inside the paper's robust band
}
DEMO_TRAINING: dict[str, Any] = {"epochs": 20, "batch_size": 64, "lr": 3e-3, "seed": 0}
DEMO_CHECKPOINT = "digits_mlp_rct1_alpha14.pt"


def train_demo_model() -> tuple[nn.Module, dict[str, Any]]:
    """Train the demo network (seeded, a few seconds on 2 cores); returns (model, meta).

    Runs single-threaded so the float32 reductions, hence the weights, are bitwise
    reproducible on a given torch build. The thread count and the global (CPU) RNG state
    are restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(DEMO_TRAINING["seed"])
            model = build_model(DEMO_FACTORY, DEMO_KWARGS)
        x, y = digits("train")
        history = train_classifier(model, x, y, loss="ce", **DEMO_TRAINING)
    finally:
        torch.set_num_threads(threads)
    xt, yt = digits("test")
    meta = {
        "data": "digits",
        "loss": "ce",
        "training": dict(DEMO_TRAINING),
        "final_train_loss": history[-1],
        "train_accuracy": accuracy(model, x, y),
        "test_accuracy": accuracy(model, xt, yt),
        "torch_version": str(torch.__version__),
    }
    return model, meta


def bundled_checkpoint() -> Path:
    """The demo checkpoint shipped inside the package: ``hessdiag/data/DEMO_CHECKPOINT``.

    Located through :mod:`importlib.resources`, so it is found wherever the package is
    installed (a wheel, an editable install, a source checkout on ``PYTHONPATH``), whatever
    the working directory.
    """
    return Path(str(resources.files("hessdiag") / "data" / DEMO_CHECKPOINT))
