"""Exact Hessian diagonal from HVPs against basis vectors.

dᵢ = eᵢᵀ H eᵢ. The basis vectors are processed in blocks of ``block_size``: one block
is a stack ``E ∈ R^{k×P}`` of one-hot rows, H·E is formed by
:class:`~hessdiag.operators.HessianOperator` (vmapped forward-over-reverse, chunked), and
the k wanted entries are read off. Cost: P HVPs, i.e. about P/``block_size`` passes over
the data; memory: O(k·P) for the block plus the HVP chunk's activations.

Fast path: for an MLP that :mod:`hessdiag.analytic` supports (``nn.Sequential`` of Linear
layers and closed-form activations), the diagonal comes from the exact pre-activation-Hessian
recursion of docs/appendix.md in one data pass, no HVPs, and with the exact GGN diagonal as a
by-product, handed to ``objective.ggn`` (:meth:`~hessdiag.operators.GGNOperator.remember`).

Piecewise-linear path: for a network that is affine in each parameter with only
piecewise-linear nonlinearities (ReLU, max pooling, BatchNorm in eval mode, residual adds;
:mod:`hessdiag.structure`), diag H = diag GGN exactly, computed with C backward passes per
batch (:func:`hessdiag.curvature_tape.tape_ggn_diagonal`) for a network of any size (also
handed to ``objective.ggn``).

``info["method"]`` says which path ran (``"analytic-mlp"``, ``"piecewise-linear: …"`` or
``"basis-hvp"``). The parameter budget applies to the HVP path only.

Refusal. Above the budget the HVP path refuses at once, in one line, with a time
estimate that runs no HVP at all (:meth:`ExactEstimator.estimated_seconds`): the cost
model below, timed on plain gradients of at most 64 examples of the first batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..analytic import UnsupportedModelError, mlp_decomposition, supported_structure
from ..curvature_tape import TapeError, tape_ggn_diagonal
from ..objective import Objective, evaluation_mode
from ..types import DiagonalEstimate
from .base import Estimator, EstimatorError, require_positive_integers
from .structural import objective_structure

DEFAULT_MAX_PARAMS = 8_000
"""About a minute on 2 CPU cores over the 1797 digits examples (measured: the 5,962-parameter
digits MLP takes 46 s in float64; the cost grows like P² for a fixed architecture family)."""

HVP_GRADIENTS = 1.0
"""Cost model: the basis-HVP run costs about this many plain gradients (forward +
backward) per basis vector and example. One HVP costs more than one gradient, but the
vectorized blocks share work across probes. Measured on 2 CPU cores, the run's time over
P·N·g (g: the gradient's time per example, timed as in ``estimated_seconds``) is
0.9-1.1 for small CNNs on the digits data (blocks of 128 probes, batches of 512); for
ResNet-18 on CIFAR-sized inputs about 0.6-1.0 (docs/benchmarks.md: 43-51 ms per probe and
example in chunks of 16, against g = 50-80 ms)."""

TIMING_SECONDS = (0.05, 1.0)
"""The timed gradient's batch doubles (1, 2, 4, ... examples) while its time stays
overhead-bound, i.e. until a call takes at least the first value and doubling m has at
least 1.6× its time, or a call takes the second value: per-call overhead is then
amortized as in a real run, and large models stop after one or two examples."""

TIMING_EXAMPLES = 64
"""At most this many examples (and never more than the first batch) in a timed gradient."""


def _format_seconds(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@dataclass(kw_only=True, eq=False)
class ExactEstimator(Estimator):
    """``exact``: the analytic MLP path, the piecewise-linear path, else P basis-vector HVPs;
    exact up to float rounding (use float64).

    Attributes (constructor keywords):
        analytic: take the MLP fast path where it applies (``False``: never).
        structural: take the piecewise-linear path where it applies (``False``: never;
            basis-vector HVPs for every model when both are off).
        max_params: the HVP path's parameter budget (``None``: :data:`DEFAULT_MAX_PARAMS`).
        force: run the HVP path above the budget.
        block_size: basis vectors per pass over the data (memory: block × P numbers).
    """

    name = "exact"
    exact = True
    supports_distributed = True

    analytic: bool = True
    structural: bool = True
    max_params: int | None = None
    force: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        require_positive_integers(self.name, max_params=self.max_params, block_size=self.block_size)

    def estimate(
        self, objective: Objective
    ) -> DiagonalEstimate:
        if self.analytic:
            structure = supported_structure(objective.model)
            if structure is not None:
                try:
                    dec = mlp_decomposition(objective, structure=structure)
                except UnsupportedModelError:  # e.g. inputs that are not [batch, features]
                    pass
                else:
                    objective.ggn.remember(dec.ggn, "analytic-mlp")
                    return DiagonalEstimate(diagonal=dec.diagonal, hvps=0, info={"method": "analytic-mlp"})
        if self.structural and objective_structure(objective).kind == "piecewise-linear":
            try:
                ggn = tape_ggn_diagonal(objective)
            except TapeError:  # a layer the per-example rules cannot follow
                pass
            else:
                method = "piecewise-linear: diag H = diag GGN"
                objective.ggn.remember(ggn, method)
                return DiagonalEstimate(diagonal=ggn, hvps=0, info={"method": method})
        return self._basis_hvps(objective)

    def _basis_hvps(self, objective: Objective) -> DiagonalEstimate:
        num = objective.num_params
        budget = self.max_params or DEFAULT_MAX_PARAMS
        if num > budget and not self.force:
            raise EstimatorError(self.refusal(objective, budget))
        diagonal = torch.empty(num, dtype=objective.dtype, device=objective.device)
        for start in range(0, num, self.block_size):
            idx = torch.arange(start, min(start + self.block_size, num), device=objective.device)
            diagonal[idx] = self._block(objective, idx)
        unflat = objective.unflatten(diagonal.unsqueeze(0))
        return DiagonalEstimate(diagonal={k: v[0] for k, v in unflat.items()}, hvps=num,
                                info={"method": "basis-hvp"})

    def _block(self, objective: Objective, idx: torch.Tensor) -> torch.Tensor:
        basis = torch.zeros(len(idx), objective.num_params, dtype=objective.dtype,
                            device=objective.device)
        rows = torch.arange(len(idx), device=objective.device)
        basis[rows, idx] = 1.0
        # One data pass per block; inside it the objective's chunk_size bounds how many
        # probes go through one vmapped call (memory: chunk × batch activations).
        hv = objective.flatten(objective.hessian.apply(objective.unflatten(basis)))
        return hv[rows, idx]

    def refusal(self, objective: Objective, budget: int) -> str:
        """The one-line refusal above ``budget``: cost in HVPs, a time estimate, the way out."""
        num = objective.num_params
        examples, qualifier = _num_examples(objective)
        cost = f"{num:,} HVPs over {qualifier}{examples:,} examples"
        seconds = self.estimated_seconds(objective)
        if seconds is not None:
            cost = f"estimated {_format_seconds(seconds)}: {cost}"
        return (f"exact: {num:,} parameters exceed the budget of {budget:,} ({cost}); "
                "use the hutchinson estimator, or force it (--force / force=True)")

    def estimated_seconds(self, objective: Objective) -> float | None:
        """Rough wall time of the basis-HVP run, from a cost model; runs no HVP.

        The run costs P HVPs over all N examples; with the vectorized blocks that is
        about :data:`HVP_GRADIENTS` plain gradients per basis vector and example, so

            seconds ≈ HVP_GRADIENTS · P · N · g,

        where g is the gradient's time per example, measured on the first m examples of
        the first batch, m = 1, 2, 4, ... doubling as :data:`TIMING_SECONDS` says, up to
        :data:`TIMING_EXAMPLES` or the batch size (the faster of two calls at each m,
        after a warm-up call). Memory is that of one gradient on m examples. Read the
        result as an order of magnitude: the ratio of the real run to P·N·g varies by
        about 2× between models, and a busy machine inflates g. ``None`` if the gradient
        fails.
        """
        x, y, _ = next(objective.batches())
        try:
            per_example = _gradient_seconds_per_example(objective, x, y)
        except (RuntimeError, NotImplementedError):
            return None
        examples, _ = _num_examples(objective)
        # Ranks measuring together split the examples (docs/scaling.md).
        return HVP_GRADIENTS * objective.num_params * examples * per_example / objective.world.size


def _num_examples(objective: Objective) -> tuple[int, str]:
    """N and how sure it is (``""``, ``"about "``, ``"at least "``), without a data pass.

    Known after any full pass (``measure`` validates the data first); otherwise the first
    batch's size times the number of batches, or the first batch alone for data without
    a length.
    """
    if objective.num_examples is not None:
        return objective.num_examples, ""
    first = int(next(objective.batches())[0].shape[0])
    try:
        return first * len(objective.data), "about "
    except TypeError:
        return first, "at least "


def _gradient_seconds_per_example(objective: Objective, x: Tensor, y: Tensor) -> float:
    """Seconds per example of a plain gradient of the batch loss (see ``estimated_seconds``)."""
    params = {k: v.detach().requires_grad_(True) for k, v in objective.params.items()}

    def run(m: int) -> float:
        if objective.device.type == "cuda":
            torch.cuda.synchronize(objective.device)
        start = time.perf_counter()
        loss = objective.batch_loss(params, x[:m], y[:m])
        torch.autograd.grad(loss, list(params.values()))
        if objective.device.type == "cuda":
            torch.cuda.synchronize(objective.device)
        return time.perf_counter() - start

    limit = max(1, min(TIMING_EXAMPLES, int(x.shape[0])))
    enough, too_long = TIMING_SECONDS
    with evaluation_mode(objective.model):
        run(1)  # warm-up: first-call costs (allocator, kernel selection)
        m, previous = 1, math.inf
        while True:
            seconds = min(run(m), run(m))
            linear = seconds >= enough and seconds >= 1.6 * previous
            if linear or seconds >= too_long or m >= limit:
                return seconds / m
            m, previous = min(2 * m, limit), seconds
