"""The digits reference model shared by the benchmarks, and its exact curvature (cached).

A 64-48-48-10 tanh MLP trained (seeded Adam, :func:`hessdiag.training.train_classifier`)
on all 1797 scikit-learn digits, in float64; P = 5962. Its full Hessian H and Gauss–Newton
matrix G (5962² float64 = 284 MB each) are formed once from HVPs / GGN-VPs against basis
blocks and cached under ``benchmarks/.cache`` (about a minute on 2 cores the first time).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hessdiag.io import load_data
from hessdiag.models import mlp
from hessdiag.objective import Objective
from hessdiag.training import train_classifier

CACHE = Path(__file__).resolve().parent / ".cache"


def digits_data() -> tuple[Tensor, Tensor]:
    """All 1797 digits examples, (N, 1, 8, 8) float64 in [0, 1], integer labels."""
    x, y = load_data("digits", "all")
    return x.double(), y


def trained_digits_mlp(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """(model, x, y): the trained float64 tanh MLP and all digits data."""
    x, y = digits_data()
    torch.manual_seed(seed)
    model = mlp(64, (48, 48), 10, "tanh").double()
    train_classifier(model, x, y, epochs=30, seed=seed)
    return model, x, y


def _dense(objective: Objective, method: str, block: int = 256) -> Tensor:
    """The P×P matrix of ``objective.<method>`` (hvp or ggn_vp) from basis blocks."""
    num = objective.num_params
    out = torch.empty(num, num, dtype=objective.dtype)
    for start in range(0, num, block):
        stop = min(start + block, num)
        basis = torch.zeros(stop - start, num, dtype=objective.dtype)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        product = getattr(objective, method)(objective.unflatten(basis), chunk_size=block)
        out[start:stop] = objective.flatten(product)
    return (out + out.T) / 2  # symmetric up to rounding; symmetrize exactly


def exact_curvature(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """(model, x, y, H, G) for the trained digits MLP; H and G cached on disk."""
    model, x, y = trained_digits_mlp(seed)
    path = CACHE / f"digits_mlp_tanh_seed{seed}_torch{torch.__version__}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return model, x, y, saved["H"], saved["G"]
    objective = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=None)
    hessian, ggn = _dense(objective, "hvp"), _dense(objective, "ggn_vp")
    CACHE.mkdir(exist_ok=True)
    torch.save({"H": hessian, "G": ggn}, path)
    return model, x, y, hessian, ggn
