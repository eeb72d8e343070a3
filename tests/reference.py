"""Independent float64 references every estimator is tested against.

They share no code with hessdiag's objective: the full Hessian of the full-data mean
loss via ``torch.autograd.functional.hessian`` on a flat parameter vector, with torch's
own loss functions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def torch_loss(loss, out: Tensor, y: Tensor) -> Tensor:
    """The mean loss of all outputs ``out`` with torch's own functions: ``"ce"``, ``"mse"``
    (integer labels one-hot), or a torch loss module / callable applied as it is."""
    if callable(loss):
        return loss(out, y)
    if loss == "ce":
        return F.cross_entropy(out, y)
    target = y if y.is_floating_point() else F.one_hot(y, out.shape[-1])
    return F.mse_loss(out, target.double().reshape(out.shape))


def full_data_loss(model: nn.Module, loss, x: Tensor, y: Tensor):
    """θ_flat ↦ mean loss over all of (x, y), model in eval mode, float64."""
    net = copy.deepcopy(model).double().eval()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in net.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    x = x.double()

    def f(theta: Tensor) -> Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return torch_loss(loss, functional_call(net, params, (x,)), y)

    theta0 = torch.cat([p.detach().double().reshape(-1) for n, p in net.named_parameters()
                        if p.requires_grad])
    return f, theta0, names, shapes


def reference_hessian(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> Tensor:
    """Full P×P Hessian of the mean loss in float64."""
    f, theta0, _, _ = full_data_loss(model, loss, x, y)
    return torch.autograd.functional.hessian(f, theta0)


def reference_diagonal(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """diag of :func:`reference_hessian`, split per parameter tensor."""
    _, _, names, shapes = full_data_loss(model, loss, x, y)
    diag = reference_hessian(model, loss, x, y).diagonal()
    return {n: t.reshape(s) for n, t, s in zip(names, diag.split([s.numel() for s in shapes]), shapes)}


def flat(diag: dict[str, Tensor]) -> Tensor:
    return torch.cat([d.reshape(-1).double() for d in diag.values()])


def max_relative_error(estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """max |est − ref| / max |ref| over all entries (normwise, robust to tiny entries)."""
    a, b = flat(estimate), flat(reference)
    return float((a - b).abs().max() / b.abs().max())


def outputs_of_flat_parameters(model: nn.Module, x: Tensor, names, shapes):
    """θ_flat ↦ all N×C model outputs on x, float64, eval mode."""
    net = copy.deepcopy(model).double().eval()
    sizes = [s.numel() for s in shapes]
    xd = x.double()

    def outputs(theta: Tensor) -> Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return functional_call(net, params, (xd,))

    return outputs


def reference_ggn(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> Tensor:
    """Full P×P generalized Gauss–Newton matrix Jᵀ Λ J of the mean loss, float64.

    J: Jacobian of all N×C outputs w.r.t. θ; Λ: Hessian of the mean loss w.r.t. those
    outputs (block diagonal), both from ``torch.autograd.functional``.
    """
    _, theta0, names, shapes = full_data_loss(model, loss, x, y)
    outputs = outputs_of_flat_parameters(model, x, names, shapes)

    out = outputs(theta0).detach()

    def loss_of_output(o: Tensor) -> Tensor:
        return torch_loss(loss, o.reshape(out.shape), y)

    jac = torch.autograd.functional.jacobian(outputs, theta0).reshape(out.numel(), -1)
    lam = torch.autograd.functional.hessian(loss_of_output, out.reshape(-1))
    return jac.T @ lam @ jac


def split_like(flat_diag: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Split a flat diagonal into the model's trainable parameter shapes."""
    named = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    parts = flat_diag.split([s.numel() for _, s in named])
    return {n: t.reshape(s) for (n, s), t in zip(named, parts)}


def reference_residual(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> Tensor:
    """Full P×P residual part of the Hessian (docs/appendix.md), float64.

    The Hessian of θ ↦ Σ_{n,c} R_{nc} f_{nc}(θ) with R = ∂L/∂f (the gradient of the mean
    loss with respect to all N×C outputs) evaluated at θ₀ and then frozen; equivalently
    (1/N) Σₙ rₙᵀ fₙ(θ) with rₙ = ∇_f ℓₙ. Independent of :func:`reference_ggn`, so
    ``reference_ggn + reference_residual == reference_hessian`` is itself a check.
    """
    _, theta0, names, shapes = full_data_loss(model, loss, x, y)
    outputs = outputs_of_flat_parameters(model, x, names, shapes)

    out = outputs(theta0).detach().requires_grad_(True)
    value = torch_loss(loss, out, y)
    (residual_weights,) = torch.autograd.grad(value, out)
    return torch.autograd.functional.hessian(
        lambda theta: (residual_weights * outputs(theta)).sum(), theta0
    )


def reference_residual_diagonal(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """diag of :func:`reference_residual`, split per parameter tensor."""
    return split_like(reference_residual(model, loss, x, y).diagonal(), model)


def reference_ggn_diagonal(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """diag of :func:`reference_ggn`, split per parameter tensor."""
    return split_like(reference_ggn(model, loss, x, y).diagonal(), model)
