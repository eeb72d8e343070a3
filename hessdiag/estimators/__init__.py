"""Estimators of the loss-Hessian diagonal, by name or as objects (docs/index.md, "Estimators").

The registry :data:`ESTIMATORS` maps names to classes; :func:`register_estimator` adds a
user-defined :class:`Estimator` subclass, and installed packages can add theirs through the
``hessdiag.estimators`` entry-point group (loaded when their name is first asked for).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ..errors import first_line
from ..types import DiagonalEstimate, NormStatistics
from .base import OPTION_NAMES, Estimator, EstimatorError, EstimatorOptions, StochasticEstimator
from .auto import AutoEstimator, select_estimator
from .backpack import BackpackEstimator
from .curvprop import CurvpropEstimator
from .exact import ExactEstimator
from .ggn_cv import GGNHutchinsonEstimator
from .hutchinson import PlainHutchinsonEstimator, ProbeEstimator
from .lowrank import LowRankHutchinsonEstimator

HutchinsonEstimator = LowRankHutchinsonEstimator
"""``hutchinson``: the default stochastic estimator, chosen by benchmarks/accuracy.py."""

ENTRY_POINT_GROUP = "hessdiag.estimators"
"""Packages register estimators under this entry-point group: ``name = "pkg.module:Class"``."""

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (AutoEstimator, ExactEstimator, BackpackEstimator, HutchinsonEstimator,
                PlainHutchinsonEstimator, GGNHutchinsonEstimator, CurvpropEstimator)
}
"""Name → class of every estimator usable by name (built in, or registered)."""


def _check_estimator_class(cls: object) -> None:
    """An :class:`Estimator` subclass with a string ``name`` and a boolean ``exact``."""
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise EstimatorError(f"an estimator must be a subclass of hessdiag.estimators.Estimator, got {cls!r}")
    if not isinstance(getattr(cls, "exact", None), bool):
        raise EstimatorError(f"estimator class {cls.__name__} must set the class attribute "
                             "exact = True (no sampling error) or False (stochastic)")


def register_estimator(name: str, cls: type[Estimator], *, replace: bool = False) -> type[Estimator]:
    """Make ``cls`` available by ``name``: ``measure(..., estimator=name)``, ``--estimator name``.

    ``cls`` is an :class:`Estimator` subclass that sets ``exact`` and implements
    ``estimate``; its ``name`` is set to ``name`` when it has none, and must equal ``name``
    otherwise (results report an estimator by its class's ``name``). By name it is built
    with :meth:`Estimator.from_options`: of ``measure``'s ``samples``, ``rtol``,
    ``max_samples``, ``seed``, ``max_params`` and ``force`` it receives those its
    constructor has a keyword for.

    Registering another class under a name already taken raises :class:`EstimatorError`
    unless ``replace=True``; registering the same class again does nothing. Returns ``cls``.
    For the command line, register in a package's ``hessdiag.estimators`` entry points
    (:data:`ENTRY_POINT_GROUP`), or call this before :func:`hessdiag.cli.main`.
    """
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise EstimatorError(f"an estimator name must be a non-empty string without commas "
                             f"or surrounding spaces, got {name!r}")
    _check_estimator_class(cls)
    own = getattr(cls, "name", None)
    if own is None:
        cls.name = name
    elif own != name:
        raise EstimatorError(f"{cls.__name__}.name is {own!r}; register it under that name, "
                             f"or give the class name = {name!r}")
    taken = ESTIMATORS.get(name)
    if taken is not None and taken is not cls and not replace:
        raise EstimatorError(f"an estimator named {name!r} is registered already "
                             f"({taken.__module__}.{taken.__qualname__}); pass replace=True to replace it")
    ESTIMATORS[name] = cls
    return cls


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def estimator_names() -> list[str]:
    """Every name :func:`get_estimator` accepts: registered ones and entry points (not loaded)."""
    return sorted(set(ESTIMATORS) | set(_entry_points()))


def estimator_class(name: str) -> type[Estimator]:
    """The class registered under ``name``, loading an entry point of that name if need be."""
    if name not in ESTIMATORS:
        point = _entry_points().get(name)
        if point is None:
            raise EstimatorError(f"unknown estimator {name!r}; choose one of {', '.join(estimator_names())}")
        try:
            loaded = point.load()
        except Exception as err:  # noqa: BLE001 - a plugin failing to import is reported, not raised
            raise EstimatorError(f"estimator {name!r} ({ENTRY_POINT_GROUP} entry point {point.value}) "
                                 f"failed to load: {first_line(err, with_type=True)}") from None
        register_estimator(name, loaded)
    return ESTIMATORS[name]


def get_estimator(name: str, options: EstimatorOptions | None = None) -> Estimator:
    """Instantiate the estimator registered under ``name`` with ``measure``'s ``options``."""
    return estimator_class(name).from_options(options)


def resolve_estimator(estimator: str | Estimator, given: dict[str, Any]) -> Estimator:
    """The estimator :func:`hessdiag.measure` runs, from a name or an object.

    ``given``: the estimator options passed to ``measure`` (``None`` = not given), keyed by
    :data:`~hessdiag.estimators.base.OPTION_NAMES`. By name they build the estimator,
    defaults filling the gaps, exactly as :class:`EstimatorOptions`. An object carries its
    own options: one given to ``measure`` as well must equal the object's attribute of the
    same name, and one the object does not have is refused (by name it would be ignored
    silently), except ``seed``, which also seeds ``extras``. Every disagreement is listed
    in one :class:`EstimatorError`.
    """
    unknown = set(given) - set(OPTION_NAMES)
    if unknown:  # a programming error in the caller, not user input
        raise TypeError(f"not estimator options: {', '.join(sorted(unknown))}")
    stated = {k: v for k, v in given.items() if v is not None}
    if isinstance(estimator, str):
        return get_estimator(estimator, EstimatorOptions(**stated))
    if isinstance(estimator, type) and issubclass(estimator, Estimator):
        raise EstimatorError(f"estimator: pass an instance, {estimator.__name__}(...), or a name, "
                             "not the class")
    if not isinstance(estimator, Estimator):
        raise EstimatorError(f"estimator must be a name or an Estimator object, got {type(estimator).__name__}")
    _check_estimator_class(type(estimator))
    missing = object()
    conflicts = []
    for option, value in stated.items():
        own = getattr(estimator, option, missing)
        if own is missing and option != "seed":
            conflicts.append(f"{option}={value!r} (it takes no {option})")
        elif own is not missing and own != value:
            conflicts.append(f"{option}={value!r} (it has {option}={own!r})")
    if conflicts:
        raise EstimatorError(
            f"measure() options conflict with the estimator object {type(estimator).__name__}: "
            f"{'; '.join(conflicts)}; an estimator object carries its own options, so pass them "
            "to its constructor and leave them out of measure()")
    return estimator


__all__ = [
    "ENTRY_POINT_GROUP",
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
    "ProbeEstimator",
    "StochasticEstimator",
    "estimator_class",
    "estimator_names",
    "get_estimator",
    "register_estimator",
    "resolve_estimator",
    "select_estimator",
]
