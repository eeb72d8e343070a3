"""Per-example square sums (hessdiag.per_example) through the curvature tape: the exact GGN
diagonal of a small conv/BatchNorm network against torch.func, whatever the chunking."""

import pytest
import torch
from torch import nn

from hessdiag import per_example
from hessdiag.curvature_tape import tape_ggn_diagonal
from hessdiag.objective import Objective


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5), nn.SiLU(), nn.Linear(5, 3),
    ).double()
    for module in net:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("chunk", [1 << 24, 64, 1])
def test_ggn_squares_match_torch_func_for_any_chunk(monkeypatch, chunk):
    """Chunks from all examples at once down to one example at a time give the same sums."""
    monkeypatch.setattr(per_example, "CPU_CHUNK_NUMBERS", chunk)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    objective = Objective(_net(), (x, y), "ce", batch_size=None)
    reference = objective.ggn_diagonal()
    taped = tape_ggn_diagonal(objective)
    for name, value in reference.items():
        scale = float(value.abs().max())
        assert float((taped[name] - value).abs().max()) <= 1e-12 * scale, name

