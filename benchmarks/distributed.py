"""Data-parallel measurement: 1 vs K processes, and the cost model of docs/scaling.md.

Each size is one ``hessdiag.measure`` with ``hutchinson-plain`` and a fixed number of
probes (so every run does the same work: S probes, each one Hessian-vector product over
all N examples) on a tanh MLP 64-h-h-10 and N synthetic examples, float32, batches of
512, by default all S probes in one chunk (one data pass; ``--chunk`` for smaller
chunks). It runs in one process and in K processes (``torchrun --nproc-per-node K``, one
thread each; default K = 2), alternating, so that load from other users of the machine
affects both alike; with ``--repeats`` the fastest run of each counts.

Reported per size and K: the measurement's own seconds (``Result.seconds``, after the
input checks, after a warm-up measurement: without process start-up, the import of torch
and the first use of torch.func), the wall time of
the whole command, the speed-up of K processes over one, and the cost model's constant
κ = seconds · K / (S · N · P), the time per probe, example and parameter (docs/scaling.md:
seconds ≈ κ · S · N · P / K while one rank's work dominates the all-reduce of S · P numbers).

Run: PYTHONPATH=. python benchmarks/distributed.py [--sizes 128,256,384] [--examples 4096]
     [--probes 32] [--chunk S] [--ranks 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def problem(width: int, examples: int):
    """The tanh MLP 64-width-width-10 and ``examples`` seeded synthetic examples."""
    import torch

    from hessdiag.models import mlp

    torch.manual_seed(0)
    model = mlp(in_features=64, hidden=(width, width), num_classes=10, activation="tanh")
    x = torch.randn(examples, 64)
    y = torch.randint(0, 10, (examples,))
    return model, (x, y)


def worker(args: argparse.Namespace) -> None:
    """One rank: measure, and rank 0 writes the figures to ``args.out``."""
    import torch

    import hessdiag

    torch.set_num_threads(1)
    model, data = problem(args.width, args.examples)
    # The first torch.func call imports torch._dynamo (seconds): not part of the measurement.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # three probes leave the warm-up unresolved
        hessdiag.measure(model, (data[0][:8], data[1][:8]), "ce", estimator="hutchinson-plain", samples=3,
                         distributed=False)
    result = hessdiag.measure(model, data, "ce", estimator="hutchinson-plain", samples=args.probes,
                              seed=0, batch_size=512, chunk_size=args.chunk or args.probes)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({
            "seconds": result.seconds, "num_params": result.num_params, "world_size": result.world_size,
            "normalized_norm": result.normalized_norm, "examples_per_rank": result.examples_per_rank}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(ranks: int, width: int, examples: int, probes: int, chunk: int | None = None) -> dict:
    """Run :func:`worker` on ``ranks`` processes under torchrun; its figures plus the wall time."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker",
                   "--width", str(width), "--examples", str(examples), "--probes", str(probes), "--out", str(out)]
        command += [] if chunk is None else ["--chunk", str(chunk)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        return {**json.loads(out.read_text()), "wall": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="128,256,384", help="hidden widths h (default: 128,256,384)")
    parser.add_argument("--examples", type=int, default=4096, help="N (default: 4096)")
    parser.add_argument("--probes", type=int, default=32, help="S (default: 32)")
    parser.add_argument("--ranks", type=int, default=2, help="K (default: 2)")
    parser.add_argument("--chunk", type=int, help="probes per data pass (default: all S in one pass)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each size and K; the fastest counts")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    for width in (int(w) for w in args.sizes.split(",")):
        runs: dict[int, dict] = {}
        for _ in range(args.repeats):
            for ranks in (1, args.ranks):
                run = launch(ranks, width, args.examples, args.probes, args.chunk)
                if ranks not in runs or run["seconds"] < runs[ranks]["seconds"]:
                    runs[ranks] = run
        one, many = runs[1], runs[args.ranks]
        work = args.probes * args.examples * one["num_params"]
        rows.append((width, one["num_params"], one["seconds"], many["seconds"], one["wall"], many["wall"],
                     one["seconds"] / many["seconds"], one["wall"] / many["wall"],
                     1e9 * one["seconds"] / work, 1e9 * many["seconds"] * args.ranks / work,
                     abs(one["normalized_norm"] - many["normalized_norm"]) / one["normalized_norm"]))
        print(f"h={width}: P={one['num_params']:,} 1 rank {one['seconds']:.2f} s, {args.ranks} ranks "
              f"{many['seconds']:.2f} s (examples per rank {many['examples_per_rank']})", flush=True)
    print(f"\nN={args.examples:,}  S={args.probes}  chunk={args.chunk or args.probes}  K={args.ranks}  "
          "float32, one thread per rank\n")
    print(f"| h | P | seconds, 1 rank | seconds, {args.ranks} ranks | wall, 1 | wall, {args.ranks} "
          f"| speed-up (measurement) | speed-up (wall) | κ, 1 rank (ns) | κ·K, {args.ranks} ranks (ns) "
          "| rel. diff of the norm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for w, p, s1, sk, w1, wk, r, rw, k1, kk, diff in rows:
        print(f"| {w} | {p:,} | {s1:.2f} | {sk:.2f} | {w1:.1f} | {wk:.1f} | {r:.2f}× | {rw:.2f}× "
              f"| {k1:.3f} | {kk:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
