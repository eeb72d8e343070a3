"""Estimators of the loss-Hessian diagonal, chosen by name (docs/index.md, "Estimators")."""

from __future__ import annotations

from .base import (
    DiagonalEstimate,
    Estimator,
    EstimatorError,
    EstimatorOptions,
    NormStatistics,
)
from .auto import AutoEstimator, select_estimator
from .backpack import BackpackEstimator
from .curvprop import CurvpropEstimator
from .exact import ExactEstimator
from .ggn_cv import GGNHutchinsonEstimator
from .hutchinson import PlainHutchinsonEstimator
from .lowrank import LowRankHutchinsonEstimator

HutchinsonEstimator = LowRankHutchinsonEstimator
"""``hutchinson``: the default stochastic estimator, chosen by benchmarks/accuracy.py."""


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (AutoEstimator, ExactEstimator, BackpackEstimator, HutchinsonEstimator,
                PlainHutchinsonEstimator, GGNHutchinsonEstimator, CurvpropEstimator)
}


def get_estimator(name: str, options: EstimatorOptions | None = None) -> Estimator:
    """Instantiate the estimator registered under ``name``."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise EstimatorError(
            f"unknown estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}"
        ) from None
    return cls(options)


__all__ = [
    "ESTIMATORS",
    "AutoEstimator",
    "BackpackEstimator",
    "CurvpropEstimator",
    "DiagonalEstimate",
    "Estimator",
    "EstimatorError",
    "EstimatorOptions",
    "ExactEstimator",
    "GGNHutchinsonEstimator",
    "HutchinsonEstimator",
    "LowRankHutchinsonEstimator",
    "PlainHutchinsonEstimator",
    "NormStatistics",
    "get_estimator",
    "select_estimator",
]
