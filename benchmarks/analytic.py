"""Analytic MLP path of the `exact` estimator: speed against its anchors, ratios in one run.

1. A few-thousand-parameter MLP (the bundled 64-48-48-10 RCT-AF n=1 α=14 digits model,
   P = 5962): analytic recursion (``ExactEstimator()``) vs basis-vector HVPs
   (``ExactEstimator(analytic=False)``), float64, on the first N digits training examples.
2. A 64-256-256-10 tanh MLP, batch 256, cross-entropy: analytic recursion vs BackPACK's
   ``DiagHessian`` (``backpack.extend`` on a deep copy), float32 and float64.

Methods are interleaved, each timed ``--repeats`` times; medians and ratios are printed, and
the diagonals are compared (max |a − b| / max |b|) so a fast wrong answer cannot pass.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/analytic.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hessdiag.analytic import mlp_decomposition  # noqa: E402
from hessdiag.estimators import ExactEstimator  # noqa: E402
from hessdiag.io import load_checkpoint, load_data  # noqa: E402
from hessdiag.demo import bundled_checkpoint  # noqa: E402
from hessdiag.models import mlp  # noqa: E402
from hessdiag.objective import Objective  # noqa: E402


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in d.values()])


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    fa, fb = flat(a), flat(b)
    return float((fa - fb).abs().max() / fb.abs().max())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleave(methods: dict[str, callable], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    times: dict[str, list[float]] = {k: [] for k in methods}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            seconds, outs[name] = timed(fn)
            times[name].append(seconds)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def small_mlp_vs_hvps(examples: int, repeats: int) -> None:
    model, _ = load_checkpoint(bundled_checkpoint())
    x, y = load_data("digits", split="train", max_examples=examples)
    objective = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=examples)
    fast, slow = ExactEstimator(), ExactEstimator(analytic=False)
    medians, outs = interleave({
        "analytic": lambda: fast.estimate(objective),
        "basis HVPs": lambda: slow.estimate(objective),
    }, repeats)
    a, b = outs["analytic"], outs["basis HVPs"]
    assert a.info["method"] == "analytic-mlp" and b.info["method"] == "basis-hvp"
    print(f"## 1. 64-48-48-10 RCT-AF(n=1, α=14) digits MLP, P = {objective.num_params}, "
          f"N = {examples}, CE, float64, median of {repeats}")
    print(f"analytic recursion      {medians['analytic'] * 1e3:9.1f} ms")
    print(f"basis-vector HVPs       {medians['basis HVPs'] * 1e3:9.1f} ms  ({b.hvps} HVPs)")
    print(f"ratio HVPs / analytic   {medians['basis HVPs'] / medians['analytic']:9.1f}x   "
          f"(agreement {rel(a.diagonal, b.diagonal):.1e})")


def backpack_diag_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    net = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())
    loss = loss_fn(net(x), y)
    with backpack(DiagHessian()):
        loss.backward()
    return {n: p.diag_h.detach() for n, p in net.named_parameters()}


def wide_mlp_vs_backpack(batch: int, repeats: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = mlp(64, (256, 256), 10, "tanh").to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 64, generator=g).to(dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    objective = Objective(model, (x, y), "ce", dtype=dtype, batch_size=batch)
    medians, outs = interleave({
        "analytic": lambda: mlp_decomposition(objective).diagonal,
        "BackPACK": lambda: backpack_diag_hessian(model, x, y),
    }, repeats)
    name = str(dtype).removeprefix("torch.")
    print(f"## 2. 64-256-256-10 tanh MLP, P = {objective.num_params}, batch {batch}, CE, {name}, "
          f"median of {repeats}")
    print(f"analytic recursion      {medians['analytic'] * 1e3:9.1f} ms")
    print(f"BackPACK DiagHessian    {medians['BackPACK'] * 1e3:9.1f} ms")
    print(f"ratio BackPACK / analytic {medians['BackPACK'] / medians['analytic']:7.1f}x   "
          f"(agreement {rel(outs['analytic'], outs['BackPACK']):.1e})")


def deep_mlp_full_matrices(batch: int, repeats: int) -> None:
    """A deep net where full M^l matrices are needed (the O(B n²) memory, O(B n³) time path)."""
    torch.manual_seed(0)
    model = mlp(64, (256, 256, 256, 256), 10, "tanh")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 64, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    objective = Objective(model, (x, y), "ce", dtype=torch.float32, batch_size=batch)
    medians, outs = interleave({
        "analytic": lambda: mlp_decomposition(objective).diagonal,
        "BackPACK": lambda: backpack_diag_hessian(model, x, y),
    }, repeats)
    print(f"## 3. 64-256-256-256-256-10 tanh MLP, P = {objective.num_params}, batch {batch}, CE, "
          f"float32, median of {repeats}")
    print(f"analytic recursion      {medians['analytic'] * 1e3:9.1f} ms")
    print(f"BackPACK DiagHessian    {medians['BackPACK'] * 1e3:9.1f} ms")
    print(f"ratio BackPACK / analytic {medians['BackPACK'] / medians['analytic']:7.1f}x   "
          f"(agreement {rel(outs['analytic'], outs['BackPACK']):.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=256, help="digits examples for part 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # BackPACK registers full backward hooks; torch warns that inputs need no grad. Noise here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    print(f"torch {torch.__version__}, {args.threads} thread(s), OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}")
    small_mlp_vs_hvps(args.examples, max(3, args.repeats // 2))
    for dtype in (torch.float32, torch.float64):
        wide_mlp_vs_backpack(256, args.repeats, dtype)
    deep_mlp_full_matrices(256, args.repeats)


if __name__ == "__main__":
    main()
