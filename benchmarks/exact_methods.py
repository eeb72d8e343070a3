"""Exact methods benchmark: BackPACK DiagHessian vs exact vs one Hutchinson probe vs a backward.

Model: 64-W-W-10 MLP with tanh (BackPACK's own Tanh extension, so this measures BackPACK,
not our activation extensions), one batch of ``--batch`` random examples, cross-entropy,
float32. Methods, all on the same model, data and objective:

- ``backward``: one plain ``loss.backward()`` (the anchor; ratios are relative to it);
- ``hutchinson-1``: one Hessian-vector product ``objective.hessian.apply`` with one Rademacher probe;
- ``backpack``: :func:`hessdiag.backpack_ext.backpack_diagonal` (BackPACK ``DiagHessian``
  on an extended deep copy, i.e. what ``--estimator backpack`` runs);
- ``exact-analytic``: the ``exact`` estimator as users get it on these MLPs: its analytic
  fast path (the pre-activation-Hessian recursion of :mod:`hessdiag.analytic`);
- ``exact-hvp``: the ``exact`` estimator's general path (P basis-vector HVPs, vmapped in
  blocks of 128), what it runs on models the recursion does not cover. A full run takes
  minutes here, so we time ``--exact-blocks`` of its blocks (the same code
  path, ``ExactEstimator._block``) and scale by P/(blocks·128): every block costs the same,
  so the extrapolation is linear and reported as such.

Timing: the methods are interleaved within each repeat and the median over repeats is
reported (docs/index.md). Peak memory: each method runs once more in a fresh subprocess that
warms up on a tiny model, builds model, data and objective, reads its resident set size (``VmRSS``), resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux), runs the method once
and reads the new peak (``VmHWM``): the difference is the extra peak resident memory the
method needs. Python's tracemalloc cannot see torch's CPU allocator, and ``ru_maxrss``
cannot be reset (import-time peaks hide everything below them), hence /proc.

Run: ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/exact_methods.py``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("backward", "hutchinson-1", "backpack", "exact-analytic", "exact-hvp")


def setup(width: int, batch: int, seed: int = 0):
    from hessdiag.models import mlp
    from hessdiag.objective import Objective

    torch.manual_seed(seed)
    model = mlp(in_features=64, hidden=(width, width), num_classes=10, activation="tanh")
    x = torch.randn(batch, 64)
    y = torch.randint(0, 10, (batch,))
    objective = Objective(model, (x, y), "ce", batch_size=batch)
    objective.loss_value()  # counts N once, outside the timings
    return model, x, y, objective


def runner(method: str, model, x, y, objective, blocks: int = 4):
    """A zero-argument callable running ``method`` once."""
    from hessdiag.backpack_ext import backpack_diagonal
    from hessdiag.estimators import EstimatorOptions, get_estimator

    if method == "backward":
        def run():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        return run
    if method == "hutchinson-1":
        def run():
            probe = objective.unflatten(
                torch.randint(0, 2, (1, objective.num_params)).to(objective.dtype) * 2 - 1)
            objective.hessian.apply(probe)
        return run
    if method == "backpack":
        return lambda: backpack_diagonal(objective, "hessian")
    if method == "exact-analytic":
        analytic = get_estimator("exact")
        return lambda: analytic.estimate(objective)
    if method == "exact-hvp":
        exact = get_estimator("exact", EstimatorOptions(force=True))
        size = exact.block_size

        def run():
            for b in range(blocks):
                idx = torch.arange(b * size, min((b + 1) * size, objective.num_params))
                exact._block(objective, idx)
        return run
    raise ValueError(method)


def exact_scale(objective, blocks: int) -> float:
    """Full exact run / timed part: P basis vectors over ``blocks`` blocks of 128."""
    return objective.num_params / min(objective.num_params, blocks * 128)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(method: str, width: int, batch: int, blocks: int) -> None:
    """Subprocess entry: print the extra peak RSS (MiB) of one run of ``method``."""
    # Warm up on a tiny model first: lazy one-time initialization (functorch, BackPACK
    # imports) is not memory the method needs per run, and the tiny run leaves too little
    # freed memory behind to hide the real run's peak.
    runner(method, *setup(4, 2), blocks=1)()
    model, x, y, objective = setup(width, batch)
    run = runner(method, model, x, y, objective, blocks)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    run()
    print(json.dumps({"extra_peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(method: str, width: int, batch: int, blocks: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--widths", str(width), "--batch", str(batch),
         "--exact-blocks", str(blocks)],
        capture_output=True, text=True, check=True, env=os.environ.copy(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mib"]


def benchmark(width: int, batch: int, repeats: int, blocks: int) -> list[dict[str, object]]:
    model, x, y, objective = setup(width, batch)
    runs = {m: runner(m, model, x, y, objective, blocks) for m in METHODS}
    for run in runs.values():  # warm-up: first-call overheads (vmap, BackPACK imports)
        run()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:  # interleaved, so machine load affects all alike
            start = time.perf_counter()
            runs[method]()
            times[method].append(time.perf_counter() - start)
    anchor = statistics.median(times["backward"])
    rows = []
    for method in METHODS:
        median = statistics.median(times[method])
        if method == "exact-hvp":
            median *= exact_scale(objective, blocks)
        rows.append({"width": width, "params": objective.num_params, "method": method,
                     "median_s": median, "ratio": median / anchor,
                     "peak_mib": peak_memory(method, width, batch, blocks)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact-blocks", type=int, default=4,
                        help="blocks of 128 basis vectors timed for exact (then scaled to P)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        peak_memory_child(args.child, args.widths[0], args.batch, args.exact_blocks)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"float32, ce, median of {args.repeats} interleaved repeats; exact extrapolated from "
          f"{args.exact_blocks} blocks of 128 basis vectors")
    print(f"{'MLP':<14} {'P':>7} {'method':<13} {'median':>10} {'× backward':>11} {'extra peak RSS':>15}")
    for width in args.widths:
        for row in benchmark(width, args.batch, args.repeats, args.exact_blocks):
            print(f"64-{width}-{width}-10".ljust(14) + f" {row['params']:>7,} {row['method']:<13} "
                  f"{row['median_s'] * 1e3:>8.1f}ms {row['ratio']:>11.1f} {row['peak_mib']:>11.1f} MiB")


if __name__ == "__main__":
    main()
