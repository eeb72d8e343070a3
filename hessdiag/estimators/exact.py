"""Exact Hessian diagonal from HVPs against basis vectors.

dᵢ = eᵢᵀ H eᵢ. The basis vectors are processed in blocks of ``block_size``: one block
is a stack ``E ∈ R^{k×P}`` of one-hot rows, H·E is formed by
:meth:`~hessdiag.objective.Objective.hvp` (vmapped forward-over-reverse, chunked), and
the k wanted entries are read off. Cost: P HVPs, i.e. about P/``block_size`` passes over
the data; memory: O(k·P) for the block plus the HVP chunk's activations.

Fast path: for an MLP that :mod:`hessdiag.analytic` supports (``nn.Sequential`` of Linear
layers and closed-form activations), the diagonal comes from the exact pre-activation-Hessian
recursion of MATH.md §4.3 in one data pass, no HVPs, and with the GGN/residual split
(``info["ggn"]``, ``info["residual"]``).

Piecewise-linear path: for a network that is affine in each parameter with only
piecewise-linear nonlinearities (ReLU, max pooling, BatchNorm in eval mode, residual adds;
:mod:`hessdiag.structure`), diag H = diag GGN exactly, computed with C backward passes per
batch (:func:`hessdiag.curvature_tape.tape_ggn_diagonal`) for a network of any size.

``info["method"]`` says which path ran (``"analytic-mlp"``, ``"piecewise-linear: …"`` or
``"basis-hvp"``). The parameter budget applies to the HVP path only.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..analytic import UnsupportedModelError, mlp_decomposition, supported_structure
from ..curvature_tape import TapeError, tape_ggn_diagonal
from ..objective import Objective, evaluation_mode
from .base import DiagonalEstimate, Estimator, EstimatorError, EstimatorOptions
from .structural import objective_structure

DEFAULT_MAX_PARAMS = 8_000
"""About a minute on 2 CPU cores over the 1797 digits examples (measured: the 5,962-parameter
digits MLP takes 46 s in float64; the cost grows like P² for a fixed architecture family)."""


def _format_seconds(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


class ExactEstimator(Estimator):
    """``exact``: P basis-vector HVPs; exact up to float rounding (use float64)."""

    name = "exact"
    exact = True
    block_size = 128

    def __init__(self, options: EstimatorOptions | None = None, *, analytic: bool = True,
                 structural: bool = True) -> None:
        """``analytic=False`` disables the MLP fast path, ``structural=False`` the
        piecewise-linear one (basis-vector HVPs for every model when both are off)."""
        super().__init__(options)
        self.analytic = analytic
        self.structural = structural

    def estimate(
        self, objective: Objective, known_ggn: dict[str, Tensor] | None = None
    ) -> DiagonalEstimate:
        if self.analytic:
            structure = supported_structure(objective.model)
            if structure is not None:
                try:
                    dec = mlp_decomposition(objective, structure=structure)
                except UnsupportedModelError:  # e.g. inputs that are not [batch, features]
                    pass
                else:
                    return DiagonalEstimate(
                        diagonal=dec.diagonal, hvps=0,
                        info={"method": "analytic-mlp", "ggn": dec.ggn, "residual": dec.residual},
                    )
        if self.structural and objective_structure(objective).kind == "piecewise-linear":
            try:
                ggn = tape_ggn_diagonal(objective)
            except TapeError:  # a layer the per-example rules cannot follow
                pass
            else:
                return DiagonalEstimate(
                    diagonal=ggn, hvps=0,
                    info={"method": "piecewise-linear: diag H = diag GGN",
                          "ggn": ggn, "residual": {k: torch.zeros_like(v) for k, v in ggn.items()}},
                )
        return self._basis_hvps(objective)

    def _basis_hvps(self, objective: Objective) -> DiagonalEstimate:
        num = objective.num_params
        budget = self.options.max_params or DEFAULT_MAX_PARAMS
        if num > budget and not self.options.force:
            raise EstimatorError(
                f"exact: {num:,} parameters exceed the budget of {budget:,} "
                f"(estimated {_format_seconds(self.estimated_seconds(objective))}); "
                "use the hutchinson estimator, or force it (--force / force=True)"
            )
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
        # One vmapped call per block and batch: per-call overhead dominates small nets.
        hv = objective.flatten(objective.hvp(objective.unflatten(basis), chunk_size=len(idx)))
        return hv[rows, idx]

    def estimated_seconds(self, objective: Objective) -> float:
        """Wall time of the full run, extrapolated from one probe block on one batch.

        The block is run three times and the fastest of the last two timed: the first call of a torch.func
        transform pays one-off tracing costs many times larger than a steady-state call.
        """
        x, y, _ = next(objective.batches())  # one batch suffices for a rate
        probes = min(self.block_size, objective.num_params)
        vectors = objective.unflatten(
            torch.zeros(probes, objective.num_params, dtype=objective.dtype,
                        device=objective.device)
        )
        timings = []
        with evaluation_mode(objective.model):
            for _ in range(3):
                start = time.perf_counter()
                objective.batch_hvp(vectors, x, y)
                timings.append(time.perf_counter() - start)
        per_probe_batch = min(timings[1:]) / probes
        try:
            num_batches = len(objective.data)
        except TypeError:
            num_batches = 1
        return per_probe_batch * num_batches * objective.num_params
