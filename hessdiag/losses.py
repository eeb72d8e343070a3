r"""The loss ℓ of the measured objective L(θ) = (1/N) Σₙ ℓ(f(xₙ; θ), yₙ), as one object.

Every estimator needs three things from the loss (docs/math.md, "The loss"):

- the batch mean ℓ̄_b = (1/n_b) Σ_{n∈b} ℓₙ, differentiable twice by autograd and by
  ``torch.func`` (:meth:`Loss.batch_mean`);
- per example the gradient rₙ = ∇_f ℓₙ (taken from the batch mean by autograd);
- per example a factor Qₙ with Qₙ Qₙᵀ = ∇²_f ℓₙ (:meth:`Loss.hessian_factors`), which
  carries the loss's own curvature into the generalized Gauss–Newton part
  G = (1/N) Σₙ Jₙᵀ Qₙ Qₙᵀ Jₙ.

Built in, with closed-form Qₙ (C = outputs per example, p = softmax(f), σ = sigmoid(f)):

========  =====================================================  ======================================
name      ℓₙ                                                     ∇²_f ℓₙ
========  =====================================================  ======================================
``ce``    −Σ_k a_k log p_k, a = (1−ε)·w_y·e_y + (ε/C)·w           (Σ_k a_k)(diag p − p pᵀ)
``nll``   −w_y f_y (f holds log-probabilities)                    0 (all curvature is residual)
``bce``   (1/C) Σ_k w_k[(1−t_k) f_k + (1+(π_k−1)t_k) softplus(−f_k)]   diag(w (π t + 1 − t) σ(1−σ)) / C
``mse``   (1/C) Σ_k (f_k − t_k)²                                  (2/C) I
``huber`` (1/C) Σ_k h_δ(f_k − t_k), h_δ quadratic for |r| < δ      diag(1[|r_k| < δ]) / C
========  =====================================================  ======================================

(ε label smoothing, w class/element weights, π ``pos_weight``; integer labels for ``mse``,
``bce`` and ``huber`` are one-hot encoded, or taken as the target when there is one output.)

Any other loss — an ``nn.Module`` or a callable ``loss(output, target)`` returning the
*mean over the batch's examples* — is a :class:`CallableLoss`: its ∇²_f ℓₙ comes from
autograd (per example, C×C) and Qₙ from its eigendecomposition, so it must be convex in
the output (checked on the first batch). The built-in torch modules
(``nn.CrossEntropyLoss``, ``NLLLoss``, ``BCEWithLogitsLoss``, ``MSELoss``, ``HuberLoss``)
are recognized and mapped to the closed forms above, with their options.

Class weights and the mean. With class weights and integer labels, torch's ``reduction="mean"``
divides by Σₙ w_{yₙ}, not by N. hessdiag measures that same full-data value,
Σₙ w_{yₙ} ℓₙ / Σₙ w_{yₙ}, by rescaling the weights by N / Σₙ w_{yₙ} over *all* measured
data (:meth:`Loss.weight_totals`, :meth:`Loss.rescaled`), so the objective stays a mean over examples and batches
combine by n_b / N. A single batch's mean then differs from torch's value on that batch,
but the objective over the data equals torch's loss on all of it at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import HessdiagError

LOSSES: tuple[str, ...] = ("ce", "nll", "bce", "mse", "huber")
"""Names of the built-in losses (the CLI's ``--loss`` choices)."""


class LossError(HessdiagError):
    """A loss that cannot form the objective (bad user input)."""


def _float_target(output: Tensor, target: Tensor) -> Tensor:
    """Targets shaped like ``output``: float targets reshaped; integer labels taken as the
    target when there is one output per example, else one-hot encoded."""
    if not target.is_floating_point():
        per_example = output[0].numel() if output.shape[0] else output.shape[-1]
        if target.numel() != output.numel() or per_example != 1:
            target = F.one_hot(target.long(), output.shape[-1])
    return target.to(output.dtype).reshape(output.shape)


def _elementwise_factor(curvature: Tensor) -> Tensor:
    """Q = diag(√c) for per-example diagonal curvature ``c`` of shape [B, C]; [B, C, C]."""
    return torch.diag_embed(curvature.clamp(min=0).sqrt())


class Loss:
    """A per-example loss ℓ(f, y); the objective is its mean over examples.

    Subclasses give :meth:`per_example` (shape [B]) and :meth:`hessian_factors`
    (shape [B, C, R] with Q Qᵀ = ∇²_f ℓₙ for outputs f of shape [B, C]).
    """

    name: str = "loss"

    def per_example(self, output: Tensor, target: Tensor) -> Tensor:
        """ℓₙ for every example of a batch, shape [B]."""
        raise NotImplementedError

    def batch_mean(self, output: Tensor, target: Tensor) -> Tensor:
        """ℓ̄_b = mean over the batch of :meth:`per_example`; a scalar."""
        return self.per_example(output, target).mean()

    def hessian_factors(self, output: Tensor, target: Tensor) -> Tensor:
        """Qₙ with Qₙ Qₙᵀ = ∇²_f ℓₙ for each example; shape [B, C, R]."""
        raise NotImplementedError

    def target(self, output: Tensor, target: Tensor) -> Tensor:
        """The target as :meth:`per_example` consumes it."""
        return target

    def weight_totals(self, targets: Iterable[Tensor]) -> Tensor | None:
        """For a class-weighted loss, ``[count, Σ w_y]`` (float64) over ``targets`` (one tensor
        per batch), which :meth:`rescaled` turns into the data set's normalization (module
        docstring, "Class weights"); ``None`` for every other loss (``targets`` untouched).
        Totals of several shards add up."""
        return None

    def rescaled(self, totals: Tensor) -> Loss:
        """This loss normalized by the :meth:`weight_totals` of the whole data set."""
        return self

    def check(self, output: Tensor, target: Tensor) -> str | None:
        """Why this loss cannot use the first batch's ``output`` and ``target``; ``None`` if it can."""
        return None

    def float_target_reason(self, output: Tensor, target: Tensor) -> str | None:
        """Why float ``target`` of any batch does not fit outputs shaped like ``output``
        (the first batch's); a cheap shape check, ``None`` if they fit."""
        return None

    def indexes_classes(self, output: Tensor) -> bool:
        """Whether integer labels index the classes of ``output`` (and must lie in 0..C−1)."""
        return True

    def backpack_module(self) -> nn.Module | None:
        """The torch loss module BackPACK can extend for exactly this loss, if any."""
        return None

    def describe(self) -> str:
        """Name and non-default options, e.g. ``ce(label_smoothing=0.1)``."""
        options = self._options()
        return self.name + (f"({', '.join(options)})" if options else "")

    def _options(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class _ClassWeighted(Loss):
    """Shared by ``ce`` and ``nll``: class weights w, rescaled over the data set."""

    def __init__(self, weight: Tensor | None = None, *, scale: float = 1.0) -> None:
        self.weight = None if weight is None else torch.as_tensor(weight).detach()
        if self.weight is not None and (self.weight.dim() != 1 or bool((self.weight < 0).any())):
            raise LossError("class weights must be a 1-d tensor of non-negative numbers")
        self.scale = scale  # N / Σₙ w_{yₙ} over the measured data (module docstring)

    def _weight(self, output: Tensor) -> Tensor | None:
        return None if self.weight is None else self.weight.to(output.device, output.dtype)

    def weight_totals(self, targets: Iterable[Tensor]) -> Tensor | None:
        if self.weight is None:
            return None
        totals = torch.zeros(2, dtype=torch.float64)
        for y in targets:
            if y.is_floating_point():  # probability targets: torch divides by N
                return None
            totals[0] += y.numel()
            totals[1] += self.weight.to(torch.float64)[y.reshape(-1).cpu().long()].sum()
        return totals

    def rescaled(self, totals: Tensor) -> Loss:
        count, total = (float(v) for v in totals)
        if total <= 0:
            raise LossError(f"the {self.name} class weights of the measured labels sum to zero")
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__, scale=count / total)
        return clone

    def check(self, output: Tensor, target: Tensor) -> str | None:
        if self.weight is not None and self.weight.numel() != output.shape[-1]:
            return f"{self.weight.numel()} class weights for {output.shape[-1]} outputs"
        return None

    def _options(self) -> list[str]:
        return [] if self.weight is None else [f"weight={[round(float(w), 4) for w in self.weight]}"]


class CrossEntropyLoss(_ClassWeighted):
    """``ce``: softmax cross-entropy on logits [B, C], integer labels or class probabilities.

    Args:
        weight: class weights w (as ``nn.CrossEntropyLoss``).
        label_smoothing: ε ∈ [0, 1): the target becomes (1−ε)·y + ε/C.
    """

    name = "ce"

    def __init__(self, weight: Tensor | None = None, label_smoothing: float = 0.0, *,
                 scale: float = 1.0) -> None:
        super().__init__(weight, scale=scale)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise LossError(f"label smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def float_target_reason(self, output: Tensor, target: Tensor) -> str | None:
        if tuple(target.shape[1:]) != tuple(output.shape[1:]):
            return (f"ce needs integer class labels of shape (batch,) or class probabilities shaped "
                    f"like the output {tuple(output.shape[1:])}; got float targets of shape {tuple(target.shape)}")
        return None

    def _plain(self) -> bool:
        return self.weight is None and self.label_smoothing == 0.0

    def per_example(self, output: Tensor, target: Tensor) -> Tensor:
        values = F.cross_entropy(output, target, weight=self._weight(output),
                                 label_smoothing=self.label_smoothing, reduction="none")
        return values * self.scale if self.scale != 1.0 else values

    def batch_mean(self, output: Tensor, target: Tensor) -> Tensor:
        if self._plain():  # torch's fused mean, as every earlier release of hessdiag computed it
            return F.cross_entropy(output, target)
        return super().batch_mean(output, target)

    def hessian_factors(self, output: Tensor, target: Tensor) -> Tensor:
        # ∇²_f ℓ = s (diag p − p pᵀ), s = Σ_k a_k the total target mass (1 without weights).
        p = torch.softmax(output, -1)
        root = p.sqrt()
        factor = torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)
        mass = self._target_mass(output, target)
        return factor if mass is None else factor * mass.clamp(min=0).sqrt()[:, None, None]

    def _target_mass(self, output: Tensor, target: Tensor) -> Tensor | None:
        """s = Σ_k a_k per example, or ``None`` where it is 1."""
        weight, eps, classes = self._weight(output), self.label_smoothing, output.shape[-1]
        if target.is_floating_point():
            coefficients = target.to(output.dtype) * (1 - eps) + eps / classes
            if weight is not None:
                coefficients = coefficients * weight
            mass = coefficients.sum(-1)
        elif weight is None:
            return None  # Σ_k a_k = 1 (the scale differs from 1 only with weights)
        else:
            mass = (1 - eps) * weight[target] + eps / classes * weight.sum()
        return mass * self.scale

    def backpack_module(self) -> nn.Module | None:
        return nn.CrossEntropyLoss() if self._plain() else None

    def _options(self) -> list[str]:
        smoothing = [f"label_smoothing={self.label_smoothing:g}"] if self.label_smoothing else []
        return super()._options() + smoothing


class NLLLoss(_ClassWeighted):
    """``nll``: −f_y for a model that outputs log-probabilities [B, C] (``log_softmax``).

    Linear in the output, so ∇²_f ℓ = 0: the GGN part vanishes and the whole Hessian is the
    residual, which carries the log-softmax's curvature inside the model.
    """

    name = "nll"

    def per_example(self, output: Tensor, target: Tensor) -> Tensor:
        values = F.nll_loss(output, target, weight=self._weight(output), reduction="none")
        return values * self.scale if self.scale != 1.0 else values

    def hessian_factors(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.zeros(*output.shape, output.shape[-1], dtype=output.dtype, device=output.device)

    def check(self, output: Tensor, target: Tensor) -> str | None:
        if target.is_floating_point():
            return "nll needs integer class labels"
        return super().check(output, target)


class _Elementwise(Loss):
    """Shared by ``bce``, ``mse``, ``huber``: ℓₙ = mean over the C outputs of an
    elementwise term, so ∇²_f ℓₙ is diagonal."""

    def target(self, output: Tensor, target: Tensor) -> Tensor:
        return _float_target(output, target)

    def elements(self, output: Tensor, target: Tensor) -> Tensor:
        """The elementwise term for outputs [B, C] and float targets of the same shape."""
        raise NotImplementedError

    def curvature(self, output: Tensor, target: Tensor) -> Tensor:
        """Its second derivative in the output, same shape."""
        raise NotImplementedError

    def per_example(self, output: Tensor, target: Tensor) -> Tensor:
        return self.elements(output, self.target(output, target)).reshape(output.shape[0], -1).mean(1)

    def hessian_factors(self, output: Tensor, target: Tensor) -> Tensor:
        curvature = self.curvature(output, self.target(output, target)).reshape(output.shape[0], -1)
        return _elementwise_factor(curvature / curvature.shape[1])

    def indexes_classes(self, output: Tensor) -> bool:
        return output[0].numel() > 1  # one output: the labels are the target values

    def float_target_reason(self, output: Tensor, target: Tensor) -> str | None:
        per_example = output[0].numel()
        if target.shape[0] and target[0].numel() != per_example:
            return (f"{self.name} needs one target per model output ({per_example} per example); "
                    f"got targets of shape {tuple(target.shape)}")
        return None

    def check(self, output: Tensor, target: Tensor) -> str | None:
        if not target.is_floating_point() and output[0].numel() > 1 and output.dim() != 2:
            return f"integer labels for {self.name} need (batch, classes) outputs"
        return None


class BCEWithLogitsLoss(_Elementwise):
    """``bce``: binary cross-entropy on logits, mean over outputs (multi-label or one logit).

    Args:
        weight: per-output weights w (broadcast against the output, as torch's).
        pos_weight: π, the weight of positive targets per output.
    """

    name = "bce"

    def __init__(self, weight: Tensor | None = None, pos_weight: Tensor | None = None) -> None:
        self.weight = None if weight is None else torch.as_tensor(weight).detach()
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight).detach()

    def _on(self, tensor: Tensor | None, like: Tensor) -> Tensor | None:
        return None if tensor is None else tensor.to(like.device, like.dtype)

    def elements(self, output: Tensor, target: Tensor) -> Tensor:
        # Written out (as torch does internally) so that forward-over-reverse works.
        pos = self._on(self.pos_weight, output)
        log_weight = 1 + (pos - 1) * target if pos is not None else 1
        values = (1 - target) * output + log_weight * F.softplus(-output)
        weight = self._on(self.weight, output)
        return values * weight if weight is not None else values

    def curvature(self, output: Tensor, target: Tensor) -> Tensor:
        sigma = torch.sigmoid(output)
        pos = self._on(self.pos_weight, output)
        values = sigma * (1 - sigma) * (pos * target + 1 - target if pos is not None else 1)
        weight = self._on(self.weight, output)
        return values * weight if weight is not None else values

    def _options(self) -> list[str]:
        return [f"{k}={[round(float(v), 4) for v in t.reshape(-1)]}"
                for k, t in (("weight", self.weight), ("pos_weight", self.pos_weight)) if t is not None]


class MSELoss(_Elementwise):
    """``mse``: (1/C) Σ_k (f_k − t_k)², the mean over batch and outputs (as ``nn.MSELoss``)."""

    name = "mse"

    def elements(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target) ** 2  # F.mse_loss fails under forward-over-reverse

    def curvature(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.full_like(output, 2.0)

    def batch_mean(self, output: Tensor, target: Tensor) -> Tensor:
        return self.elements(output, self.target(output, target)).mean()

    def hessian_factors(self, output: Tensor, target: Tensor) -> Tensor:
        count = output[0].numel() if output.shape[0] else 1
        eye = torch.eye(count, dtype=output.dtype, device=output.device) * math.sqrt(2.0 / count)
        return eye.expand(output.shape[0], count, count)

    def backpack_module(self) -> nn.Module | None:
        return nn.MSELoss()


class HuberLoss(_Elementwise):
    """``huber``: (1/C) Σ_k h_δ(f_k − t_k) with h_δ(r) = r²/2 for |r| < δ, else δ(|r| − δ/2)
    (as ``nn.HuberLoss``). Its curvature is 1 inside the quadratic zone and 0 outside."""

    name = "huber"

    def __init__(self, delta: float = 1.0) -> None:
        if not float(delta) > 0:
            raise LossError(f"the Huber delta must be positive, got {delta}")
        self.delta = float(delta)

    def elements(self, output: Tensor, target: Tensor) -> Tensor:
        residual = output - target  # F.huber_loss has no forward-mode derivative
        size = residual.abs()
        return torch.where(size < self.delta, 0.5 * residual ** 2, self.delta * (size - 0.5 * self.delta))

    def curvature(self, output: Tensor, target: Tensor) -> Tensor:
        return ((output - target).abs() < self.delta).to(output.dtype)

    def _options(self) -> list[str]:
        return [f"delta={self.delta:g}"] if self.delta != 1.0 else []


class CallableLoss(Loss):
    """Any loss ``fn(output, target) → batch mean`` (an ``nn.Module`` or a function).

    ∇²_f ℓₙ is computed by autograd per example (ℓₙ = fn on that example alone) and
    factored by its eigendecomposition, Qₙ = V diag(√λ): fn must be convex in the output,
    which :meth:`check` verifies on the first batch, together with the mean reduction.
    """

    def indexes_classes(self, output: Tensor) -> bool:
        return False  # what integer labels mean is the callable's business

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or f"custom:{getattr(fn, '__name__', None) or type(fn).__name__}"

    def per_example(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.stack([self.fn(output[i : i + 1], target[i : i + 1]) for i in range(output.shape[0])])

    def batch_mean(self, output: Tensor, target: Tensor) -> Tensor:
        return self.fn(output, target)

    def output_hessians(self, output: Tensor, target: Tensor) -> Tensor:
        """∇²_f ℓₙ for each example, [B, C, C] (double backward, one example at a time)."""
        output = output.detach()
        hessians = []
        for i in range(output.shape[0]):
            def single(o: Tensor, i: int = i) -> Tensor:
                return self.fn(o.unsqueeze(0), target[i : i + 1])
            with torch.enable_grad():
                hessians.append(torch.autograd.functional.hessian(single, output[i]))
        return torch.stack(hessians).reshape(output.shape[0], output[0].numel(), output[0].numel())

    def hessian_factors(self, output: Tensor, target: Tensor) -> Tensor:
        values, vectors = torch.linalg.eigh(self.output_hessians(output, target))
        return vectors * values.clamp(min=0).sqrt().unsqueeze(-2)

    def check(self, output: Tensor, target: Tensor) -> str | None:
        with torch.no_grad():
            batch = self.fn(output, target)
        if not isinstance(batch, Tensor) or batch.numel() != 1:
            return "a custom loss must return a scalar (the mean over the batch)"
        some = min(output.shape[0], 8)
        if some > 1:
            with torch.no_grad():
                mean = self.per_example(output[:some], target[:some]).mean()
                direct = self.fn(output[:some], target[:some])
            if not torch.allclose(mean, direct, rtol=1e-4, atol=1e-6 * float(mean.abs()) + 1e-12):
                return ("the custom loss is not the mean of its per-example values "
                        f"({float(direct):.6g} on {some} examples vs their mean {float(mean):.6g}); "
                        "use reduction='mean' over examples")
        values = torch.linalg.eigvalsh(self.output_hessians(output[:some], target[:some]))
        worst, scale = float(values.min()), float(values.abs().max())
        if worst < -1e-6 * max(scale, 1e-30):
            return ("the custom loss is not convex in the model output (its Hessian there has the "
                    f"eigenvalue {worst:.3g}); the Gauss–Newton part needs a convex loss")
        return None


LossSpec = Union[str, Loss, nn.Module, Callable[[Tensor, Tensor], Tensor]]
"""What ``measure(loss=...)`` accepts: a name of :data:`LOSSES`, a :class:`Loss`, a torch
loss module or a callable ``loss(output, target)`` returning the batch mean."""


def _module_loss(module: nn.Module) -> Loss | None:
    """The closed-form equivalent of a torch loss module, or ``None`` if there is none."""
    reduction = getattr(module, "reduction", "mean")
    if isinstance(module, (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss, nn.MSELoss, nn.HuberLoss)):
        if reduction != "mean":
            raise LossError(f"{type(module).__name__}(reduction={reduction!r}): hessdiag measures the mean "
                            "over examples; use reduction='mean'")
    if isinstance(module, nn.CrossEntropyLoss):
        return CrossEntropyLoss(module.weight, module.label_smoothing)
    if isinstance(module, nn.NLLLoss):
        return NLLLoss(module.weight)
    if isinstance(module, nn.BCEWithLogitsLoss):
        return BCEWithLogitsLoss(module.weight, module.pos_weight)
    if isinstance(module, nn.MSELoss):
        return MSELoss()
    if isinstance(module, nn.HuberLoss):
        return HuberLoss(module.delta)
    return None


def resolve_loss(loss: LossSpec, *, label_smoothing: float | None = None) -> Loss:
    """A :class:`Loss` from a name, a ``Loss``, a torch loss module or a callable.

    ``label_smoothing`` applies to ``"ce"`` given by name only (a module or object carries
    its own).
    """
    if label_smoothing is not None and label_smoothing != 0 and loss != "ce":
        raise LossError("label smoothing applies to the ce loss only")
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        makers: dict[str, Callable[[], Loss]] = {
            "ce": lambda: CrossEntropyLoss(label_smoothing=label_smoothing or 0.0),
            "nll": NLLLoss, "bce": BCEWithLogitsLoss, "mse": MSELoss, "huber": HuberLoss,
        }
        if loss not in makers:
            raise LossError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}, "
                            "or pass a loss module or callable")
        return makers[loss]()
    if isinstance(loss, nn.Module):
        known = _module_loss(loss)
        return known if known is not None else CallableLoss(loss)
    if callable(loss):
        return CallableLoss(loss)
    raise LossError(f"a loss must be a name, an nn.Module or a callable, not {type(loss).__name__}")
