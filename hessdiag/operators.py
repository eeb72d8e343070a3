r"""The curvature matrices of an objective as linear operators: H, G (GGN) and R = H − G.

Each is a symmetric P×P matrix that is never formed; applying it to a stack of K vectors
costs one pass over the data (:meth:`hessdiag.objective.Objective.accumulate`), the
vectors going through a vmapped product in chunks (docs/math.md, "Gauss–Newton plus
residual"):

- :class:`HessianOperator`: H·V = (1/N) Σ_b n_b ∇²ℓ̄_b V, by forward-over-reverse
  (``vmap(jvp(grad))``) or double backward, on the objective's ``hvp_route``;
- :class:`GGNOperator`: G·V = (1/N) Σ_b n_b J_bᵀ Λ_b J_b V (one JVP, one loss-HVP and one
  VJP per vector), and the exact diagonal of G, computed once and kept;
- :class:`ResidualOperator`: R·V, the Hessian of θ ↦ (1/N) Σₙ rₙᵀ f(xₙ; θ) with
  rₙ = ∇_f ℓₙ held fixed: one fused forward-over-reverse product per vector.

Estimators act on these operators (``objective.hessian``, ``objective.ggn``,
``objective.residual``), on structured stacks ``{name: [K, *shape]}`` (:meth:`~CurvatureOperator.apply`),
on flat rows ``[K, P]`` (:meth:`~CurvatureOperator.rows`), or as a matrix on columns
(``operator @ M`` with ``M`` of shape ``[P]`` or ``[P, K]``, as curvlinops' operators).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .compat import double_backward_unsupported_reason, func_unsupported_reason
from .errors import ObjectiveError
from .types import ParamDict

if TYPE_CHECKING:
    from .objective import Objective


GGN_MEMORY_NUMBERS = 10_000_000
"""The exact GGN diagonal holds examples × C × P numbers at once; by default it vmaps
examples·P ≈ this many (64 examples for the digits MLP, 1 for ResNet-18)."""


class CurvatureOperator(ABC):
    """A symmetric P×P curvature matrix A of ``objective``, applied without forming it."""

    name: ClassVar[str]

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    @property
    def shape(self) -> tuple[int, int]:
        return self.objective.num_params, self.objective.num_params

    @abstractmethod
    def batch_product(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        """A_b·V for one batch's mean loss and a chunk of vectors ``{name: [k, *shape]}``."""

    def apply(self, vectors: ParamDict, chunk_size: int | None = None) -> ParamDict:
        """A·V for a stack ``{name: [K, *shape]}``, over all measured data in one pass;
        the vectors go through :meth:`batch_product` ``chunk_size`` at a time (default: the
        objective's), which bounds the activation memory."""
        return self.objective.accumulate(vectors, self.batch_product, chunk_size)

    def rows(self, vectors: Tensor) -> Tensor:
        """Flat stacks: ``[K, P]`` → ``[K, P]``, row i = A·vᵢ (parameters in ``named_parameters()`` order)."""
        objective = self.objective
        return objective.flatten(self.apply(objective.unflatten(vectors)))

    def __matmul__(self, matrix: Tensor) -> Tensor:
        """A·M for ``M`` of shape ``[P]`` or ``[P, K]``."""
        if matrix.dim() == 1:
            return self.rows(matrix.unsqueeze(0))[0]
        return self.rows(matrix.T.contiguous()).T


class HessianOperator(CurvatureOperator):
    """H = ∇²L(θ), on the route the objective's ``hvp_route`` selects (:meth:`batch_product`)."""

    name = "hessian"

    def batch_product(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        """H_b·V for one batch's mean loss ℓ̄_b and a chunk of probes ``{name: [k, *shape]}``.

        Two routes give the same product up to rounding: ``"func"``, ``vmap(jvp(grad))``
        (forward-over-reverse, the chunk's tangents batched), and ``"autograd"``, double
        backward sharing one ``create_graph`` gradient among the chunk's probes. The
        route is fixed, never chosen by timing, so the same inputs and seed give the same
        bits in every run:

        - ``"auto"`` (default) runs ``"func"``: on 2 CPU cores about 10× faster than
          double backward on a small MLP, where per-call overhead dominates, and within
          about 1.3× of it (either way) on ResNet-18 (``docs/benchmarks.md``); no model
          property we know of predicts double backward to win clearly, so there is no
          second rule. Only when torch.func refuses the model with one of the errors of
          :data:`hessdiag.compat.FUNC_UNSUPPORTED_MESSAGES` (an operator without a
          forward-mode derivative or batching rule, a custom ``autograd.Function``
          without ``jvp``, a buffer written in forward, ...) does it switch to
          ``"autograd"`` for good, with one ``RuntimeWarning`` naming the reason, kept
          in the objective's ``hvp_fallback``. Any other error, out-of-memory included,
          propagates.
        - ``"func"``: torch.func only; a model it refuses is an :class:`ObjectiveError`.
        - ``"autograd"``: double backward only.

        A model that double backward cannot differentiate twice either (an operator
        without a second derivative) is an :class:`ObjectiveError` naming the operator.
        The route that ran is recorded in the objective's ``hvp_route_used``.
        """
        objective = self.objective
        if objective.hvp_route == "autograd" or objective.hvp_fallback is not None:
            return self._double_backward(chunk, x, y)
        try:
            product = self._func_product(chunk, x, y)
        except (RuntimeError, NotImplementedError) as err:
            reason = func_unsupported_reason(err)
            if reason is None:
                raise
            if objective.hvp_route == "func":
                raise ObjectiveError(
                    f"hvp_route 'func': torch.func cannot differentiate this model ({reason[:160]}); "
                    "use hvp_route 'auto' or 'autograd'"
                ) from err
            self._fall_back(reason)
            return self._double_backward(chunk, x, y)
        objective.hvp_route_used = "func"
        return product

    def _fall_back(self, reason: str) -> None:
        warnings.warn(
            f"torch.func HVPs are not supported for this model ({reason[:160]}); "
            "falling back to double backward",
            RuntimeWarning,
            stacklevel=6,
        )
        self.objective.hvp_fallback = reason

    def _double_backward(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        objective = self.objective
        try:
            product = self._autograd_product(chunk, x, y)
        except (RuntimeError, NotImplementedError) as err:
            reason = double_backward_unsupported_reason(err)
            if reason is None:
                raise
            func = f"; torch.func: {objective.hvp_fallback[:120]}" if objective.hvp_fallback else ""
            raise ObjectiveError(
                f"this model cannot be differentiated twice (double backward: {reason[:160]}{func})"
            ) from err
        objective.hvp_route_used = "autograd"
        return product

    def _func_product(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        objective = self.objective
        gradient: Callable[[ParamDict], ParamDict] = grad(lambda p: objective.batch_loss(p, x, y))

        def single(v: ParamDict) -> ParamDict:
            return jvp(gradient, (objective.params,), (v,))[1]

        return vmap(single)(chunk)

    def _autograd_product(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        objective = self.objective
        params = {k: p.detach().requires_grad_(True) for k, p in objective.params.items()}
        names = list(params)
        with torch.enable_grad():
            g = torch.autograd.grad(objective.batch_loss(params, x, y), [params[k] for k in names],
                                    create_graph=True)
            num = chunk[names[0]].shape[0]
            rows = []
            for i in range(num):
                hv = torch.autograd.grad(g, [params[k] for k in names],
                                         grad_outputs=[chunk[k][i] for k in names],
                                         retain_graph=i < num - 1, allow_unused=True)
                rows.append([torch.zeros_like(params[k]) if h is None else h.detach()
                             for k, h in zip(names, hv)])
        return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


class _ForwardModeOperator(CurvatureOperator):
    """G and R: products with no double-backward route, so they record ``"func"``."""

    def apply(self, vectors: ParamDict, chunk_size: int | None = None) -> ParamDict:
        product = super().apply(vectors, chunk_size)
        self.objective.hvp_route_used = "func"
        return product


class GGNOperator(_ForwardModeOperator):
    """G = (1/N) Σₙ Jₙᵀ Λₙ Jₙ, Λₙ = ∇²_f ℓₙ (:mod:`hessdiag.losses`); and its exact diagonal.

    The exact diagonal is computed at most once per objective (:meth:`diagonal`) and kept,
    so the GGN/residual split and the estimators that use it (``hutchinson-ggn``, the
    residual statistics of every probe estimator) share it; an estimator that obtains it
    as a by-product (the analytic MLP recursion) hands it over with :meth:`remember`.
    """

    name = "ggn"

    def __init__(self, objective: Objective) -> None:
        super().__init__(objective)
        self._diagonal: ParamDict | None = None
        self.diagonal_method: str | None = None

    def batch_product(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        objective = self.objective
        output, pullback = vjp(lambda p: objective.forward(p, x), objective.params)  # type: ignore[misc]
        loss_grad = grad(lambda o: objective.loss.batch_mean(o, y))

        def single(v: ParamDict) -> ParamDict:
            jv = jvp(lambda p: objective.forward(p, x), (objective.params,), (v,))[1]
            return pullback(jvp(loss_grad, (output,), (jv,))[1])[0]

        return vmap(single)(chunk)

    @property
    def known_diagonal(self) -> ParamDict | None:
        """diag G if it has been computed or handed over, else ``None`` (nothing is computed)."""
        return self._diagonal

    def diagonal(self) -> ParamDict:
        """The exact diag G ``{name: Tensor}``, by the cheapest route the model allows
        (:func:`hessdiag.ggn.ggn_diagonal`; the route in :attr:`diagonal_method`), once."""
        if self._diagonal is None:
            from .ggn import ggn_diagonal

            diagonal, method = ggn_diagonal(self.objective)
            self.remember(diagonal, method)
        assert self._diagonal is not None
        return self._diagonal

    def flat(self, diagonal: ParamDict) -> Tensor:
        """A diagonal ``{name: Tensor}`` as one flat ``[P]`` vector in the objective's dtype."""
        objective = self.objective
        return objective.flatten({k: diagonal[k].to(objective.dtype).unsqueeze(0) for k in objective.numels})[0]

    def remember(self, diagonal: ParamDict, method: str) -> None:
        """Keep an exact diag G that was computed elsewhere (``method`` says how)."""
        self._diagonal, self.diagonal_method = diagonal, method

    def per_example_diagonal(self, examples_per_chunk: int | None = None) -> ParamDict:
        """Exact diag(G) = (1/N) Σₙ Σ_ρ (Jₙᵀ q_{n,ρ})², q_{n,ρ} the columns of Qₙ, by torch.func.

        One VJP per example and column of the loss factor Qₙ (C per example), vmapped over
        examples in chunks of ``examples_per_chunk`` (default: sized by
        :data:`GGN_MEMORY_NUMBERS`); memory O(examples_per_chunk · C · P). Works for any
        model torch.func can differentiate (BatchNorm in eval mode included).
        """
        from .objective import evaluation_mode

        objective = self.objective
        if examples_per_chunk is None:
            examples_per_chunk = max(1, min(64, GGN_MEMORY_NUMBERS // objective.num_params))
        total = {n: torch.zeros_like(p) for n, p in objective.params.items()}

        def per_example(xi: Tensor, factor: Tensor) -> ParamDict:
            out, pullback = vjp(lambda p: objective.forward(p, xi.unsqueeze(0))[0],  # type: ignore[misc]
                                objective.params)
            cotangents = factor.transpose(0, 1).reshape(factor.shape[1], *out.shape)
            columns = vmap(pullback)(cotangents)[0]
            return {k: c.pow(2).sum(0) for k, c in columns.items()}

        with evaluation_mode(objective.model):
            for x, y, _ in objective.batches():
                for start in range(0, x.shape[0], examples_per_chunk):
                    xs, ys = x[start : start + examples_per_chunk], y[start : start + examples_per_chunk]
                    # The loss factors are formed per chunk outside vmap: a custom loss's
                    # autograd Hessian need not be vmappable.
                    with torch.no_grad():
                        factors = objective.loss.hessian_factors(objective.forward(objective.params, xs), ys)
                    part = vmap(per_example)(xs, factors)
                    for k in total:
                        total[k].add_(part[k].sum(0))
        objective.mean_over_examples(total)  # adds the ranks' sums on several processes
        return total


class ResidualOperator(_ForwardModeOperator):
    """R = H − G in one fused product per vector (module docstring): the price of one HVP,
    not of an HVP plus a GGN-vector product."""

    name = "residual"

    def batch_product(self, chunk: ParamDict, x: Tensor, y: Tensor) -> ParamDict:
        objective = self.objective
        with torch.no_grad():
            output = objective.forward(objective.params, x)
        # ∇_f of the batch-mean loss: one per batch, shared by all probes of the chunk.
        weights = grad(lambda o: objective.loss.batch_mean(o, y))(output).detach()
        gradient = grad(lambda p: (objective.forward(p, x) * weights).sum())

        def single(v: ParamDict) -> ParamDict:
            return jvp(gradient, (objective.params,), (v,))[1]

        return vmap(single)(chunk)
