r"""Context metrics from PyHessian: the Hessian trace and its top eigenvalues (optional extra).

For users who compare with the sharpness literature, ``extras=("trace", "top-eig")`` /
``--extras trace,top-eig`` reports, alongside the diagonal,

- ``trace``: tr H = E_v[vᵀHv] over Rademacher v (Hutchinson), with a fixed number of probes
  we choose (``trace:K``, default 100) and a normal 95 % interval mean ± 1.96·sd/√K.
  PyHessian's own ``trace(tol=1e-3)`` stops as soon as the running mean changes by less
  than ``tol`` — after a handful of probes — so we call its Hessian-vector product
  (``hessian.dataloader_hv_product``) in our own loop. ``diagonal_sum`` = Σᵢ dᵢ is reported
  next to it: it *is* the trace when the diagonal is exact;
- ``top_eigenvalues``: PyHessian's power iteration with deflation (``top-eig:K``, default
  K = 1; at most 100 HVPs per eigenvalue, stopping at a relative change below 1e-4).
  Power iteration converges to the eigenvalues of largest *magnitude*: the top ones near
  a minimum, where the Hessian is close to positive semi-definite.

PyHessian 0.1 defaults to CUDA, so the device is passed explicitly; it creates its probes
in torch's default dtype, so float64 runs temporarily make float64 the default; it mutates
the model (``eval()``, ``.grad`` with a graph), so it gets :meth:`Objective.model_copy`.
Its ``density()`` calls the removed ``torch.eig`` and is not exposed.
Every PyHessian HVP is one pass over all measured data; ``extras["hvps"]`` counts them.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .compat import twice_differentiable
from .errors import HessdiagError
from .objective import Objective, default_dtype

EXTRAS: dict[str, int] = {"trace": 100, "top-eig": 1}
"""Known extras and their default count (trace probes; number of eigenvalues)."""

EIGEN_MAX_ITERATIONS = 100
EIGEN_TOLERANCE = 1e-4


class ExtrasError(HessdiagError):
    """An unknown extra, a bad count, or PyHessian missing."""


def parse_extras(extras: str | Iterable[str] | None) -> dict[str, int]:
    """``"trace,top-eig:3"`` or ``("trace:200", "top-eig")`` → ``{"trace": 200, "top-eig": 3}``."""
    if extras is None:
        return {}
    items = extras.split(",") if isinstance(extras, str) else list(extras)
    parsed: dict[str, int] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, count = item.partition(":")
        if name not in EXTRAS:
            raise ExtrasError(f"unknown extra {name!r}; choose from {', '.join(EXTRAS)} "
                              "(optionally NAME:COUNT, e.g. trace:200,top-eig:3)")
        try:
            value = int(count) if count else EXTRAS[name]
        except ValueError:
            value = 0
        if value < (2 if name == "trace" else 1):
            raise ExtrasError(f"bad count in extra {item!r}: expected an integer "
                              f"{'>= 2 (probes)' if name == 'trace' else '>= 1 (eigenvalues)'}")
        parsed[name] = value
    return parsed


def _pyhessian() -> Any:
    try:
        from pyhessian import hessian
    except ImportError:
        raise ExtrasError("the trace/top-eig extras need PyHessian: pip install 'hessdiag[pyhessian]'") from None
    return hessian


def compute_extras(
    objective: Objective,
    extras: str | Iterable[str] | None,
    *,
    seed: int = 0,
    diagonal: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """The requested context metrics as a JSON-ready dict (``None`` if none requested).

    Keys: ``trace``, ``trace_ci95``, ``trace_probes``, ``diagonal_sum`` (with ``trace``;
    ``diagonal_sum`` needs ``diagonal``), ``top_eigenvalues`` (with ``top-eig``), ``hvps``,
    ``seconds``, ``method``.
    """
    requests = parse_extras(extras)
    if not requests:
        return None
    hessian = _pyhessian()
    start = time.perf_counter()
    net = objective.model_copy()  # PyHessian calls eval() and writes .grad
    batches = [(x, y) for x, y, _ in objective.batches()]

    def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return objective.loss.batch_mean(output, target)  # the measured loss (hessdiag.losses)

    result: dict[str, Any] = {}
    count = 0
    with default_dtype(objective.dtype), torch.random.fork_rng(devices=[]), \
            warnings.catch_warnings(), twice_differentiable():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        # PyHessian draws its power-iteration start from the global CPU RNG (then moves it
        # to the device); seeding only that generator leaves the CUDA generators untouched.
        torch.default_generator.manual_seed(seed)
        h = hessian(net, criterion, dataloader=batches, cuda=objective.device.type == "cuda")
        product = h.dataloader_hv_product

        def counted(v: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
            nonlocal count
            count += 1
            return product(v)

        h.dataloader_hv_product = counted
        if "trace" in requests:
            generator = torch.Generator(device=objective.device).manual_seed(seed)
            values = []
            for _ in range(requests["trace"]):
                v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device)
                     .to(p.dtype) * 2 - 1 for p in h.params]
                _, hv = h.dataloader_hv_product(v)
                values.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
            mean = statistics.fmean(values)
            half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
            result.update(trace=mean, trace_ci95=[mean - half, mean + half],
                          trace_probes=len(values))
            if diagonal is not None:
                result["diagonal_sum"] = float(sum(float(d.double().sum()) for d in diagonal.values()))
        if "top-eig" in requests:
            eigenvalues, _ = h.eigenvalues(maxIter=EIGEN_MAX_ITERATIONS, tol=EIGEN_TOLERANCE,
                                           top_n=requests["top-eig"])
            result["top_eigenvalues"] = [float(e) for e in eigenvalues]
    result.update(hvps=count, seconds=round(time.perf_counter() - start, 4), method="PyHessian 0.1")
    return result
