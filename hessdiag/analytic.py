r"""The exact loss-Hessian diagonal of an MLP by the pre-activation-Hessian recursion (docs/appendix.md).

Setting (docs/appendix.md): :math:`a^0 = x`, :math:`z^l = W^l a^{l-1} + b^l` for :math:`l = 1..L`,
:math:`a^l = \phi_l(z^l)` for :math:`l < L`, a linear output :math:`f = z^L \in R^C`. For one
example with loss :math:`\ell(f, y)` put :math:`r = \nabla_f \ell` and :math:`\Lambda = \nabla_f^2 \ell = QQ^\top`.
A parameter attached to neuron *i* of layer *l* has :math:`c = a^{l-1}_j` (weight :math:`W^l_{ij}`) or
:math:`c = 1` (bias :math:`b^l_i`). Then, exactly (docs/math.md–4.3),

.. math::

    H_{\theta\theta} = \underbrace{c^2 \sum_\rho (\Delta^{l,\rho}_i)^2}_{\text{GGN}}
                     + \underbrace{c^2 M^l_{ii}}_{\text{residual}},

with the GGN columns :math:`\Delta^{L,\rho} = q_\rho`,
:math:`\Delta^{l,\rho} = \phi'(z^l) \odot W^{l+1\top}\Delta^{l+1,\rho}`
and the **full** pre-activation Hessian of :math:`F = r^\top f` (r frozen):

.. math::

    \delta^L = r,\ M^L = 0,\quad g^l = W^{l+1\top}\delta^{l+1},\ \delta^l = \phi'(z^l)\odot g^l,\quad
    M^l = D'_l W^{l+1\top} M^{l+1} W^{l+1} D'_l + \mathrm{diag}(\phi''(z^l)\odot g^l).

The objective's diagonal is the mean of these per-example terms over all N examples.

Cost. :math:`M^{L-1}` is diagonal (:math:`M^L = 0`) and the lowest hidden layer needs only the
diagonal of its :math:`M`, so full :math:`n_l \times n_l` matrices are formed only for hidden layers
2 .. L−2: memory O(chunk · n_l²), time O(B Σ n_{l+1} n_l²) there and O(B Σ n_{l+1} n_l) elsewhere.

Also here:

* the **per-neuron (diagonal-only) approximation** (docs/appendix.md), which drops the off-diagonal
  :math:`M^{l+1}_{km}`; exact for layers L−1 and L−2, wrong below;
* the **per-layer φ″ contributions** (docs/math.md): :math:`H_{\theta\theta}` is affine in the vector of
  :math:`\phi''` values, :math:`H = \mathrm{GGN} + \sum_{m \ge l}\sum_{b,k}\kappa^\theta_{b,m,k}\,\phi''(z^m_{b,k})`,
  and :func:`mlp_phi2_contributions` returns, per hidden layer *m*, the sum
  :math:`\sum_{b,k}\kappa^\theta_{b,m,k}\phi''(z^m_{b,k})` for every parameter;
  :func:`mlp_phi2_coefficients` returns the coefficients κ themselves (small problems).

Supported models (:func:`mlp_structure`): an ``nn.Sequential`` (nested ``nn.Sequential`` s are
walked) of optional leading ``nn.Flatten``, then ``nn.Linear`` alternating with elementwise
activations that have closed-form derivatives (:func:`hessdiag.activations.activation_derivatives`),
ending in ``nn.Linear``. Anything else raises :class:`UnsupportedModelError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import grad

from .activations import ElementwiseDerivatives, UnsupportedActivationError, activation_derivatives
from .errors import HessdiagError
from .losses import Loss
from .objective import Objective, ParamDict

__all__ = [
    "MLPDecomposition",
    "MLPStructure",
    "Phi2Contributions",
    "UnsupportedModelError",
    "mlp_decomposition",
    "mlp_ggn_diagonal",
    "mlp_hessian_diagonal",
    "mlp_phi2_coefficients",
    "mlp_phi2_contributions",
    "mlp_structure",
]

DEFAULT_EXAMPLES_PER_CHUNK = 128
"""Examples per vectorized recursion step (at most; see :data:`MATRIX_ELEMENTS_PER_CHUNK`)."""

MATRIX_ELEMENTS_PER_CHUNK = 1 << 24
"""Cap on chunk · n_l² for the full M matrices (128 MiB in float64 per matrix); wide nets with
three or more hidden layers get smaller chunks automatically."""


class UnsupportedModelError(HessdiagError):
    """The model is not an MLP the analytic recursion handles (callers may fall back)."""


# --------------------------------------------------------------------------------------------
# Structure detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPStructure:
    """The layers of a supported MLP.

    Attributes:
        flatten: leading ``nn.Flatten`` modules applied to the input, in order.
        linears: ``(weight_name, bias_name or None)`` per Linear, names as in ``named_parameters()``.
        activations: the activation module after each hidden Linear (``len(linears) - 1``).
        derivatives: their closed-form φ, φ', φ'' (same order).
        activation_names: the activations' module names (labels of hidden layers).
    """

    flatten: tuple[nn.Flatten, ...]
    linears: tuple[tuple[str, str | None], ...]
    activations: tuple[nn.Module, ...]
    derivatives: tuple[ElementwiseDerivatives, ...]
    activation_names: tuple[str, ...]

    @property
    def depth(self) -> int:
        """Number of hidden layers, L − 1."""
        return len(self.activations)


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    # _modules, not named_children(): the latter drops repeated modules, Sequential.forward does not.
    out: list[tuple[str, nn.Module]] = []
    for name, child in module._modules.items():
        if child is None:
            continue
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out += _leaves(child, full + ".")
        else:
            out.append((full, child))
    return out


def mlp_structure(model: nn.Module) -> MLPStructure:
    """Parse ``model`` as Flatten* → Linear (→ φ → Linear)*; raise :class:`UnsupportedModelError` if not.

    Exact types only (``nn.Sequential``, ``nn.Linear``, ``nn.Flatten``): a subclass may override
    ``forward``, and then the recursion would silently describe another function.
    """
    if type(model) is not nn.Sequential:
        raise UnsupportedModelError(f"not an nn.Sequential MLP ({type(model).__name__})")
    leaves = _leaves(model, "")
    flatten: list[nn.Flatten] = []
    while leaves and type(leaves[0][1]) is nn.Flatten:
        flatten.append(leaves.pop(0)[1])  # type: ignore[arg-type]
    if not leaves or len(leaves) % 2 == 0:
        raise UnsupportedModelError("expected Linear (→ activation → Linear)* after the Flatten")
    linears: list[tuple[str, str | None]] = []
    acts: list[nn.Module] = []
    derivs: list[ElementwiseDerivatives] = []
    names: list[str] = []
    seen: list[tuple[nn.Module, str]] = []
    for index, (name, module) in enumerate(leaves):
        if index % 2 == 0:
            if type(module) is not nn.Linear:
                raise UnsupportedModelError(f"module {name} ({type(module).__name__}) is not nn.Linear")
            if any(module is other for other, _ in seen):
                raise UnsupportedModelError(f"Linear {name} is used twice (shared weights)")
            seen.append((module, name))
            linears.append((f"{name}.weight", None if module.bias is None else f"{name}.bias"))
        else:
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                raise UnsupportedModelError(f"activation {name} has parameters or buffers")
            try:
                derivs.append(activation_derivatives(module))
            except UnsupportedActivationError as err:
                raise UnsupportedModelError(str(err)) from None
            acts.append(module)
            names.append(name)
    return MLPStructure(tuple(flatten), tuple(linears), tuple(acts), tuple(derivs), tuple(names))


def supported_structure(model: nn.Module) -> MLPStructure | None:
    """:func:`mlp_structure`, or ``None`` when the model is not a supported MLP."""
    try:
        return mlp_structure(model)
    except UnsupportedModelError:
        return None


# --------------------------------------------------------------------------------------------
# Per-batch functional core
# --------------------------------------------------------------------------------------------


@dataclass
class _Forward:
    inputs: list[Tensor]  # a^{l-1}, the input of Linear l, [B, n_{l-1}], l = 1..L
    dphi: list[Tensor]  # φ'(z^l), [B, n_l], hidden l = 1..L-1
    d2phi: list[Tensor]  # φ''(z^l)
    output: Tensor  # f = z^L, [B, C]


def _weights(structure: MLPStructure, objective: Objective) -> tuple[list[Tensor], list[Tensor | None]]:
    values = {**objective.constants, **objective.params}
    weights = [values[w] for w, _ in structure.linears]
    biases = [None if b is None else values[b] for _, b in structure.linears]
    return weights, biases


def _forward(structure: MLPStructure, weights: list[Tensor], biases: list[Tensor | None],
             x: Tensor) -> _Forward:
    for module in structure.flatten:
        x = module(x)
    if x.dim() != 2:
        raise UnsupportedModelError(f"the MLP's input must be [batch, features], got shape {tuple(x.shape)}")
    inputs: list[Tensor] = []
    dphi: list[Tensor] = []
    d2phi: list[Tensor] = []
    a = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        inputs.append(a)
        z = a @ w.T if b is None else torch.addmm(b, a, w.T)
        if l == len(weights) - 1:
            return _Forward(inputs, dphi, d2phi, z)
        act, der = structure.activations[l], structure.derivatives[l]
        dphi.append(der.dphi(z))
        d2phi.append(der.d2phi(z))
        a = act(z)  # the module itself, so the forward is exactly the model's
    raise AssertionError("unreachable")


def _loss_terms(loss: Loss, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example r = ∇_f ℓ [B, C] and Q with QQᵀ = ∇²_f ℓ [B, C, R] (:mod:`hessdiag.losses`)."""
    count = output.shape[0]
    # The batch mean's gradient is r_b / B for every example b.
    with torch.enable_grad():  # callers run under no_grad; a custom loss needs autograd
        r = grad(lambda o: loss.batch_mean(o, target))(output.detach()) * count
    return r, loss.hessian_factors(output.detach(), target)


def _backprop_deltas(weights: list[Tensor], fwd: _Forward, r: Tensor) -> list[Tensor]:
    """g^l = W^{l+1ᵀ} δ^{l+1} for hidden l = 1..L-1 (index l-1), from δ^L = r."""
    gs: list[Tensor] = []
    delta = r
    for l in range(len(weights) - 1, 0, -1):  # weights[l] is W^{l+1}
        g = delta @ weights[l]
        gs.append(g)
        delta = fwd.dphi[l - 1] * g
    return gs[::-1]


def _ggn_squares(weights: list[Tensor], fwd: _Forward, q: Tensor) -> list[Tensor]:
    """S^l_{b,i} = Σ_ρ (Δ^{l,ρ}_{b,i})² for l = 1..L (index l-1)."""
    delta = q  # [B, n_l, ρ]
    out = [delta.pow(2).sum(-1)]
    for l in range(len(weights) - 1, 0, -1):
        delta = fwd.dphi[l - 1].unsqueeze(-1) * torch.matmul(weights[l].T, delta)
        out.append(delta.pow(2).sum(-1))
    return out[::-1]


def _sandwich(w: Tensor, m: Tensor, diagonal: bool, full: bool) -> Tensor:
    """Wᵀ M W per example, M = diag(m) [B, n] when ``diagonal`` else [B, n, n]; its diagonal only
    ([B, n']) unless ``full`` ([B, n', n'])."""
    if diagonal:
        if not full:
            return m @ w.pow(2)
        return torch.matmul(w.T, m.unsqueeze(-1) * w)
    mw = torch.matmul(m, w)  # [B, n, n']
    if not full:
        return (w * mw).sum(-2)
    return torch.matmul(w.T, mw)


def _propagate(weights: list[Tensor], dphi: list[Tensor], sources: dict[int, Tensor],
               batch: int, per_neuron: bool = False) -> list[Tensor]:
    """diag(M^l) [B, n_l] for l = 1..L (index l-1) from the recursion
    M^l = D'_l W^{l+1ᵀ} M^{l+1} W^{l+1} D'_l + diag(sources[l]), M^L = 0.

    ``sources`` maps a hidden layer l (1-based) to the vector added to the diagonal of M^l
    (φ''(z^l) ⊙ g^l for the full residual, a single layer's for one φ″ contribution). With
    ``per_neuron`` the off-diagonal entries of M^{l+1} are dropped (docs/appendix.md).
    """
    num = len(weights)
    diags: list[Tensor | None] = [None] * num  # None: M^l = 0 (output layer, layers above a source)
    m: Tensor | None = None  # M^{l+1}: None (zero), a diagonal [B, n] or a full [B, n, n]
    is_diag = True
    for l in range(num - 1, 0, -1):
        w, d = weights[l], dphi[l - 1]  # W^{l+1}, φ'(z^l)
        full = l >= 2 and not per_neuron  # only a layer with a hidden layer below needs all of M^l
        new: Tensor | None = None
        if m is not None:
            new = _sandwich(w, m, is_diag, full)
            new = d.unsqueeze(-1) * new * d.unsqueeze(-2) if full else d.pow(2) * new
        src = sources.get(l)
        if src is not None:
            if new is None:
                new, full = src, False  # M^l = diag(src) stays a vector until it meets a W
            elif full:
                new = new + torch.diag_embed(src)
            else:
                new = new + src
        m, is_diag = new, not full
        if new is not None:
            diags[l - 1] = new if is_diag else new.diagonal(dim1=-2, dim2=-1)
    return [torch.zeros(batch, w.shape[0], dtype=w.dtype, device=w.device) if v is None else v
            for w, v in zip(weights, diags)]


def _accumulate_blocks(structure: MLPStructure, fwd: _Forward, per_neuron_sq: list[Tensor],
                       names: set[str], out: ParamDict) -> None:
    """out[W^l] += Σ_b S^l_{b,i} (a^{l-1}_{b,j})², out[b^l] += Σ_b S^l_{b,i}, trainable tensors only."""
    for (wname, bname), a, s in zip(structure.linears, fwd.inputs, per_neuron_sq):
        if wname in names:
            out[wname].add_(s.T @ a.pow(2))
        if bname is not None and bname in names:
            out[bname].add_(s.sum(0))


def _chunk_size(structure: MLPStructure, weights: list[Tensor], requested: int | None) -> int:
    if requested is not None:
        return max(1, int(requested))
    # Full M^l matrices exist only for hidden layers 2 .. L-2.
    widths = [w.shape[0] for w in weights[1 : len(weights) - 2]]
    largest = max((n * n for n in widths), default=1)
    return max(1, min(DEFAULT_EXAMPLES_PER_CHUNK, MATRIX_ELEMENTS_PER_CHUNK // largest))


def _chunks(objective: Objective, examples_per_chunk: int):
    for x, y, _ in objective.batches():
        for start in range(0, x.shape[0], examples_per_chunk):
            yield x[start : start + examples_per_chunk], y[start : start + examples_per_chunk]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class MLPDecomposition:
    """diag(H) = diag(GGN) + residual over all of the objective's data, per parameter tensor.

    ``per_neuron_residual`` is the residual from the diagonal-only recursion (docs/appendix.md), when
    requested; it is exact for ≤ 2 hidden layers and for the top two hidden layers.
    """

    ggn: ParamDict
    residual: ParamDict
    per_neuron_residual: ParamDict | None = None

    @property
    def diagonal(self) -> ParamDict:
        """The exact diag(H) = GGN + residual."""
        return {k: self.ggn[k] + self.residual[k] for k in self.ggn}

    @property
    def per_neuron_diagonal(self) -> ParamDict | None:
        """GGN + the per-neuron residual (the approximation), or ``None``."""
        if self.per_neuron_residual is None:
            return None
        return {k: self.ggn[k] + self.per_neuron_residual[k] for k in self.ggn}


@dataclass
class Phi2Contributions:
    """diag(H) = ``ggn`` + Σ_m ``by_layer[m]``: each hidden layer's φ″ share (docs/math.md).

    ``by_layer`` is keyed by the activation module's name (e.g. ``"2"`` for ``model[2]``); entry
    m holds Σ_{b,k} κ^θ_{b,m,k} φ''(z^m_{b,k}) for every parameter θ (zero for layers above m's
    Linear, since only layers m ≥ l enter).
    """

    ggn: ParamDict
    by_layer: dict[str, ParamDict] = field(default_factory=dict)

    @property
    def diagonal(self) -> ParamDict:
        out = {k: v.clone() for k, v in self.ggn.items()}
        for part in self.by_layer.values():
            for k in out:
                out[k] += part[k]
        return out


def _zeros(objective: Objective) -> ParamDict:
    return {k: torch.zeros_like(v) for k, v in objective.params.items()}


def _chunk_terms(
    objective: Objective, structure: MLPStructure, weights: list[Tensor],
    biases: list[Tensor | None], examples_per_chunk: int,
) -> Iterator[tuple[Tensor, _Forward, Tensor, Tensor]]:
    """Per chunk of examples: (x, forward quantities, r = ∇_f ℓ, Q with QQᵀ = ∇²_f ℓ).

    Callers run it under ``torch.no_grad()``: everything here is closed form.
    """
    for x, y in _chunks(objective, examples_per_chunk):
        fwd = _forward(structure, weights, biases, x)
        r, q = _loss_terms(objective.loss, fwd.output, y)
        yield x, fwd, r, q


def _divide_by_examples(objective: Objective, *diagonals: ParamDict) -> None:
    """Turn sums over examples into the mean of docs/index.md, "What is measured", in place
    (the shards' sums added first when several ranks measure together)."""
    objective.mean_over_examples(*diagonals)


def mlp_decomposition(
    objective: Objective,
    *,
    per_neuron: bool = False,
    structure: MLPStructure | None = None,
    examples_per_chunk: int | None = None,
) -> MLPDecomposition:
    """Exact diag(GGN) and residual of the objective's Hessian for a supported MLP, in one data pass.

    Args:
        objective: its ``params`` (compute dtype) and data; frozen parameters are read from
            ``objective.constants`` and not reported.
        per_neuron: also compute the per-neuron (diagonal-only) residual, for comparison.
        structure: a precomputed :func:`mlp_structure` of ``objective.model``.
        examples_per_chunk: examples per vectorized step (memory O(chunk · n_l²)); default:
            up to 128, fewer for wide deep nets (:data:`MATRIX_ELEMENTS_PER_CHUNK`).

    Raises:
        UnsupportedModelError: the model is not a supported MLP (or its input is not 2-D).
    """
    structure = structure or mlp_structure(objective.model)
    weights, biases = _weights(structure, objective)
    names = set(objective.params)
    ggn, res = _zeros(objective), _zeros(objective)
    approx = _zeros(objective) if per_neuron else None
    chunk = _chunk_size(structure, weights, examples_per_chunk)
    with torch.no_grad():
        for x, fwd, r, q in _chunk_terms(objective, structure, weights, biases, chunk):
            _accumulate_blocks(structure, fwd, _ggn_squares(weights, fwd, q), names, ggn)
            gs = _backprop_deltas(weights, fwd, r)
            sources = {l + 1: p * g for l, (p, g) in enumerate(zip(fwd.d2phi, gs))}
            _accumulate_blocks(structure, fwd, _propagate(weights, fwd.dphi, sources, x.shape[0]), names, res)
            if approx is not None:
                _accumulate_blocks(structure, fwd, _propagate(weights, fwd.dphi, sources, x.shape[0], True),
                                   names, approx)
    _divide_by_examples(objective, ggn, res, *([approx] if approx is not None else []))
    return MLPDecomposition(ggn, res, approx)


def mlp_hessian_diagonal(objective: Objective, **kwargs: object) -> ParamDict:
    """Exact diag(H) of a supported MLP objective (see :func:`mlp_decomposition`)."""
    return mlp_decomposition(objective, **kwargs).diagonal  # type: ignore[arg-type]


def mlp_ggn_diagonal(
    objective: Objective,
    *,
    structure: MLPStructure | None = None,
    examples_per_chunk: int | None = None,
) -> ParamDict:
    """Exact diag(GGN) of a supported MLP objective: C backpropagated columns of Q per example."""
    structure = structure or mlp_structure(objective.model)
    weights, biases = _weights(structure, objective)
    names = set(objective.params)
    ggn = _zeros(objective)
    chunk = _chunk_size(structure, weights, examples_per_chunk)
    with torch.no_grad():
        for _, fwd, _, q in _chunk_terms(objective, structure, weights, biases, chunk):
            _accumulate_blocks(structure, fwd, _ggn_squares(weights, fwd, q), names, ggn)
    _divide_by_examples(objective, ggn)
    return ggn


def mlp_phi2_contributions(
    objective: Objective,
    *,
    structure: MLPStructure | None = None,
    examples_per_chunk: int | None = None,
) -> Phi2Contributions:
    """diag(GGN) and each hidden layer's φ″ contribution Σ_{b,k} κ^θ_{b,m,k} φ''(z^m_{b,k}) (docs/math.md).

    By linearity of the recursion in its sources, layer m's contribution is the recursion
    started from diag(φ''(z^m) ⊙ g^m) at layer m alone; the contributions sum to the residual.
    Costs one recursion per hidden layer.
    """
    structure = structure or mlp_structure(objective.model)
    weights, biases = _weights(structure, objective)
    names = set(objective.params)
    ggn = _zeros(objective)
    parts = {name: _zeros(objective) for name in structure.activation_names}
    chunk = _chunk_size(structure, weights, examples_per_chunk)
    with torch.no_grad():
        for x, fwd, r, q in _chunk_terms(objective, structure, weights, biases, chunk):
            _accumulate_blocks(structure, fwd, _ggn_squares(weights, fwd, q), names, ggn)
            gs = _backprop_deltas(weights, fwd, r)
            for l, name in enumerate(structure.activation_names):
                source = {l + 1: fwd.d2phi[l] * gs[l]}
                _accumulate_blocks(structure, fwd, _propagate(weights, fwd.dphi, source, x.shape[0]), names,
                                   parts[name])
    _divide_by_examples(objective, ggn, *parts.values())
    return Phi2Contributions(ggn, parts)


def mlp_phi2_coefficients(
    objective: Objective, *, structure: MLPStructure | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    r"""The coefficients κ of docs/math.md and the φ″ values they multiply (small problems only).

    Returns ``(kappa, phi2)``: ``phi2[m]`` is φ''(z^m) over all N examples, ``[N, n_m]``, and
    ``kappa[m][θ-name]`` has shape ``[*θ.shape, N, n_m]`` with
    :math:`\kappa^\theta_{b,m,k} = \tfrac1N c_b^2\, g^m_{b,k}\,(J^{m\leftarrow l}_{b,ki})^2`, so that
    ``diag(H)[θ] = ggn[θ] + Σ_m (kappa[m][θ] * phi2[m]).sum((-2, -1))``. Memory O(P · N · n_m).
    """
    if objective.world.distributed:  # per-example values, not sums: nothing to add up
        raise UnsupportedModelError("mlp_phi2_coefficients returns per-example coefficients; "
                                    "run it in one process")
    structure = structure or mlp_structure(objective.model)
    weights, biases = _weights(structure, objective)
    names = set(objective.params)
    kappa: dict[str, dict[str, list[Tensor]]] = {m: {k: [] for k in names}
                                                 for m in structure.activation_names}
    phi2: dict[str, list[Tensor]] = {m: [] for m in structure.activation_names}
    with torch.no_grad():
        for x, fwd, r, _ in _chunk_terms(objective, structure, weights, biases,
                                         DEFAULT_EXAMPLES_PER_CHUNK):
            gs = _backprop_deltas(weights, fwd, r)
            for m, mname in enumerate(structure.activation_names):
                phi2[mname].append(fwd.d2phi[m])
                # J^{m←l}_{b,k·} for l = m+1 (identity) down to 1, via J^{m←l} = J^{m←l+1} W^{l+1} D'_l.
                jac = torch.eye(weights[m].shape[0], dtype=x.dtype, device=x.device).expand(
                    x.shape[0], -1, -1)  # [B, k, i]
                for l in range(m + 1, 0, -1):  # layer l (1-based) = weights[l-1]
                    if l <= m:
                        jac = torch.matmul(jac, weights[l]) * fwd.dphi[l - 1].unsqueeze(-2)
                    coef = gs[m].unsqueeze(-1) * jac.pow(2)  # [B, k, i]
                    wname, bname = structure.linears[l - 1]
                    a2 = fwd.inputs[l - 1].pow(2)  # [B, j]
                    if wname in names:
                        kappa[mname][wname].append(torch.einsum("bki,bj->ijbk", coef, a2))
                    if bname is not None and bname in names:
                        kappa[mname][bname].append(coef.permute(2, 0, 1))
                for l in range(m + 2, len(weights) + 1):  # layers above m: κ = 0
                    wname, bname = structure.linears[l - 1]
                    for key in (wname, bname):
                        if key is not None and key in names:
                            shape = objective.params[key].shape
                            kappa[mname][key].append(x.new_zeros(*shape, x.shape[0], fwd.d2phi[m].shape[1]))
    assert objective.num_examples is not None  # counted by the pass above
    total = objective.num_examples
    out = {m: {k: torch.cat(v, -2) / total for k, v in parts.items()} for m, parts in kappa.items()}
    return out, {m: torch.cat(v, 0) for m, v in phi2.items()}
