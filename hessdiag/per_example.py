r"""Sums of squared per-example parameter gradients, from one batched backward pass.

For an affine operation out = op(x; W, b) applied to a batch, the gradient of example n's
scalar sₙ with respect to W is a function of that example's input xₙ and of gₙ = ∂sₙ/∂outₙ
alone (examples do not interact in eval mode). Given the batch's input x [n, …] and the
gradient g [n, …] arriving at the output in one backward pass, each rule returns

    Σₙ wₙ (∂sₙ/∂W)²   and   Σₙ wₙ (∂sₙ/∂b)²      (elementwise squares, shapes of W and b)

with per-example weights wₙ, without forming more than a chunk of per-example gradients
at a time (:func:`chunk_numbers`). These are the building blocks of the exact GGN
diagonal (one backward pass per output class) and of the ``curvprop`` residual.

Rules: ``F.linear`` (inputs [n, in] or [n, …, in], summing over the middle positions),
``F.conv1d``/``F.conv2d`` (any stride, padding, dilation, groups; via an unfolded input
that is computed once and reused across passes), ``F.batch_norm`` in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_NUMBERS = 1 << 24
"""At most about this many numbers of per-example gradients exist at once on an accelerator
(64 MB in float32): large chunks amortize the kernel launches."""

CPU_CHUNK_NUMBERS = 1 << 20
"""The same bound on the CPU (4 MB in float32). Chunks this small stay closer to the
caches and below the allocator's threshold for fresh memory-mapped pages, which a 64 MB
temporary pays for (page faults) on every backward pass. On ResNet-18 (widths 16 and 32,
64–128 CIFAR-sized inputs, 2 shared cores) one backward pass with per-example squares
took 1.2–1.35× less time than with 64 MB chunks in interleaved runs (one run under heavy
load showed no difference); the widest layers gain most."""


def chunk_numbers(device: torch.device) -> int:
    """Numbers of per-example gradients to form at once on ``device``."""
    return CPU_CHUNK_NUMBERS if device.type == "cpu" else CHUNK_NUMBERS


def _pair(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


def _call_arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str,
              default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...],
                 stride: tuple[int, ...]) -> tuple[int, ...] | None:
    """Explicit symmetric padding of a convolution, or ``None`` when it has none
    (``padding="same"`` with an even effective kernel pads asymmetrically)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * len(kernel)
        if any(s != 1 for s in stride):
            return None
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return _pair(padding, len(kernel))


def param_call_problem(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """Why a call of an affine operation has no per-example rule here, or ``None``."""
    if func in (F.conv1d, F.conv2d):
        weight = _call_arg(args, kwargs, 1, "weight", None)
        if not isinstance(weight, Tensor):
            return "a convolution without a weight tensor"
        dims = weight.dim() - 2
        kernel = tuple(weight.shape[2:])
        stride = _pair(_call_arg(args, kwargs, 3, "stride", 1), dims)
        dilation = _pair(_call_arg(args, kwargs, 5, "dilation", 1), dims)
        if conv_padding(_call_arg(args, kwargs, 4, "padding", 0), kernel, dilation, stride) is None:
            return "a convolution with asymmetric 'same' padding"
    return None


def _weighted_square_sum(per_example: Tensor, weights: Tensor, scratch: bool = False) -> Tensor:
    """Σₙ wₙ Gₙ² for per-example gradients ``per_example`` [n, *shape].

    ``scratch``: ``per_example`` is a temporary of the caller's and is squared in place
    (no second chunk-sized tensor).
    """
    squares = per_example.mul_(per_example) if scratch else per_example.pow(2)
    return torch.einsum("n,n...->...", weights, squares)


@dataclass
class AffineCall:
    """One recorded call of an affine operation whose parameters belong to θ.

    Attributes:
        func: ``F.linear``, ``F.conv1d``, ``F.conv2d`` or ``F.batch_norm``.
        inputs: the call's input x [n, …] (saved at the forward pass; must not change).
        args, kwargs: the call's other arguments (weights, stride, running statistics, …).
        names: which of ``"weight"``/``"bias"`` are parameters of θ, and their names.
    """

    func: Any
    inputs: Tensor
    args: tuple
    kwargs: dict
    names: dict[str, str]
    version: int = 0
    cache: dict[str, Tensor] = field(default_factory=dict)

    def square_sums(self, grad: Tensor, weights: Tensor) -> dict[str, Tensor]:
        """``{parameter name: Σₙ wₙ (per-example gradient)²}`` for the output gradient ``grad``."""
        if self.inputs._version != self.version:
            raise RuntimeError(
                "an input of a recorded layer was modified in place after the layer used it"
            )
        if self.func is F.linear:
            parts = self._linear(grad, weights)
        elif self.func is F.batch_norm:
            parts = self._batch_norm(grad, weights)
        else:
            parts = self._conv(grad, weights)
        return {self.names[k]: v for k, v in parts.items() if k in self.names}

    # -- rules -------------------------------------------------------------------------

    def _linear(self, grad: Tensor, weights: Tensor) -> dict[str, Tensor]:
        x, n = self.inputs, self.inputs.shape[0]
        out: dict[str, Tensor] = {}
        if x.dim() == 2:
            g2 = grad.pow(2) * weights[:, None]
            if "weight" in self.names:
                out["weight"] = g2.T @ x.pow(2)
            if "bias" in self.names:
                out["bias"] = g2.sum(0)
            return out
        x3 = x.reshape(n, -1, x.shape[-1])
        g3 = grad.reshape(n, -1, grad.shape[-1])
        if "weight" in self.names:
            acc = x.new_zeros(g3.shape[-1], x3.shape[-1])
            step = _step(n, acc.numel(), x.device)
            for s in range(0, n, step):
                per = torch.bmm(g3[s : s + step].transpose(1, 2), x3[s : s + step])
                acc += _weighted_square_sum(per, weights[s : s + step], scratch=True)
            out["weight"] = acc
        if "bias" in self.names:
            out["bias"] = _weighted_square_sum(g3.sum(1), weights)
        return out

    def _batch_norm(self, grad: Tensor, weights: Tensor) -> dict[str, Tensor]:
        x = self.inputs
        mean = _call_arg(self.args, self.kwargs, 1, "running_mean", None)
        var = _call_arg(self.args, self.kwargs, 2, "running_var", None)
        eps = float(_call_arg(self.args, self.kwargs, 7, "eps", 1e-5))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        spatial = tuple(range(2, x.dim()))
        out: dict[str, Tensor] = {}
        if "weight" in self.names:
            if "normalized" not in self.cache:  # every backward pass reuses it
                self.cache["normalized"] = ((x - mean.reshape(shape))
                                            / torch.sqrt(var.reshape(shape) + eps))
            normalized = self.cache["normalized"]
            per = (grad * normalized).sum(spatial) if spatial else grad * normalized
            out["weight"] = _weighted_square_sum(per, weights)
        if "bias" in self.names:
            per = grad.sum(spatial) if spatial else grad
            out["bias"] = _weighted_square_sum(per, weights)
        return out

    def _unfolded(self) -> tuple[Tensor, tuple[int, ...]]:
        """The input unfolded to [n, C_in·k, L] (cached: every backward pass reuses it)."""
        weight = _call_arg(self.args, self.kwargs, 1, "weight", None)
        kernel = tuple(weight.shape[2:])
        if "unfolded" not in self.cache:
            dims = len(kernel)
            stride = _pair(_call_arg(self.args, self.kwargs, 3, "stride", 1), dims)
            dilation = _pair(_call_arg(self.args, self.kwargs, 5, "dilation", 1), dims)
            padding = conv_padding(_call_arg(self.args, self.kwargs, 4, "padding", 0),
                                   kernel, dilation, stride)
            assert padding is not None  # asymmetric paddings are refused before (param_call_problem)
            x = self.inputs
            if dims == 1:  # a 1-d convolution is a 2-d one over a height of 1
                x, kernel2 = x.unsqueeze(2), (1, kernel[0])
                stride, dilation, padding = (1, *stride), (1, *dilation), (0, *padding)
            else:
                kernel2 = kernel
            self.cache["unfolded"] = F.unfold(x, kernel2, dilation=dilation, padding=padding,
                                              stride=stride)
        return self.cache["unfolded"], kernel

    def _conv(self, grad: Tensor, weights: Tensor) -> dict[str, Tensor]:
        n = grad.shape[0]
        out: dict[str, Tensor] = {}
        g = grad.reshape(n, grad.shape[1], -1)  # [n, C_out, L]
        if "weight" in self.names:
            unfolded, kernel = self._unfolded()
            groups = int(_call_arg(self.args, self.kwargs, 6, "groups", 1))
            c_out = g.shape[1]
            k = unfolded.shape[1] // groups
            gg = g.reshape(n, groups, c_out // groups, -1)
            uu = unfolded.reshape(n, groups, k, -1)
            per_size = c_out * k
            acc = grad.new_zeros(groups, c_out // groups, k)
            step = _step(n, per_size, grad.device)
            for s in range(0, n, step):
                per = torch.einsum("ngol,ngkl->ngok", gg[s : s + step], uu[s : s + step])
                acc += _weighted_square_sum(per, weights[s : s + step], scratch=True)
            out["weight"] = acc.reshape(c_out, k // math.prod(kernel), *kernel)
        if "bias" in self.names:
            out["bias"] = _weighted_square_sum(g.sum(2), weights)
        return out


PER_EXAMPLE_FUNCS = (F.linear, F.conv1d, F.conv2d)
"""Affine operations that :func:`per_example_affine` can run with one weight per example."""


def per_example_affine(func: Any, args: Sequence[Any], kwargs: dict[str, Any],
                       copies: dict[str, Tensor]) -> Tensor:
    """The call ``func(*args, **kwargs)`` with ``copies`` (``"weight"``/``"bias"`` →
    [n, *shape]) in place of its weight or bias, example n using row n.

    Each example's output then depends on its own copy only, so derivatives with respect to
    the copies are per-example derivatives. A convolution runs as one grouped convolution
    (the batch folded into the channels), a linear layer as an einsum.
    """
    x = args[0]
    n = int(x.shape[0])
    weight = _call_arg(args, kwargs, 1, "weight", None)
    bias = _call_arg(args, kwargs, 2, "bias", None)
    weights = copies.get("weight", weight.expand(n, *weight.shape))
    biases = copies.get("bias", None if bias is None else bias.expand(n, *bias.shape))
    if func is F.linear:
        out = torch.einsum("n...i,noi->n...o", x, weights)
        if biases is not None:
            out = out + biases.reshape(n, *([1] * (x.dim() - 2)), -1)
        return out
    groups = int(_call_arg(args, kwargs, 6, "groups", 1))
    out = func(x.reshape(1, -1, *x.shape[2:]), weights.reshape(-1, *weights.shape[2:]), None,
               _call_arg(args, kwargs, 3, "stride", 1), _call_arg(args, kwargs, 4, "padding", 0),
               _call_arg(args, kwargs, 5, "dilation", 1), groups * n)
    out = out.reshape(n, -1, *out.shape[2:])
    if biases is not None:
        out = out + biases.reshape(n, -1, *([1] * (out.dim() - 2)))
    return out


def _step(num: int, per_example: int, device: torch.device) -> int:
    """Examples per chunk so that a chunk holds at most :func:`chunk_numbers` numbers."""
    return max(1, min(num, chunk_numbers(device) // max(per_example, 1)))
