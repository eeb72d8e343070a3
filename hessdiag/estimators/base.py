"""One interface for every estimator of d = diag(∇²L(θ)).

An estimator is an object that carries its own options, given as keywords to its
constructor (``HutchinsonEstimator(samples=64, seed=1)``, ``ExactEstimator(analytic=False)``),
and maps an :class:`~hessdiag.objective.Objective` to a :class:`DiagonalEstimate`.
Estimators never load files or parse arguments; they only spend Hessian-vector products
(or, for exact ones, whatever their method needs) and report what they spent.

By name (``measure(model, data, estimator="hutchinson", samples=64)``) the options that
:func:`hessdiag.measure` takes for any estimator are collected in :class:`EstimatorOptions`,
and :meth:`Estimator.from_options` hands each estimator those its constructor has a keyword
for (``hutchinson`` takes the budget and the seed, ``exact`` the parameter budget).
"""

from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar


from ..errors import HessdiagError
from ..objective import Objective
from ..types import DiagonalEstimate


class EstimatorError(HessdiagError):
    """The estimator cannot (or refuses to) handle this model/objective; a user error."""


@dataclass(frozen=True)
class EstimatorOptions:
    """The estimator options of :func:`hessdiag.measure`, for an estimator chosen by name.

    Each estimator takes those its constructor has a keyword for
    (:meth:`Estimator.from_options`); ``auto`` keeps them all for the estimator it chooses.

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


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(EstimatorOptions))
"""The fields of :class:`EstimatorOptions`, i.e. the estimator options of ``measure``."""


def require_positive_integers(estimator: str, **values: object) -> None:
    """Raise :class:`EstimatorError` naming the first of ``values`` that is neither ``None``
    nor a positive integer (``True`` is not a count)."""
    for label, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EstimatorError(f"{estimator}: {label} must be a positive integer, got {value!r}")


class _EstimatorType(ABCMeta):
    """Also accepts the older form ``Cls(EstimatorOptions(...), **keywords)``.

    Before estimators took their own keywords, every constructor took one
    :class:`EstimatorOptions`; code written that way keeps working: the options become the
    keywords the class takes (:meth:`Estimator.from_options`), and explicit keywords win.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], EstimatorOptions):
            kwargs = {**cls.option_keywords(args[0]), **kwargs}  # type: ignore[attr-defined]
            args = args[1:]
        return super().__call__(*args, **kwargs)


class Estimator(metaclass=_EstimatorType):
    """Base class: subclasses set ``name`` and ``exact`` and implement :meth:`estimate`.

    Options are constructor keywords, stored as attributes of the same name (the built-in
    estimators are keyword-only dataclasses). An estimator to be used by name is added to
    the registry with :func:`hessdiag.estimators.register_estimator`.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    supports_distributed: ClassVar[bool] = False
    """Whether the estimate is right on several ranks (:mod:`hessdiag.distributed`): every
    sum over examples it forms goes through :meth:`Objective.hvp` (or another product of
    :class:`~hessdiag.objective.Objective`) or :meth:`Objective.mean_over_examples`, and its
    random draws are the same on every rank, or independent per rank where they are per
    example. ``False`` (the default for estimators defined elsewhere): refused on several ranks."""

    @classmethod
    def accepted_options(cls) -> tuple[str, ...]:
        """The :class:`EstimatorOptions` fields this class's constructor has a keyword for."""
        signature = inspect.signature(cls.__init__)
        return tuple(name for name in OPTION_NAMES if name in signature.parameters)

    @classmethod
    def option_keywords(cls, options: EstimatorOptions) -> dict[str, Any]:
        """``options`` as the keywords of this class's constructor (the others are dropped)."""
        return {name: getattr(options, name) for name in cls.accepted_options()}

    @classmethod
    def from_options(cls, options: EstimatorOptions | None = None) -> Estimator:
        """The estimator as ``measure(..., estimator=cls.name, **options)`` builds it."""
        return cls(**cls.option_keywords(options or EstimatorOptions()))

    @abstractmethod
    def estimate(
        self, objective: Objective
    ) -> DiagonalEstimate:
        """Estimate the Hessian diagonal of ``objective``, acting on its curvature operators
        ``objective.hessian``, ``objective.ggn`` and ``objective.residual``
        (:mod:`hessdiag.operators`).

        When the exact diag(GGN) is already known (``objective.ggn.known_diagonal``, as
        after ``split_ggn=True`` asked for it), a stochastic estimator also returns
        ``residual_statistics`` for d − diag(GGN) from the same probes, and one that needs
        diag(GGN) itself takes it from there instead of computing it again. An estimator
        that obtains diag(GGN) exactly as a by-product hands it over with
        ``objective.ggn.remember``.
        """


@dataclass(kw_only=True, eq=False)
class StochasticEstimator(Estimator):
    """The options every stochastic estimator takes (``hutchinson*``, ``curvprop``).

    Attributes:
        samples: a fixed budget (what it counts is the estimator's: HVPs, replicates);
            ``None``: stop adaptively at ``rtol``.
        rtol: target relative half-width of the 95 % interval of the normalized norm, in
            (0, 1).
        max_samples: the budget's cap when stopping adaptively.
        seed: seed of the random draws; the same seed gives the same bits.
    """

    exact: ClassVar[bool] = False

    samples: int | None = None
    rtol: float = 0.05
    max_samples: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked when the estimator is built, so a bad budget fails before any data pass.
        require_positive_integers(self.name, samples=self.samples, max_samples=self.max_samples)
        if self.samples is None and not 0 < self.rtol < 1:
            raise EstimatorError(f"rtol must lie in (0, 1), got {self.rtol}")

    @property
    def budget(self) -> int:
        """``samples``, or ``max_samples`` when stopping adaptively."""
        return self.samples if self.samples is not None else self.max_samples
