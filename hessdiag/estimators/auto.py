"""``auto``: the cheapest route to the Hessian diagonal that the model's structure allows.

In order (docs/index.md, "Estimators"):

1. ``exact`` when it is exact at a price independent of the Hessian's size: an MLP the
   analytic recursion supports, or a piecewise-linear network (diag H = diag GGN);
2. ``exact`` by basis Hessian-vector products when P ≤ :data:`AUTO_EXACT_MAX_PARAMS`;
3. ``hutchinson`` otherwise.

``curvprop`` is not chosen automatically, although it applies to every network of smooth
elementwise activations: on trained smooth ResNet-18s (docs/benchmarks.md, "curvprop"),
with its stem probed per example, its interval was level with ``hutchinson``'s at equal
wall time on 128 examples (width 16) and 1.3–2.7× narrower on 512 (9.5× for RCT-AF at
width 32), while on a shallow digits CNN it was clearly the better one; on the width-16
ResNet with 128 examples the spread over ten seeds was 1.33× what its intervals claimed.
Until its advantage and its coverage hold on few examples too, and its memory on wide
networks with large batches is measured, it is available by name.

The chosen estimator's name and the reason are recorded in the result (``estimator``,
``selection``).
"""

from __future__ import annotations

from dataclasses import dataclass


from ..analytic import supported_structure
from ..objective import Objective
from ..types import DiagonalEstimate
from .base import Estimator, EstimatorOptions
from .exact import ExactEstimator
from .lowrank import LowRankHutchinsonEstimator
from .structural import objective_structure

AUTO_EXACT_MAX_PARAMS = 2_000
"""Basis HVPs cost P Hessian-vector products: at most this many, a few seconds on the
digits data here, is cheaper than any stochastic estimate of useful precision."""


def select_estimator(objective: Objective,
                     options: EstimatorOptions | None = None) -> tuple[Estimator, str]:
    """The estimator ``auto`` runs on ``objective``, built from ``options``, and why (one
    short sentence)."""
    exact = ExactEstimator.from_options
    hutchinson = LowRankHutchinsonEstimator.from_options
    if supported_structure(objective.model) is not None:
        return exact(options), "an MLP: exact analytic recursion"
    structure = objective_structure(objective)
    if structure.kind == "piecewise-linear":
        return exact(options), f"piecewise-linear network ({structure.reason}): exact"
    if objective.num_params <= AUTO_EXACT_MAX_PARAMS:
        return (exact(options),
                f"{objective.num_params:,} parameters ≤ {AUTO_EXACT_MAX_PARAMS:,}: exact")
    if structure.kind == "elementwise":
        return (hutchinson(options),
                f"{structure.reason}: hutchinson (curvprop applies too: --estimator curvprop)")
    return hutchinson(options), f"general network: {structure.reason}"


@dataclass(frozen=True, kw_only=True, eq=False)
class AutoEstimator(Estimator, EstimatorOptions):
    """``auto``: delegates to :func:`select_estimator`'s choice (module docstring).

    It takes every option of :class:`~hessdiag.estimators.base.EstimatorOptions` as a
    keyword (``AutoEstimator(samples=64, max_params=4000)``) and is one, so it hands them to
    whichever estimator it chooses, which takes those it has a keyword for.
    """

    name = "auto"
    exact = False
    supports_distributed = True

    def estimate(
        self, objective: Objective
    ) -> DiagonalEstimate:
        chosen, why = select_estimator(objective, self)
        estimate = chosen.estimate(objective)
        estimate.info["selected"] = chosen.name
        estimate.info["selection"] = why
        return estimate
