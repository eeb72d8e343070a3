"""Plain data that estimators produce and results are assembled from, with no behaviour.

Every layer reads these types (estimators write them, :mod:`hessdiag.assembly` turns them
into a :class:`~hessdiag.result.Result`), so they live apart from all of them and import
nothing of hessdiag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

ParamDict = dict[str, Tensor]


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
            from the same probes; only when the exact diag(GGN) was known before probing
            (``None`` otherwise: exact residuals need no statistics).
    """

    diagonal: dict[str, Tensor]
    hvps: int
    samples: int | None = None
    norm_statistics: dict[str, NormStatistics] | None = None
    residual_statistics: dict[str, NormStatistics] | None = None
    info: dict[str, object] = field(default_factory=dict)


class GGNSplit(NamedTuple):
    """d = ggn + residual, each ``{name: Tensor}``; ``method`` names how ggn was computed
    (``"backpack"``, ``"backpack-converter"`` or ``"func"``)."""

    ggn: ParamDict
    residual: ParamDict
    method: str
