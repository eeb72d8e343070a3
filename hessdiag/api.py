"""The Python API a notebook uses (docs/index.md): ``measure`` and ``hessian_diagonal``."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .assembly import assemble_result, probes_for_rtol
from .compat import twice_differentiable
from .distributed import FINGERPRINT_SIZE, DistributedError, World, fingerprint, joined_world
from .errors import HessdiagError
from .estimators import AutoEstimator, Estimator, EstimatorOptions, resolve_estimator, select_estimator
from .estimators.curvprop import CurvpropEstimator
from .estimators.hutchinson import ProbeEstimator
from .extras import compute_extras, parse_extras
from .ggn import split_diagonal
from .losses import LossSpec
from .objective import Objective
from .progress import Progress, ProgressBatches
from .result import Result, RtolBudget, UnresolvedEstimateWarning
from .selection import ParamSpec
from .validation import check_device, validate_objective

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class NonFiniteHessianError(HessdiagError):
    """NaN or Inf appeared in the estimated diagonal."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept ``torch.float64`` or ``"float64"`` (or ``None``: the model's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise HessdiagError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def measure(
    model: nn.Module,
    data: object,
    loss: LossSpec = "ce",
    estimator: str | Estimator = "auto",
    *,
    params: ParamSpec | None = None,
    samples: int | None = None,
    rtol: float | None = None,
    max_samples: int | None = None,
    seed: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = 512,
    chunk_size: int = 32,
    hvp_route: str = "auto",
    max_params: int | None = None,
    force: bool | None = None,
    checkpoint: str | None = None,
    split_ggn: bool = False,
    extras: str | Iterable[str] | None = None,
    keep_diagonal: bool = False,
    progress: Progress | None = None,
    distributed: bool | None = None,
    timeout: float | None = None,
) -> Result:
    """Measure diag(∇²L(θ)) of ``model`` on ``data`` and report its normalized norm.

    Args:
        model: the network; its parameters, ``.grad`` and train/eval flags are left as
            they were (the measurement runs on detached copies in eval mode).
        data: an ``(x, y)`` pair of tensors, a DataLoader, or an iterable of batches.
        loss: the per-example loss ℓ, averaged over examples (:mod:`hessdiag.losses`): a
            name — ``"ce"`` (cross-entropy), ``"nll"``, ``"bce"`` (with logits), ``"mse"``,
            ``"huber"`` (mean over outputs for the last three) —, a torch loss module
            (``nn.CrossEntropyLoss(label_smoothing=0.1, weight=w)``, recognized with its
            options), a :class:`~hessdiag.losses.Loss`, or any callable
            ``loss(output, target)`` returning the mean over the batch's examples (its
            Hessian in the outputs then comes from autograd; it must be convex there).
        estimator: a name from :data:`hessdiag.estimators.ESTIMATORS` (built in, or added by
            :func:`~hessdiag.estimators.register_estimator`), or an estimator object carrying
            its own options (``HutchinsonEstimator(samples=64)``, ``ExactEstimator(analytic=False)``).
            ``"auto"`` (the default) picks the cheapest route the model's structure allows
            (:mod:`hessdiag.estimators.auto`) and records which one ran and why
            (``Result.estimator``, ``Result.selection``).
        params: measure only these parameters: names, glob patterns on the dotted names of
            ``model.named_parameters()`` (``"layer4.*"``) or ``Parameter`` objects, mixed in
            a list (a single string is one pattern); default: every parameter with
            ``requires_grad=True``. The others are held fixed, so the diagonal is the
            selection's entries of the full one; P, the norms and the per-layer table refer
            to the selection (:mod:`hessdiag.selection`).
        samples, rtol, max_samples, seed: probe budget of stochastic estimators chosen by
            name (defaults: adaptive, 0.05, 1024, 0); ``seed`` also seeds ``extras``.
        dtype: compute dtype (``"float64"`` for reference-quality numbers).
        batch_size: batch size when ``data`` is a pair of tensors; does not change the
            result beyond float rounding.
        chunk_size: probes per vectorized HVP; bounds peak memory.
        hvp_route: how Hessian-vector products are formed: ``"auto"`` (default:
            ``vmap(jvp(grad))``, falling back to double backward, with one warning, only
            for a model torch.func refuses), ``"func"`` or ``"autograd"`` (double
            backward); see :meth:`hessdiag.operators.HessianOperator.batch_product`. The route that
            ran is reported in ``Result.hvp_route`` (``hvp_fallback``: why it fell back).
        max_params, force: parameter budget of exact estimators chosen by name.
            With an estimator object these six options belong to its constructor: any of
            them given here too must agree with the object's own value, and one it does not
            take is refused (``seed`` excepted, which then seeds ``extras`` only); a
            conflict is one :class:`~hessdiag.estimators.EstimatorError` naming them all.
        checkpoint: a label recorded in the result document.
        split_ggn: also compute the exact GGN diagonal d_GGN (BackPACK ``DiagGGNExact``
            where it can traverse the model, else torch.func; :mod:`hessdiag.ggn`) and
            report the normalized norms of d_GGN and d_res = d − d_GGN, in total and per
            layer. ``seconds`` includes this step. For a stochastic estimator d_GGN is
            computed before probing and the residual's normalized norm is unbiased, with a
            95 % interval (``residual_ci95``), from the same probes (no extra HVP).
        extras: context metrics from PyHessian (``pip install 'hessdiag[pyhessian]'``):
            ``"trace"`` (Hutchinson trace, ``trace:K`` probes, default 100) and
            ``"top-eig"`` (top eigenvalue(s), ``top-eig:K``), as a comma-separated string
            or a sequence; reported in ``Result.extras`` (:mod:`hessdiag.extras`).
        keep_diagonal: keep the diagonal itself in ``Result.diagonal`` (``{name: Tensor}``
            in the compute dtype; with ``split_ggn`` also ``ggn_diagonal`` and
            ``residual_diagonal``). Off by default, so that a result holds norms only and
            not P numbers (36 M for a WideResNet); :func:`hessian_diagonal` turns it on.
        progress: called with the number of examples of each batch processed (over all
            data passes; on several ranks, this rank's batches), e.g. a tqdm bar's ``update``.
        distributed: measure data-parallel over the ranks of ``torch.distributed``
            (docs/scaling.md): each rank takes a shard of ``data`` (a contiguous slice of a
            tensor pair; every K-th batch of a loader, which must then yield the same
            batches in the same order on every rank), all ranks draw the same probes and
            add their partial sums, and every rank returns the single-process result up
            to rounding, with ``world_size`` and ``examples_per_rank`` recorded. ``None``
            (default): when the caller has initialized a process group of several ranks,
            or runs under torchrun without one (a group is then created for this call and
            destroyed after it: gloo for a CPU ``device``, nccl with one GPU per rank from
            ``LOCAL_RANK`` for ``"cuda"``); ``True``: also from SLURM's variables (srun),
            and an error outside any launcher; ``False``: one process regardless. Every rank
            must pass the same model, options and data. ``extras`` do not run
            distributed; the ``curvprop`` estimator draws per-example signs per rank, so
            its numbers (not their distribution) depend on the number of ranks.
        timeout: seconds a collective waits for the other ranks (default
            :data:`hessdiag.distributed.DEFAULT_TIMEOUT_SECONDS`), for a process group this
            call creates; a failing rank stops the others within it.

    Every forward pass runs under :func:`hessdiag.compat.twice_differentiable`, so that
    Hardswish/Hardsigmoid (MobileNetV3), fused attention (``nn.TransformerEncoder``, ViTs,
    BERT) and LSTMs can be differentiated twice; the model itself is not modified.

    Unresolved estimates. When a stochastic estimate's total (or, with ``split_ggn``, the
    GGN residual's) 95 % interval is wider than ±50 % of it on the norm scale, or its
    unbiased squared norm is ≤ 0, ``Result.resolved`` (``residual_resolved``) is ``False``
    and an :class:`~hessdiag.result.UnresolvedEstimateWarning` says so in one line, with
    the budget the observed variance implies for ``rtol`` (``Result.rtol_budget``): the
    jackknife variance scales like 1/probes, so a relative half-width h after n probes
    implies n·(h/rtol)² probes (:func:`hessdiag.stats.probes_for_rtol`), plus the
    estimator's sketch HVPs.

    Raises:
        HessdiagError: bad input (see :mod:`hessdiag.validation`), checked before any
            Hessian-vector product; NonFiniteHessianError if NaN/Inf appear in the diagonal;
            on several ranks, :class:`~hessdiag.distributed.DistributedError` on every rank
            when any rank's input is bad or a rank stops.
    """
    with joined_world(distributed, device, timeout) as (world, device):
        return _measure(world, model, data, loss, estimator, params=params, samples=samples, rtol=rtol,
                        max_samples=max_samples, seed=seed, dtype=dtype, device=device,
                        batch_size=batch_size, chunk_size=chunk_size, hvp_route=hvp_route,
                        max_params=max_params, force=force, checkpoint=checkpoint, split_ggn=split_ggn,
                        extras=extras, keep_diagonal=keep_diagonal, progress=progress)


def _options_text(estimator: Estimator, **options: object) -> str:
    """The options every rank must share, as text (the estimator's own simple attributes)."""
    own = {k: v for k, v in sorted(getattr(estimator, "__dict__", {}).items())
           if isinstance(v, (int, float, str, bool, type(None)))}
    return f"{estimator.name} {own} {sorted(options.items())}"


def _prepare(
    world: World, model: nn.Module, data: object, loss: LossSpec, estimator: str | Estimator,
    estimator_options: dict[str, Any], objective_options: dict[str, Any], extras: str | Iterable[str] | None,
    split_ggn: bool,
) -> tuple[Estimator, Objective, list[int]]:
    """Every check that runs before any Hessian-vector product, and the objective.

    On several ranks each rank checks its own shard, then :meth:`World.agree` makes every
    rank's outcome known to all, so that bad input on one rank stops every rank with the
    same message instead of leaving the others waiting in a collective. Returns the
    estimator, the objective (N counted) and the examples of every rank.
    """
    failure: BaseException | None = None
    fingerprint_values = [0.0] * FINGERPRINT_SIZE
    try:
        chosen = resolve_estimator(estimator, estimator_options)
        if world.distributed and not chosen.supports_distributed:
            raise DistributedError(f"estimator {chosen.name!r} does not run on several processes (its class "
                                   "does not set supports_distributed = True); measure it in one process")
        check_device(objective_options["device"])
        if parse_extras(extras) and world.distributed:  # reject a bad request before any work
            raise DistributedError("extras (PyHessian's trace and top eigenvalue) do not run distributed; "
                                   "measure them in one process")
        objective = Objective(model, data, loss, world=world, **objective_options)
        with twice_differentiable():
            validate_objective(objective)
        if world.distributed:
            # Everything that decides which collectives run, and the numbers they add.
            shared = {k: v for k, v in objective_options.items() if k not in ("device", "params")}
            fingerprint_values = fingerprint(objective.params, _options_text(
                chosen, loss=objective.loss.describe(), extras=extras, split_ggn=split_ggn,
                selection=objective.selection,
                **shared, **estimator_options), objective.data.checksum)
    except Exception as err:  # noqa: BLE001 - reported to every rank, then raised everywhere
        if not world.distributed:
            raise
        failure = err
    counts = world.agree(failure, fingerprint_values, count=0 if failure else objective.shard_examples or 0)
    objective.num_examples = sum(counts)
    objective.settle_loss_weights()  # adds the ranks' label weights (a collective)
    return chosen, objective, counts


def _measure(
    world: World, model: nn.Module, data: object, loss: LossSpec, estimator: str | Estimator, *,
    params: ParamSpec | None, samples: int | None, rtol: float | None, max_samples: int | None,
    seed: int | None, dtype: torch.dtype | str | None, device: torch.device | str | None,
    batch_size: int | None, chunk_size: int, hvp_route: str, max_params: int | None, force: bool | None,
    checkpoint: str | None, split_ggn: bool, extras: str | Iterable[str] | None, keep_diagonal: bool,
    progress: Progress | None,
) -> Result:
    """:func:`measure` on this rank of ``world``."""
    chosen, objective, counts = _prepare(
        world, model, data, loss, estimator,
        dict(samples=samples, rtol=rtol, max_samples=max_samples, seed=seed, max_params=max_params, force=force),
        dict(dtype=resolve_dtype(dtype), device=device, batch_size=batch_size, chunk_size=chunk_size,
             hvp_route=hvp_route, params=params),
        extras, split_ggn)
    # The seed of extras: the one given, else the estimator's own (the same by name).
    seed = seed if seed is not None else getattr(chosen, "seed", EstimatorOptions.seed)
    with twice_differentiable():
        selection = None
        if isinstance(chosen, AutoEstimator):
            chosen, selection = select_estimator(objective, chosen)
        if progress is not None:
            objective.data = ProgressBatches(objective.data, progress)  # type: ignore[assignment]
        start = time.perf_counter()
        if split_ggn and not chosen.exact:
            # Before probing: the probes then also give the residual's unbiased norm and
            # interval (DiagonalEstimate.residual_statistics), and hutchinson-ggn reuses it.
            objective.ggn.diagonal()
        estimate = chosen.estimate(objective)
        for name, block in estimate.diagonal.items():
            if not bool(torch.isfinite(block).all()):
                raise NonFiniteHessianError(f"the Hessian diagonal of {name} contains NaN or Inf")
        split = split_diagonal(objective, estimate.diagonal) if split_ggn else None
        context = compute_extras(objective, extras, seed=seed, diagonal=estimate.diagonal)
        seconds = time.perf_counter() - start
    result = assemble_result(
        estimate,
        estimator=chosen.name,
        loss=objective.loss.describe(),
        num_examples=int(objective.num_examples or 0),
        dtype=objective.dtype,
        seconds=seconds,
        seed=None if chosen.exact else getattr(chosen, "seed", None),
        checkpoint=checkpoint,
        params=objective.selection,
        keep_diagonal=keep_diagonal,
        split=split,
        extras=context,
        selection=selection,
        hvp_route=objective.hvp_route_used,
        hvp_fallback=objective.hvp_fallback,
    )
    result.world_size, result.examples_per_rank = world.size, counts
    if isinstance(chosen, (ProbeEstimator, CurvpropEstimator)):
        probes = probes_for_rtol(result, chosen.rtol)
        if probes is not None and isinstance(chosen, ProbeEstimator):
            result.rtol_budget = RtolBudget(chosen.rtol, chosen.budget_for_probes(probes.probes),
                                            probes.at_least)
        elif probes is not None:
            result.rtol_budget = RtolBudget(chosen.rtol, probes.probes, probes.at_least, "replicates")
    message = result.resolution_warning()
    if message is not None and world.rank == 0:  # the ranks' results are the same: warn once
        warnings.warn(message, UnresolvedEstimateWarning, stacklevel=3)
    return result


def hessian_diagonal(
    model: nn.Module, data: object, loss: LossSpec = "ce", estimator: str | Estimator = "auto",
    **kwargs: Any,
) -> dict[str, Tensor]:
    """diag(∇²L(θ)) as ``{parameter name: Tensor[shape]}`` in the compute dtype; keyword
    arguments as in :func:`measure` (``params=`` selects the tensors returned)."""
    kwargs.pop("keep_diagonal", None)  # the diagonal is what this function returns
    diagonal = measure(model, data, loss, estimator, keep_diagonal=True, **kwargs).diagonal
    assert diagonal is not None  # kept on request
    return diagonal
