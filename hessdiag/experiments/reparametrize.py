r"""Coordinates matter: the same network with RCT-AF at any α, by rescaling its parameters.

RCT-AF has the scale structure f_n(x; α) = f_n(αx; 1)/α (:mod:`hessdiag.activations`), or
more generally f_n(x; α) = (β/α) · f_n((α/β)x; β). So an activation of slope parameter α can be traded
for one of parameter β if its input is multiplied by c = α/β and its output divided by c;
both factors can be absorbed into the neighbouring affine layers. :func:`reparametrize`
does this for a whole network and returns a copy with every RCT-AF at ``alpha`` (1 by
default) that computes the same function of its input, for every input. ψ_max = c_n·α
changes accordingly, while the network does not: a claim about ψ_max is a claim about a
parametrization unless it survives this map (see ``docs/experiments.md``).

**Scale bookkeeping.** Every tensor t of the forward pass gets a factor s(t) > 0 such
that the new network computes s(t)·t wherever the old one computed t. Constraints:

- the input and the output (logits) keep their scale: s = 1;
- an RCT-AF of parameter α mapped to β: s(input) = s(output) = α/β, because
  f(cz; β) = c·f(z; α) for c = α/β;
- a BatchNorm input keeps its scale, s = 1 (its ε inside √(var + ε) is not scale-free), and
  its output may take any factor s_out: weight and bias are multiplied by s_out (running
  statistics unchanged);
- a Linear/Conv layer maps s_in to any s_out: weight × s_out/s_in, bias × s_out;
- sums (residual connections) need equal factors on all summands and the sum; reshapes,
  average and max pooling, dropout, ReLU/LeakyReLU and multiplication by a constant number
  pass the factor through (they are positively homogeneous of degree 1).

The constraints are equalities between tensors plus pinned values, solved by union–find
on the traced graph (``torch.fx``); an unconstrained group of tensors keeps factor 1.
For an MLP or CNN this gives: the layer before an activation gets weight and bias × c, the
layer after it weight × 1/c (a hidden layer between two activations: weight unchanged,
bias × c). In ``Linear/Conv → BN → φ`` the BN weight and bias take the factor c and the
convolution before it is unchanged. In ``resnet18_cifar`` every block input is an
activation output, so the whole residual stream carries factor c: both summands of each
residual sum (the BN after ``conv2``, and the identity or 1×1-conv–BN shortcut) end at c,
the convolutions reading the stream get × 1/c, and the final Linear weight × 1/c. In
``wide_resnet`` (pre-activation) the stream feeds BatchNorm, so it keeps factor 1, and the
convolutions after each activation get × 1/c.

Refused, with an error naming the operation: anything untraceable by ``torch.fx``, modules
or functions outside the list above (other activations, LayerNorm, attention, ...),
parameters used outside a module or by two calls, and constraint conflicts (e.g. an
activation output fed straight into a BatchNorm, or two activations of different α summed).
The zoo's ``mlp``, ``cnn``, ``resnet18_cifar`` and ``wide_resnet`` are supported.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import RCTAF
from ._common import ExperimentError

__all__ = ["ReparametrizationError", "parameter_scales", "reparametrize"]


class ReparametrizationError(ExperimentError):
    """The network's structure cannot be rescaled to other RCT-AF parameters exactly."""


_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Positively homogeneous of degree 1 (g(c·t) = c·g(t) for c > 0), without parameters.
_PASS_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ReLU, nn.LeakyReLU,
)
_PASS_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    torch.mean, torch.relu, F.relu, F.leaky_relu, F.dropout, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, operator.getitem,
}
_PASS_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "mean", "relu", "clone"}
_SUM_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub, operator.iadd, operator.isub}
_SUM_METHODS = {"add", "sub", "__add__", "__sub__"}
_SCALAR_MUL = {operator.mul, operator.truediv, torch.mul}
_META_METHODS = {"size", "dim"}


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps RCT-AF modules as leaves (their α is what gets changed)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, RCTAF) or super().is_leaf_module(m, qualname)


class _Scales:
    """Union–find over graph nodes with at most one pinned factor per group (and why)."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.pinned: dict[fx.Node, tuple[float, str]] = {}

    def find(self, node: fx.Node) -> fx.Node:
        self.parent.setdefault(node, node)
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def _conflict(self, a: tuple[float, str], b: tuple[float, str]) -> ReparametrizationError:
        return ReparametrizationError(
            f"cannot reparametrize: {a[1]} needs the factor {a[0]:g} but {b[1]} needs {b[0]:g} "
            "on the same tensor")

    def pin(self, node: fx.Node, value: float, reason: str) -> None:
        root = self.find(node)
        old = self.pinned.get(root)
        if old is None:
            self.pinned[root] = (value, reason)
        elif not math.isclose(old[0], value, rel_tol=1e-12):
            raise self._conflict(old, (value, reason))

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        pa, pb = self.pinned.get(ra), self.pinned.get(rb)
        if pa is not None and pb is not None and not math.isclose(pa[0], pb[0], rel_tol=1e-12):
            raise self._conflict(pa, pb)
        self.parent[rb] = ra
        if pa is None and pb is not None:
            self.pinned[ra] = pb
        self.pinned.pop(rb, None)

    def value(self, node: fx.Node) -> float:
        return self.pinned.get(self.find(node), (1.0, ""))[0]


@dataclass(frozen=True)
class _Plan:
    """Per-module factors: affine layers (s_in, s_out), norms s_out, activations to retarget."""

    affine: dict[str, tuple[float, float]]
    norms: dict[str, float]
    activations: tuple[str, ...]


def _check_alpha(alpha: Any) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ReparametrizationError(f"alpha must be a finite number > 0, got {alpha!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ReparametrizationError(f"alpha must be a finite number > 0, got {alpha!r}")
    return value


def _node_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _plan(model: nn.Module, alpha: float) -> _Plan:
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises TraceError, TypeError, ... alike
        raise ReparametrizationError(
            f"cannot reparametrize {type(model).__name__}: torch.fx cannot trace it ({err})") from None
    scales, meta = _Scales(), set()
    affine_nodes: dict[str, tuple[fx.Node, fx.Node]] = {}
    norm_nodes: dict[str, fx.Node] = {}
    activations: list[str] = []
    calls: dict[str, int] = {}

    def refuse(what: str) -> ReparametrizationError:
        return ReparametrizationError(
            f"cannot reparametrize {type(model).__name__}: {what} is not supported (supported: "
            "Linear, Conv, BatchNorm, RCT-AF, residual sums, reshapes, pooling, dropout, ReLU)")

    for node in graph.nodes:
        inputs = _node_args(node)
        tensor_inputs = [a for a in inputs if a not in meta]
        if node.op == "placeholder":
            scales.pin(node, 1.0, "the model's input")
        elif node.op == "output":
            for arg in tensor_inputs:
                scales.pin(arg, 1.0, "the model's output")
        elif node.op == "get_attr":
            raise refuse(f"using the tensor attribute {node.target!r} directly")
        elif node.op == "call_module":
            name = str(node.target)
            module = model.get_submodule(name)
            calls[name] = calls.get(name, 0) + 1
            has_params = any(True for _ in module.parameters(recurse=False))
            if has_params and calls[name] > 1:
                raise refuse(f"calling the module {name!r}, which has parameters, twice")
            if len(tensor_inputs) != 1:
                raise refuse(f"module {name!r} with {len(tensor_inputs)} tensor inputs")
            (src,) = tensor_inputs
            if isinstance(module, RCTAF):
                c = module.alpha / alpha
                why = f"RCT-AF {name!r} (alpha={module.alpha:g})"
                scales.pin(src, c, f"the input of {why}")
                scales.pin(node, c, f"the output of {why}")
                activations.append(name)
            elif isinstance(module, _AFFINE):
                affine_nodes[name] = (src, node)
            elif isinstance(module, _NORMS):
                scales.pin(src, 1.0, f"the input of BatchNorm {name!r}")
                if module.affine:
                    norm_nodes[name] = node
                else:
                    scales.pin(node, 1.0, f"the output of BatchNorm {name!r} (affine=False)")
            elif isinstance(module, _PASS_MODULES):
                scales.union(src, node)
            else:
                raise refuse(f"module {name!r} ({type(module).__name__})")
        elif node.op in ("call_function", "call_method"):
            target = node.target
            label = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
            if (node.op == "call_method" and target in _META_METHODS) or (
                    node.op == "call_function" and target is getattr) or (inputs and not tensor_inputs):
                meta.add(node)  # shapes and sizes, not activations
            elif (node.op == "call_function" and target in _SUM_FUNCTIONS) or (
                    node.op == "call_method" and target in _SUM_METHODS):
                constants = [a for a in node.args if not isinstance(a, fx.Node)]
                if constants or len(tensor_inputs) < 2 or node.kwargs:
                    raise refuse(f"{label} with a constant or keyword operand")
                for arg in tensor_inputs:
                    scales.union(arg, node)
            elif node.op == "call_function" and target in _SCALAR_MUL:
                divisor = target is operator.truediv and node.args[0] is not tensor_inputs[0]
                if len(tensor_inputs) != 1 or divisor:
                    raise refuse(f"{label} of two tensors or by a tensor")
                scales.union(tensor_inputs[0], node)
            elif (node.op == "call_function" and target in _PASS_FUNCTIONS) or (
                    node.op == "call_method" and target in _PASS_METHODS):
                if len(tensor_inputs) != 1:
                    raise refuse(f"{label} of {len(tensor_inputs)} tensors")
                scales.union(tensor_inputs[0], node)
            else:
                raise refuse(f"the operation {label!r}")
    params_seen: dict[int, str] = {}
    for name in [*affine_nodes, *norm_nodes]:
        for p in model.get_submodule(name).parameters(recurse=False):
            if id(p) in params_seen:
                raise refuse(f"a parameter shared by {params_seen[id(p)]!r} and {name!r}")
            params_seen[id(p)] = name
    return _Plan(
        affine={n: (scales.value(a), scales.value(b)) for n, (a, b) in affine_nodes.items()},
        norms={n: scales.value(node) for n, node in norm_nodes.items()},
        activations=tuple(dict.fromkeys(activations)),
    )


def parameter_scales(model: nn.Module, alpha: float = 1.0) -> dict[str, float]:
    """The factor by which :func:`reparametrize` multiplies each parameter, by name.

    Parameters it does not touch (factor 1, or modules the forward pass never calls) are
    listed with 1.0. Raises :class:`ReparametrizationError` for unsupported structures.
    """
    return _factors(model, _plan(model, _check_alpha(alpha)))


def _factors(model: nn.Module, plan: _Plan) -> dict[str, float]:
    factors = {name: 1.0 for name, _ in model.named_parameters()}
    for module_name, (s_in, s_out) in plan.affine.items():
        prefix = f"{module_name}." if module_name else ""
        factors[prefix + "weight"] = s_out / s_in
        if model.get_submodule(module_name).bias is not None:
            factors[prefix + "bias"] = s_out
    for module_name, s_out in plan.norms.items():
        prefix = f"{module_name}." if module_name else ""
        factors[prefix + "weight"] = s_out
        factors[prefix + "bias"] = s_out
    return factors


def reparametrize(model: nn.Module, alpha: float = 1.0) -> nn.Module:
    """A copy of ``model`` with every RCT-AF at ``alpha`` and rescaled parameters, same outputs.

    The copy computes the same logits as ``model`` for every input, in eval and in train
    mode (BatchNorm inputs keep their scale, so batch statistics agree too), up to float
    rounding of the rescaled parameters; ``model`` is not modified. Each parameter is
    multiplied by a positive constant (:func:`parameter_scales` lists them), so the
    identity holds for every value of the weights, not only the trained ones; the loss as a
    function of the new parameters is L(K⁻¹θ') with K diagonal. BatchNorm running
    statistics are unchanged. The RCT-AF modules keep their order n; only α changes (a
    native checkpoint of the copy needs the activation spec ``rct:n=N,alpha=ALPHA``).

    Raises:
        ReparametrizationError: the structure is not supported (the module docstring lists
            what is) or the constraints conflict; the message names the operation.
    """
    target = _check_alpha(alpha)
    new = copy.deepcopy(model)
    plan = _plan(new, target)
    with torch.no_grad():
        for name, factor in _factors(new, plan).items():
            if factor != 1.0:
                new.get_parameter(name).mul_(factor)
    for name in plan.activations:
        activation = new.get_submodule(name)
        assert isinstance(activation, RCTAF)  # _plan lists RCT-AF modules only
        activation.alpha = target
    return new
