r"""Backward passes that yield per-example curvature: the exact GGN diagonal and the
activation residual of the Hessian diagonal, for networks of known structure.

A :class:`TapedBatch` runs the model once on a batch under a recording mode
(:class:`torch.overrides.TorchFunctionMode`, so functional calls are seen as well as
modules) that

- attaches to every affine call with parameters in θ (Linear, Conv, BatchNorm in eval
  mode; :mod:`hessdiag.per_example`) a gradient hook that adds Σₙ wₙ (∂sₙ/∂θ)² to an
  accumulator for whatever backward pass runs;
- runs every smooth elementwise activation aᵤ = φ(zᵤ) through a site whose backward can
  record the incoming gradient ∂/∂aᵤ and add an injected vector at the pre-activation zᵤ;
- runs piecewise-linear activations out of place (in-place ones would overwrite
  pre-activations that hooks still need).

Parameters are not leaves of the graph: only a zero scalar added to the input is, so a
backward pass computes input-gradients through the network and the hooks compute the
per-example parameter quantities; no batch-summed weight gradient is ever formed.

With rₙ = ∇_f ℓₙ and Qₙ Qₙᵀ = ∇²_f ℓₙ (:meth:`hessdiag.losses.Loss.hessian_factors`):

- **GGN diagonal**: backward of Q[:, :, ρ] from the outputs, for each class ρ, gives
  Σₙ (Jₙᵀ qₙ,ρ)²; summed over ρ, Σₙ diag(Jₙᵀ Λₙ Jₙ) (C passes, exact). With Rademacher
  ξ ∈ R^C instead, one pass of Qξ gives an unbiased estimate.
- **Residual**: one backward of rₙ gives ∂ℓₙ/∂aᵤ at every site, so cₙ,ᵤ = (∂ℓₙ/∂aᵤ)
  φ''(zᵤ). Injecting ξ ⊙ √c₊ (ξ Rademacher per unit) at every zᵤ at once and backpropagating
  gives per example vₙ = Σᵤ ξᵤ √c₊,ᵤ ∂zᵤ/∂θ, whose square has expectation
  Σᵤ c₊,ᵤ (∂zᵤ/∂θ)² (cross terms vanish); a second pass does c₋ = max(−c, 0), and the
  difference estimates Σᵤ cₙ,ᵤ (∂zᵤ/∂θ)² without bias (docs/math.md, "curvprop").
- **Per-example products**: for the parameters of the first linear and convolution layers,
  :meth:`TapedBatch.residual_products` gives Rₙ zₙ per example for per-example tangents
  zₙ, by one forward-over-reverse pass with a copy of those parameters per example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jvp
from torch.overrides import TorchFunctionMode

from .activations import ElementwiseDerivatives
from .objective import Objective, evaluation_mode
from .per_example import PER_EXAMPLE_FUNCS, AffineCall, param_call_problem, per_example_affine
from .structure import PARAM_OPS, elementwise_activation

ParamDict = dict[str, Tensor]


INPLACE_POSITION: dict[Any, int] = {
    F.relu: 1, F.relu6: 1, F.hardsigmoid: 1, F.hardswish: 1, F.silu: 1, F.mish: 1, F.selu: 1,
    F.leaky_relu: 2, F.elu: 2, F.hardtanh: 3,
}
"""Functional activations with an ``inplace`` flag, and its positional index."""


class TapeError(RuntimeError):
    """The model did something the per-example rules cannot follow (an internal limit)."""


class _Recording:
    """Whether the current backward pass records ∂/∂a at the sites (the loss-gradient pass).

    Sites hold this flag rather than their tape: the tape lists its sites, so a reference
    back would make a cycle, which only the cyclic garbage collector frees. Each batch's
    sites and cached unfolded inputs (several times the activations' memory) would then
    outlive it until a collection happens to run; over a few batches of a ResNet that grew
    the memory by gigabytes.
    """

    active = False


class ActivationSite:
    """One call aᵤ = φ(zᵤ) of a smooth elementwise activation, batch-first [n, …]."""

    def __init__(self, z: Tensor, derivatives: ElementwiseDerivatives, recording: _Recording) -> None:
        self.recording = recording
        self.z = z.detach()
        self.version = z._version
        self.slope = derivatives.dphi(self.z)
        self.curvature = derivatives.d2phi(self.z)
        self.grad: Tensor | None = None  # ∂(Σₙ ℓₙ)/∂aᵤ from the loss-gradient pass
        self.injection: Tensor | None = None  # added to ∂/∂zᵤ in the current pass

    def coefficient(self) -> Tensor:
        """cᵤ = (∂ℓₙ/∂aᵤ) φ''(zᵤ), per example and unit (after :meth:`TapedBatch.loss_gradient`)."""
        if self.grad is None:
            raise TapeError("the loss-gradient pass has not run")
        return self.grad * self.curvature


class _Site(torch.autograd.Function):
    """a = φ(z) with a backward that records ∂/∂a and adds the site's injection at z."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, phi: Callable[[Tensor], Tensor],
                site: ActivationSite) -> Tensor:
        ctx.site = site
        return phi(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        site: ActivationSite = ctx.site
        if site.recording.active:
            site.grad = grad.detach().clone()
        out = grad * site.slope
        if site.injection is not None:
            out = out + site.injection
        return out, None, None


class _Tape(TorchFunctionMode):
    """Records affine calls and activation sites of one forward pass (module docstring)."""

    def __init__(self, params: dict[int, str], batch: int, sites: bool) -> None:
        super().__init__()
        self.params = params
        self.batch = batch
        self.with_sites = sites
        self.calls: list[AffineCall] = []
        self.sites: list[ActivationSite] = []
        self.recording = _Recording()
        self.weights: Tensor | None = None  # per-example weights of the squares
        self.sums: ParamDict = {}

    def _hook(self, call: AffineCall) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self.weights is None:
                return
            for name, value in call.square_sums(grad, self.weights).items():
                self.sums[name] = self.sums[name] + value if name in self.sums else value

        return hook

    def __torch_function__(self, func: Callable, types: Iterable, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in PARAM_OPS:
            names = {}
            for key, index in (("weight", 1), ("bias", 2)) if func is not F.batch_norm else (
                    ("weight", 3), ("bias", 4)):
                value = kwargs.get(key, args[index] if len(args) > index else None)
                if isinstance(value, Tensor) and id(value) in self.params:
                    names[key] = self.params[id(value)]
            if names:
                problem = param_call_problem(func, args, kwargs)
                x = args[0]
                if problem is not None:
                    raise TapeError(problem)
                if x.shape[0] != self.batch:
                    raise TapeError("a layer's input is not batch-first")
                out = func(*args, **kwargs)
                if not out.requires_grad:
                    raise TapeError("a layer with parameters does not depend on the input")
                # The call keeps its input detached only: the input's graph leads back to the
                # earlier layers' outputs, whose gradient hooks hold this tape, and such a cycle
                # through autograd nodes is never collected (a leak of the whole graph per batch).
                call = AffineCall(func, x.detach(), (x.detach(), *args[1:]), kwargs, names, x._version)
                self.calls.append(call)
                out.register_hook(self._hook(call))
                return out
        if self.with_sites:
            derivatives = elementwise_activation(func, args, kwargs)
            if derivatives is not None and args[0].requires_grad:
                site = ActivationSite(args[0], derivatives, self.recording)
                self.sites.append(site)
                return _Site.apply(args[0], derivatives.phi, site)
        if func in INPLACE_POSITION:  # run out of place: hooks still need the input
            args = args[: INPLACE_POSITION[func]]
            kwargs["inplace"] = False
        return func(*args, **kwargs)


class _PerExampleCopies(TorchFunctionMode):
    """Runs the affine calls with parameters in ``calls`` (tensor id → name) with one copy
    per example (``copies``, name → [n, *shape]; :func:`per_example_affine`)."""

    def __init__(self, calls: dict[int, str], copies: ParamDict) -> None:
        super().__init__()
        self.calls = calls
        self.copies = copies

    def __torch_function__(self, func: Callable, types: Iterable, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in PER_EXAMPLE_FUNCS:
            own = {}
            for key, index in (("weight", 1), ("bias", 2)):
                value = kwargs.get(key, args[index] if len(args) > index else None)
                if isinstance(value, Tensor) and id(value) in self.calls:
                    own[key] = self.copies[self.calls[id(value)]]
            if own:
                return per_example_affine(func, args, kwargs, own)
        return func(*args, **kwargs)


class TapedBatch:
    """One batch of an objective, run forward under the tape, ready for backward passes.

    Args:
        objective: the measured objective (its θ, constants, loss, dtype and device).
        x, y: the batch on the objective's device and dtype, examples first.
        sites: whether to make activation sites (needed for the residual only).
    """

    def __init__(self, objective: Objective, x: Tensor, y: Tensor, *, sites: bool = True) -> None:
        self.objective = objective
        self.num = int(x.shape[0])
        params = objective.params
        self._tape = _Tape({id(t): n for n, t in params.items()}, self.num, sites)
        self._anchor = torch.zeros((), dtype=objective.dtype, device=objective.device,
                                   requires_grad=True)
        self.inputs = x
        with evaluation_mode(objective.model), torch.enable_grad():
            start = x + self._anchor  # outside the tape: not a layer of the model
            with self._tape:
                output = objective.model_forward(params, start)
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != self.num:
            raise TapeError("the model's output is not a [batch, outputs] tensor")
        for site in self._tape.sites:
            if site.version != site.z._version:
                raise TapeError("a pre-activation was modified in place")
        for call in self._tape.calls:
            if call.version != call.inputs._version:
                raise TapeError("an input of a layer was modified in place after the layer used it")
        self.output = output
        self.target = y
        detached = output.detach()
        with torch.enable_grad():
            leaf = detached.clone().requires_grad_(True)
            total = objective.loss.batch_mean(leaf, y) * self.num
            self.loss_grad = torch.autograd.grad(total, leaf)[0]  # rₙ = ∇_f ℓₙ, [n, C]
        self.factor = objective.loss.hessian_factors(detached, y)  # Qₙ, [n, C, R]

    @property
    def sites(self) -> list[ActivationSite]:
        return self._tape.sites

    @property
    def num_classes(self) -> int:
        return int(self.output.shape[1])

    def _backward(self, output_grad: Tensor | None, weights: Tensor | None) -> ParamDict:
        tape = self._tape
        tape.weights, tape.sums = weights, {}
        grad = torch.zeros_like(self.output) if output_grad is None else output_grad
        torch.autograd.grad(self.output, self._anchor, grad, retain_graph=True,
                            allow_unused=True)
        sums, tape.sums, tape.weights = tape.sums, {}, None
        return sums

    def loss_gradient(self) -> None:
        """Backward of Σₙ ℓₙ: stores ∂ℓₙ/∂aᵤ at every site (for :meth:`ActivationSite.coefficient`)."""
        self._tape.recording.active = True
        try:
            self._backward(self.loss_grad, None)
        finally:
            self._tape.recording.active = False

    def output_squares(self, output_grad: Tensor, weights: Tensor | None = None) -> ParamDict:
        """Σₙ wₙ (gₙᵀ ∂fₙ/∂θ)² for a per-example output gradient ``output_grad`` [n, C]."""
        for site in self.sites:
            site.injection = None
        return self._backward(output_grad, self._weights(weights))

    def injected_squares(self, injections: list[Tensor], weights: Tensor | None = None) -> ParamDict:
        """Σₙ wₙ (Σᵤ ⟨eₙ,ᵤ, ∂zₙ,ᵤ/∂θ⟩)² for vectors eᵤ injected at the pre-activations."""
        for site, injection in zip(self.sites, injections):
            site.injection = injection
        try:
            return self._backward(None, self._weights(weights))
        finally:
            for site in self.sites:
                site.injection = None

    def _weights(self, weights: Tensor | None) -> Tensor:
        if weights is None:
            return torch.ones(self.num, dtype=self.objective.dtype, device=self.objective.device)
        return weights

    def residual_squares(self) -> ParamDict:
        """Σₙ Σᵤ cₙ,ᵤ (∂zₙ,ᵤ/∂θ)² without sampling: one injected unit per pass (2 passes per
        unit of one example's activations), for checking the Monte-Carlo estimate on small
        networks. Needs :meth:`loss_gradient` first."""
        coefficients = [site.coefficient() for site in self.sites]
        total: ParamDict = {}
        for index, c in enumerate(coefficients):
            flat = c.reshape(self.num, -1)
            for unit in range(flat.shape[1]):
                for sign in (1.0, -1.0):
                    vector = torch.zeros_like(flat)
                    vector[:, unit] = (sign * flat[:, unit]).clamp(min=0).sqrt()
                    injections = [torch.zeros_like(other) for other in coefficients]
                    injections[index] = vector.reshape(c.shape)
                    for name, value in self.injected_squares(injections).items():
                        total[name] = total[name] + sign * value if name in total else sign * value
        return total

    def leading_parameters(self, layers: int) -> list[str]:
        """Parameters of θ in the first ``layers`` linear and convolution layers, in the order
        the forward pass called them (the stem first): :meth:`residual_products` applies to them."""
        calls = [call for call in self._tape.calls if call.func in PER_EXAMPLE_FUNCS][:max(layers, 0)]
        return [name for call in calls for name in call.names.values()]

    def residual_products(self, tangents: ParamDict, examples: slice = slice(None)) -> ParamDict:
        """Per example, Rₙ zₙ for tangents ``{name: [m, *shape]}`` (row n: zₙ) on parameters
        of linear and convolution layers (:meth:`leading_parameters`), where Rₙ is the Hessian
        of θ ↦ rₙᵀ fₙ(θ) with rₙ = ∇_f ℓₙ held fixed (the residual of example n), for the m
        examples ``examples`` of the batch. Returns ``{name: [m, *shape]}``.

        Each example gets its own copy of these parameters (:func:`per_example_affine`), so
        one forward-over-reverse product over the examples (about an HVP) gives every
        example's product with its own tangent. A layer's output is linear in its own
        parameters, so within one layer's block Rₙ = Σᵤ cₙ,ᵤ (∂zᵤ/∂θ)ᵀ(∂zᵤ/∂θ) exactly (its
        diagonal is the residual there); between two layers Rₙ also has the terms of
        ∂²fₙ/∂θᵢ∂θⱼ through the later layer's input.
        """
        objective = self.objective
        calls = {id(objective.params[name]): name for name in tangents}
        inputs, weights = self.inputs[examples], self.loss_grad[examples]
        count = int(inputs.shape[0])
        copies = {name: objective.params[name].detach().expand(count, *objective.params[name].shape).clone()
                  for name in tangents}

        def residual_form(own: ParamDict) -> Tensor:
            with evaluation_mode(objective.model), _PerExampleCopies(calls, own):
                return (objective.forward(objective.params, inputs) * weights).sum()

        return jvp(grad(residual_form), (copies,), (tangents,))[1]  # type: ignore[no-any-return]

    def ggn_squares(self) -> ParamDict:
        """Σₙ diag(Jₙᵀ Λₙ Jₙ) over this batch's examples: C backward passes (exact)."""
        total: ParamDict = {}
        for column in range(self.num_classes):
            for name, value in self.output_squares(self.factor[:, :, column]).items():
                total[name] = total[name] + value if name in total else value
        return total


def tape_ggn_diagonal(objective: Objective) -> ParamDict:
    """Exact diag(GGN) of ``objective`` through :class:`TapedBatch` (C passes per batch).

    Parameters that no recorded layer touches get zeros (they do not influence the
    outputs through the supported layers; the structure check rules that case out).
    """
    total = {n: torch.zeros_like(p) for n, p in objective.params.items()}
    for x, y, _ in objective.batches():
        batch = TapedBatch(objective, x, y, sites=False)
        for name, value in batch.ggn_squares().items():
            total[name] += value
    objective.mean_over_examples(total)
    return total


__all__ = ["ActivationSite", "TapeError", "TapedBatch", "tape_ggn_diagonal"]
