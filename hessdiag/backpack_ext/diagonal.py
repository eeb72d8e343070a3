"""Diagonals of the Hessian and of the GGN of an :class:`~hessdiag.objective.Objective` via BackPACK.

BackPACK works per batch on a loss *module*: for the batch-mean loss ℓ̄_b it stores
``diag ∇²ℓ̄_b`` (``DiagHessian``, field ``diag_h``) or ``diag J_bᵀ Λ_b J_b`` (``DiagGGNExact``,
field ``diag_ggn_exact``) on every parameter after one extended backward pass. We
accumulate ``Σ_b (n_b/N) · diag_b`` exactly like :class:`~hessdiag.objective.Objective`, so
the result is the diagonal of L(θ) = (1/N) Σₙ ℓₙ whatever the batch size. The losses match
docs/index.md, "What is measured": ``CrossEntropyLoss(reduction="mean")`` and ``MSELoss(reduction="mean")`` (BackPACK
divides its Hessian by N·C for the latter, i.e. mean over batch *and* outputs).

``extend()`` installs hooks that break ``torch.func`` and BackPACK looks modules up by exact
class, so we always extend a *deep copy* of the user's model, built in the objective's
dtype/device from ``Objective.params``/``constants``; the user's model is never touched.

Traversal. ``DiagHessian`` needs an ``nn.Sequential`` (nested ones are fine) of modules it
has extensions for; BatchNorm (no ``DiagHessian`` extension), residual additions, custom
modules and non-Sequential models are refused up front with :class:`BackpackUnsupportedError`
naming the module. ``DiagGGNExact`` can in addition go through BackPACK's graph converter
(``extend(model, use_converter=True)``: torch.fx tracing, residual additions become
``SumModule`` branches), which handles ResNets with BatchNorm in eval mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions.backprop_extension import BackpropExtension

from ..compat import twice_differentiable
from ..errors import first_line
from ..estimators.base import EstimatorError
from ..losses import Loss
from ..objective import Objective, ParamDict, default_dtype
from .extensions import SMOOTH_ACTIVATIONS, diag_ggn_exact, diag_hessian

Quantity = Literal["hessian", "ggn"]

_EXTENSIONS: dict[str, tuple[Callable[[], BackpropExtension], str, str]] = {
    # quantity: (extension factory, savefield, BackPACK's name for it)
    "hessian": (diag_hessian, "diag_h", "DiagHessian"),
    "ggn": (diag_ggn_exact, "diag_ggn_exact", "DiagGGNExact"),
}


class BackpackUnsupportedError(EstimatorError):
    """BackPACK cannot traverse the model for the requested quantity."""


def _suggestion(quantity: str) -> str:
    if quantity == "hessian":
        return "use --estimator hutchinson (or exact for small models)"
    return "the split falls back to torch.func GGN products"


def _module_extensions(extension: BackpropExtension) -> dict[type, object]:
    # BackPACK keeps its class -> extension map private (name-mangled); reading it lets us
    # refuse unsupported models before any work instead of deep inside a backward hook.
    return getattr(extension, "_BackpropExtension__module_extensions", {})


def check_traversable(model: nn.Module, quantity: Quantity = "hessian") -> None:
    """Raise :class:`BackpackUnsupportedError` unless BackPACK can traverse ``model`` as is.

    Accepted: ``nn.Sequential`` containers (nested included) whose non-container modules
    all have an extension for the quantity, looked up by exact class as BackPACK does.
    """
    factory, _, ext_name = _EXTENSIONS[quantity]
    known = _module_extensions(factory())
    if not isinstance(model, nn.Sequential):
        raise BackpackUnsupportedError(
            f"backpack: {ext_name} needs an nn.Sequential model, got {type(model).__name__}; "
            f"{_suggestion(quantity)}"
        )
    for name, module in model.named_modules():
        if type(module) is nn.Sequential:
            continue
        if type(module) not in known:
            what = "a custom container" if isinstance(module, nn.Sequential) else type(module).__name__
            raise BackpackUnsupportedError(
                f"backpack: {ext_name} cannot traverse module '{name}' ({what}); "
                f"{_suggestion(quantity)}"
            )


def _convert(net: nn.Module, original: nn.Module, quantity: str) -> nn.Module:
    """BackPACK's graph converter, with our activations kept as leaf modules.

    torch.fx traces through every module outside ``torch.nn``, which would dissolve RCT-AF
    into a bare autograd Function call that BackPACK cannot see; we mark our activations
    as leaves while converting. Any node left that is not a module call (BackPACK warns
    "may break second-order extensions") would be silently skipped by the hooks, so it is
    an error here.
    """
    from unittest import mock

    from backpack.custom_module import graph_utils

    leaf = graph_utils.BackpackTracer.is_leaf_module

    def is_leaf(tracer: object, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, SMOOTH_ACTIVATIONS) or leaf(tracer, m, qualified_name)

    try:
        with mock.patch.object(graph_utils.BackpackTracer, "is_leaf_module", is_leaf), \
                warnings.catch_warnings():
            warnings.filterwarnings("error", message="Encountered node that may break")
            return extend(net, use_converter=True)
    except Exception as err:  # noqa: BLE001 - torch.fx raises anything on untraceable code
        first = first_line(err, 160)
        raise BackpackUnsupportedError(
            f"backpack: the graph converter failed on {type(original).__name__} "
            f"({type(err).__name__}: {first}); {_suggestion(quantity)}"
        ) from None


def _loss_module(loss: Loss, quantity: Quantity) -> nn.Module:
    """The extended torch loss module for ``loss``; BackPACK knows plain ce and mse only."""
    module = loss.backpack_module()
    if module is None:
        raise BackpackUnsupportedError(
            f"backpack: BackPACK has no extension for the {loss.describe()} loss (only plain ce and mse); "
            f"{_suggestion(quantity)}")
    return extend(module)


def backpack_diagonal(
    objective: Objective, quantity: Quantity = "hessian", *, use_converter: bool = False
) -> ParamDict:
    """diag ∇²L (``"hessian"``) or diag of the GGN (``"ggn"``) via BackPACK, ``{name: Tensor}``.

    One extended backward pass per batch. With ``use_converter`` the copy goes through
    BackPACK's graph converter first (``"ggn"`` only: BackPACK has no ``DiagHessian`` for
    the branching modules the converter produces).

    Raises:
        BackpackUnsupportedError: the model cannot be traversed (message names the module).
    """
    factory, savefield, ext_name = _EXTENSIONS[quantity]
    lossfunc = _loss_module(objective.loss, quantity)  # refuse before any work
    net = objective.model_copy()  # never extend the user's model
    names = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    if use_converter:
        if quantity == "hessian":
            raise BackpackUnsupportedError("backpack: the graph converter is only used for the GGN")
        net = _convert(net, objective.model, quantity)
    else:
        check_traversable(net, quantity)
        net = extend(net)
    params = [p for p in net.parameters() if id(p) in names]
    if len(params) != len(names):  # the converter must keep the very parameter objects
        raise BackpackUnsupportedError(
            f"backpack: the graph converter changed the parameters of {type(objective.model).__name__}; "
            f"{_suggestion(quantity)}"
        )
    total = {n: torch.zeros_like(objective.params[n]) for n in names.values()}
    for x, y, n_b in objective.batches():
        with torch.enable_grad(), twice_differentiable():  # measure() may run under no_grad()
            output = net(x)
        if output.dim() != 2:
            raise BackpackUnsupportedError(
                f"backpack: BackPACK's losses need [batch, classes] outputs, got shape "
                f"{tuple(output.shape)}; {_suggestion(quantity)}")
        with torch.enable_grad():
            loss = lossfunc(output, objective.loss.target(output, y))
        try:
            with backpack(factory()), default_dtype(objective.dtype), torch.enable_grad(), \
                    warnings.catch_warnings():
                # The first layer's input needs no gradient; BackPACK's hooks expect that.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        except (NotImplementedError, RuntimeError) as err:
            first = first_line(err, 160)
            raise BackpackUnsupportedError(f"backpack: {ext_name} failed: {first}; "
                                           f"{_suggestion(quantity)}") from None
        for p in params:
            value = getattr(p, savefield, None)
            if value is None:
                raise BackpackUnsupportedError(
                    f"backpack: {ext_name} computed nothing for parameter '{names[id(p)]}'; "
                    f"{_suggestion(quantity)}"
                )
            total[names[id(p)]].add_(value.detach(), alpha=n_b)
            delattr(p, savefield)
            p.grad = None
    objective.mean_over_examples(total)
    return {n: total[n] for n in objective.params if n in total}
