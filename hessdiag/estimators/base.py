"""One interface for every estimator of d = diag(∇²L(θ)).

An estimator is configured with :class:`EstimatorOptions` and maps an
:class:`~hessdiag.objective.Objective` to a :class:`DiagonalEstimate`. Estimators never
load files or parse arguments; they only spend Hessian-vector products (or, for exact
ones, whatever their method needs) and report what they spent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from ..errors import HessdiagError
from ..objective import Objective


class EstimatorError(HessdiagError):
    """The estimator cannot (or refuses to) handle this model/objective; a user error."""


@dataclass(frozen=True)
class EstimatorOptions:
    """Options shared by all estimators; each reads the ones that concern it.

    Attributes:
        samples: fixed number of probes (HVPs) for stochastic estimators; ``None`` means
            adaptive stopping at ``rtol``.
        rtol: target relative half-width of the 95 % interval of the normalized norm.
        max_samples: cap on probes when stopping adaptively.
        seed: seed of the probe generator (results are reproducible).
        max_params: parameter budget of exact estimators (``None``: estimator default).
        force: run an exact estimator above its budget.
    """

    samples: int | None = None
    rtol: float = 0.05
    max_samples: int = 1024
    seed: int = 0
    max_params: int | None = None
    force: bool = False


@dataclass(frozen=True)
class NormStatistics:
    """Estimate of a block's squared norm ‖d_block‖² with a 95 % interval on it.

    ``naive_sq_norm`` is ‖mean of probe estimates‖², reported for reference only.
    """

    sq_norm: float
    ci95: tuple[float, float]
    naive_sq_norm: float | None = None


@dataclass
class DiagonalEstimate:
    """What an estimator returns.

    Attributes:
        diagonal: point estimate of d, ``{name: Tensor[shape]}``.
        hvps: Hessian-vector products spent (one HVP = one vector through all data).
        samples: probes used by a stochastic estimator (``None`` for exact ones).
        norm_statistics: per block name and ``"total"``; ``None`` for exact estimators,
            whose norms follow from ``diagonal`` with a zero-width interval.
        residual_statistics: like ``norm_statistics`` for the residual d − diag(GGN),
            from the same probes; only when a stochastic estimator was given
            ``known_ggn`` (``None`` otherwise: exact residuals need no statistics).
    """

    diagonal: dict[str, Tensor]
    hvps: int
    samples: int | None = None
    norm_statistics: dict[str, NormStatistics] | None = None
    residual_statistics: dict[str, NormStatistics] | None = None
    info: dict[str, object] = field(default_factory=dict)


class Estimator(ABC):
    """Base class: subclasses set ``name`` and ``exact`` and implement :meth:`estimate`."""

    name: ClassVar[str]
    exact: ClassVar[bool]

    def __init__(self, options: EstimatorOptions | None = None) -> None:
        self.options = options or EstimatorOptions()

    @abstractmethod
    def estimate(
        self, objective: Objective, known_ggn: dict[str, Tensor] | None = None
    ) -> DiagonalEstimate:
        """Estimate the Hessian diagonal of ``objective``.

        ``known_ggn``: the exact diag(GGN) ``{name: Tensor}``, when the caller has it
        (``split_ggn=True``). A stochastic estimator then also returns
        ``residual_statistics`` for d − diag(GGN) from the same probes, and one that needs
        diag(GGN) itself uses it instead of computing it again. Exact estimators ignore it.
        """
