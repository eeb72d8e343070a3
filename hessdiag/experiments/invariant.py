r"""A curvature measure that per-parameter rescalings cannot change.

The raw measure ‖d‖₂/√P of d = diag ∇²L(θ) depends on the coordinates θ is written in.
If the parameters are rescaled, θ' = Kθ with K = diag(k₁, …, k_P), kᵢ ≠ 0, and the network
is re-expressed so that it computes the same function (L'(θ') = L(K⁻¹θ') for every θ'),
then ∇²L'(θ') = K⁻¹ ∇²L(θ) K⁻¹ and dᵢ' = dᵢ/kᵢ²: every entry of the diagonal moves. That is
exactly what :func:`hessdiag.experiments.reparametrize.reparametrize` does when it trades the
RCT-AF parameter α for another (kᵢ = α/β or β/α or 1 for each weight, bias and BatchNorm
parameter), so the raw normalized norm can be moved by a change of coordinates that leaves
the network itself unchanged.

**The relative (log-coordinate) diagonal.** Take the curvature along relative changes of
each parameter, θᵢ ↦ θᵢ(1 + εᵢ):

    d̃ᵢ = ∂²/∂εᵢ² L(θ ⊙ (1 + ε)) at ε = 0 = θᵢ² dᵢ,      reported as ‖θ² ⊙ d‖₂/√P.

Under θ' = Kθ: θᵢ'² dᵢ' = kᵢ²θᵢ² · dᵢ/kᵢ² = θᵢ² dᵢ, entry by entry, for every kᵢ ≠ 0. So d̃
is invariant under *any* per-parameter rescaling, in particular under all of those
``reparametrize`` applies: weights, biases (scaled by the layer's output factor, or left
alone) and BatchNorm weights and biases alike; P does not change, so the normalized norm
is invariant too (tests: float64, to 1e-10 relative, on an MLP and a CNN with RCT-AF
n = 0, 1, 2). In log coordinates φᵢ = log|θᵢ| the second derivative is θᵢ² dᵢ + θᵢ gᵢ
(g = ∇L); d̃ drops the gradient term, which vanishes at a stationary point and is itself
invariant (θᵢ'gᵢ' = kᵢθᵢ · gᵢ/kᵢ).

**Caveats.** (1) Parameters at or near 0 contribute (almost) nothing, whatever their
curvature: d̃ weighs curvature by the parameter's own size, so biases still near their
zero initialization and BatchNorm shifts near 0 are effectively ignored, and a parameter
crossing 0 during training moves d̃ᵢ through 0. (2) Invariance holds for diagonal
rescalings only, not for reparametrizations that mix parameters (rotations of hidden units,
shifts θᵢ ↦ θᵢ + c). (3) It is a different quantity from the raw diagonal, not a
correction of it: compare networks with it, but do not read it in the units of d.
(4) Computed from an estimated diagonal (``hutchinson*``), it is a plug-in value: the
probe noise in dᵢ enters squared, so prefer exact diagonals (``estimator="exact"``,
``"backpack"``) for it.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..result import normalized_norm
from ._common import ExperimentError

__all__ = ["invariant_normalized_norm", "relative_diagonal"]


def relative_diagonal(model: nn.Module, diagonal: dict[str, Tensor]) -> dict[str, Tensor]:
    """θ ⊙ θ ⊙ d per parameter tensor, with θ the model's current parameters (by name).

    ``diagonal`` is a ``{parameter name: Tensor}`` dict such as
    :func:`hessdiag.hessian_diagonal` returns for the same model; θ is cast to its dtype
    and device. Raises :class:`ExperimentError` for a name the model lacks or a shape that
    does not fit.
    """
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, block in diagonal.items():
        if name not in params:
            raise ExperimentError(f"the diagonal names {name!r}, which is not a parameter of the model")
        theta = params[name].detach().to(dtype=block.dtype, device=block.device)
        if theta.shape != block.shape:
            raise ExperimentError(f"the diagonal of {name!r} has shape {tuple(block.shape)}, "
                                  f"the parameter {tuple(theta.shape)}")
        out[name] = theta * theta * block
    return out


def invariant_normalized_norm(model: nn.Module, diagonal: dict[str, Tensor]) -> float:
    """‖θ² ⊙ d‖₂/√P: the normalized norm of :func:`relative_diagonal`, invariant under
    per-parameter rescalings that leave the network's function unchanged."""
    value = normalized_norm(relative_diagonal(model, diagonal))
    if not math.isfinite(value):
        raise ExperimentError("the relative diagonal is not finite")
    return value
