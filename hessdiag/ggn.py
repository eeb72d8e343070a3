r"""The Gauss–Newton/residual split of the Hessian diagonal (docs/math.md), in one place.

By the chain rule, for L(θ) = (1/N) Σₙ ℓ(f(xₙ; θ), yₙ),

    ∇²L = (1/N) Σₙ Jₙᵀ Λₙ Jₙ  +  (1/N) Σₙ Σ_c rₙ,c ∇²_θ fₙ,c ,     rₙ = ∇_f ℓₙ, Λₙ = ∇²_f ℓₙ,
          └── GGN G (PSD) ──┘    └──── residual: where φ'' enters ────┘

so d = d_GGN + d_res with d_GGN = diag G ≥ 0. d_GGN is computed exactly; d_res = d − d_GGN
from whatever estimator produced d. For a stochastic d the entries of d_res carry the
probe noise (unbiased entrywise); its *norm* is not taken from them but from the
estimator's ``residual_statistics`` (unbiased, with an interval, same probes), for which
:func:`hessdiag.measure` hands d_GGN to the estimator before probing.

:func:`ggn_diagonal` dispatches the exact diag G:

- ``"backpack"``: BackPACK ``DiagGGNExact`` (one extended backward per batch) on an
  ``nn.Sequential`` copy, else through BackPACK's graph converter (ResNets: residual
  additions, BatchNorm in eval mode);
- ``"func"``: :meth:`hessdiag.operators.GGNOperator.per_example_diagonal` — per-example VJPs of the loss-Hessian factor
  with ``torch.func`` (any model torch.func can differentiate; C VJPs per example);
- ``"tape"``: C hooked backward passes per batch with per-example squared gradients
  (:func:`hessdiag.curvature_tape.tape_ggn_diagonal`), for networks whose parameters all
  sit in Linear/Conv/BatchNorm layers and whose other operations are known
  (:mod:`hessdiag.structure`: piecewise-linear or elementwise networks);
- ``"auto"`` (default): ``"tape"`` where the structure allows, else ``"backpack"`` where
  BackPACK can traverse the model, else ``"func"``.
"""

from __future__ import annotations

from typing import Literal

from .compat import func_unsupported_reason
from .errors import HessdiagError
from .objective import Objective, ParamDict
from .types import GGNSplit

GGNMethod = Literal["auto", "tape", "backpack", "func"]
GGN_METHODS: tuple[str, ...] = ("auto", "tape", "backpack", "func")


def ggn_diagonal(objective: Objective, method: GGNMethod = "auto") -> tuple[ParamDict, str]:
    """Exact diag of the generalized Gauss–Newton matrix of ``objective``.

    Returns ``(diagonal, used)`` where ``used`` is ``"tape"``, ``"backpack"``,
    ``"backpack-converter"`` or ``"func"``. With ``method="backpack"`` a model BackPACK cannot traverse raises
    :class:`~hessdiag.backpack_ext.BackpackUnsupportedError`.
    """
    if method not in GGN_METHODS:
        raise HessdiagError(f"unknown GGN method {method!r}; choose one of {', '.join(GGN_METHODS)}")
    if method == "func":
        return _func_ggn_diagonal(objective), "func"
    if method in ("auto", "tape"):
        from .curvature_tape import TapeError, tape_ggn_diagonal
        from .estimators.structural import objective_structure

        structure = objective_structure(objective)
        if structure.kind == "general" and method == "tape":
            raise HessdiagError(f"the hooked GGN diagonal does not apply: {structure.reason}")
        if structure.kind != "general":
            try:
                return tape_ggn_diagonal(objective), "tape"
            except TapeError as err:
                if method == "tape":
                    raise HessdiagError(f"the hooked GGN diagonal does not apply: {err}") from None
    from .backpack_ext import BackpackUnsupportedError, backpack_diagonal, check_traversable

    try:
        try:
            check_traversable(objective.model, "ggn")
        except BackpackUnsupportedError:
            return backpack_diagonal(objective, "ggn", use_converter=True), "backpack-converter"
        return backpack_diagonal(objective, "ggn"), "backpack"
    except BackpackUnsupportedError:
        if method == "backpack":
            raise
        return _func_ggn_diagonal(objective), "func"


def _func_ggn_diagonal(objective: Objective) -> ParamDict:
    """The per-example diag G (:meth:`~hessdiag.operators.GGNOperator.per_example_diagonal`),
    with torch.func's refusal turned into a user error."""
    try:
        return objective.ggn.per_example_diagonal()
    except (RuntimeError, NotImplementedError) as err:
        reason = func_unsupported_reason(err)  # anything else (out of memory, ...) propagates
        if reason is None:
            raise
        raise HessdiagError(
            "the exact GGN diagonal needs a model BackPACK can traverse or torch.func can "
            f"differentiate per example ({reason[:120]}); "
            "use an estimator without it (hutchinson, exact) and no --split-ggn"
        ) from None


def split_diagonal(objective: Objective, diagonal: ParamDict, method: GGNMethod = "auto") -> GGNSplit:
    """Split a Hessian diagonal of ``objective`` into its exact GGN part and the residual.

    With ``method="auto"`` diag G is the one ``objective.ggn`` holds
    (:meth:`hessdiag.operators.GGNOperator.diagonal`: computed once, or handed over by an
    estimator that had it as a by-product, as the analytic MLP path does).
    """
    if method == "auto":
        ggn, used = objective.ggn.diagonal(), str(objective.ggn.diagonal_method)
    else:
        ggn, used = ggn_diagonal(objective, method)
    residual = {name: diagonal[name] - ggn[name].to(diagonal[name].dtype) for name in diagonal}
    return GGNSplit(ggn={name: ggn[name] for name in diagonal}, residual=residual, method=used)
