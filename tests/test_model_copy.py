"""Objective.model_copy: the stateful copy handed to BackPACK and PyHessian."""

import torch
from torch import nn

from hessdiag.objective import Objective, default_dtype


def test_copy_is_independent_in_compute_dtype_and_eval_mode(tiny_classification):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model[3].bias.requires_grad_(False)
    model.train()
    objective = Objective(model, tiny_classification, "ce", dtype=torch.float64)
    copy = objective.model_copy()
    assert copy is not model and not copy.training and model.training
    for name, p in copy.named_parameters():
        assert p.dtype == torch.float64 and p.grad is None
        assert p.requires_grad == (name in objective.params)
        assert torch.equal(p.detach(), model.get_parameter(name).detach().double())
    assert torch.equal(copy[1].running_var, model[1].running_var.double())
    with torch.no_grad():
        copy[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight.float(), model[0].weight)


def test_default_dtype_is_restored():
    with default_dtype(torch.float64):
        assert torch.get_default_dtype() == torch.float64
    assert torch.get_default_dtype() == torch.float32
    with default_dtype(torch.int64):  # non-floating: left alone
        assert torch.get_default_dtype() == torch.float32
