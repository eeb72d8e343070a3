"""One rank of the small distributed runs of tests/test_distributed.py.

Started by :func:`launch` once per rank with torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), exactly as torchrun
starts its workers, on one CPU thread each:

- ``python -m tests.distributed_worker OUT``: every case of :func:`cases` on the problem
  of :func:`problem` through ``hessdiag.measure`` (rank 0 saves the results to OUT), then
  one more measurement in which rank 1's data lose batches after the first passes, so
  that rank 1 fails in the middle of it (:func:`run_flaky`; its exit code is the process's).
  One process does both because starting one costs several seconds (importing torch).
- ``python -m tests.distributed_worker stall``: rank 1 stops answering for a while in the
  middle of a measurement whose collectives time out after 3 s (:func:`run_stalled`).
- ``python -m hessdiag ...``: the command line itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def problem(relu: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A tiny float64 MLP and 37 examples (an odd count: the shards differ in size)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU() if relu else nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(37, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (37,))
    return model, (x, y)


def batches(data: tuple[torch.Tensor, torch.Tensor], size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same examples as a list of batches (sharded by batches, not examples)."""
    x, y = data
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def loss_of(options: dict[str, Any]) -> Any:
    """The loss a case names (popped from ``options``): ``"ce"``, or ``"weighted"``, a
    class-weighted, label-smoothed cross-entropy whose normalization Σ w_y spans the shards."""
    if options.pop("loss", "ce") == "weighted":
        return nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), label_smoothing=0.1)
    return "ce"


def cases() -> dict[str, dict[str, Any]]:
    """Name → keyword arguments of ``hessdiag.measure`` (the model and data by name)."""
    from hessdiag.estimators import ExactEstimator

    basis = ExactEstimator(analytic=False, structural=False)
    return {
        "exact-analytic": dict(estimator="exact", split_ggn=True),
        "exact-weighted-loss": dict(estimator="exact", loss="weighted", split_ggn=True),
        "exact-basis": dict(estimator=basis, batch_size=5),
        "exact-basis-batches": dict(estimator=basis, data="batches"),
        "exact-tape-relu": dict(estimator="exact", model="relu"),
        "backpack": dict(estimator="backpack"),
        "hutchinson": dict(estimator="hutchinson", samples=40, seed=3),
        "hutchinson-plain-adaptive": dict(estimator="hutchinson-plain", rtol=0.3, max_samples=96, seed=1),
        "hutchinson-ggn": dict(estimator="hutchinson-ggn", samples=12, seed=2, split_ggn=True),
        "curvprop": dict(estimator="curvprop", samples=6, seed=0),
    }


def refusals() -> dict[str, str]:
    """What each rank of a refused measurement raises (name → message)."""
    import hessdiag
    from hessdiag.errors import HessdiagError
    from hessdiag.estimators import DiagonalEstimate, Estimator

    class Plugin(Estimator):  # an estimator defined elsewhere, not declared distributed-safe
        name = "plugin"
        exact = True

        def estimate(self, objective):
            return DiagonalEstimate({k: v.zero_() for k, v in objective.params.items()}, hvps=0)

    model, (x, y) = problem()
    other = (x + (os.environ.get("RANK") == "1"), y)  # rank 1 holds other inputs
    attempts = {"other-data": dict(data=other), "extras": dict(extras="trace"), "plugin": dict(estimator=Plugin())}
    messages = {}
    for name, options in attempts.items():
        options = {"data": (x, y), **options}
        try:
            hessdiag.measure(model, options.pop("data"), "ce", **options)
            messages[name] = "no error"
        except HessdiagError as err:
            messages[name] = f"{type(err).__name__}: {err}"
    return messages


def run_cases(out: str) -> None:
    import hessdiag

    results: dict[str, Any] = {"refusals": refusals()}
    for name, options in cases().items():
        options = dict(options)
        model, data = problem(relu=options.pop("model", None) == "relu")
        chosen = batches(data) if options.pop("data", None) == "batches" else data
        result = hessdiag.measure(model, chosen, loss_of(options), dtype="float64", keep_diagonal=True, **options)
        results[name] = {"diagonal": result.diagonal, "samples": result.samples, "doc": result.to_dict(),
                         "ggn": result.ggn_diagonal, "table": result.table()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


class Flaky:
    """Batches that, on rank 1 after ``stable`` passes, lose their last two (``stall=0``) or
    arrive only after ``stall`` seconds."""

    def __init__(self, data: list[tuple[torch.Tensor, torch.Tensor]], stable: int, stall: float = 0.0) -> None:
        self.data, self.stable, self.passes, self.stall = data, stable, 0, stall

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.passes += 1
        if os.environ.get("RANK") != "1" or self.passes <= self.stable:
            return iter(self.data)
        if self.stall:
            time.sleep(self.stall)
            return iter(self.data)
        return iter(self.data[:-2])


def run_flaky(stall: float = 0.0, timeout: float = 60.0) -> int:
    """Exit code 2 and one line on stderr, as the command line reports an error, and the
    seconds from the start of the measurement to the error."""
    import hessdiag
    from hessdiag.errors import HessdiagError

    model, data = problem()
    start = time.perf_counter()
    try:
        hessdiag.measure(model, Flaky(batches(data), 3, stall), "ce", estimator="hutchinson-plain", samples=64,
                         dtype="float64", timeout=timeout)
    except HessdiagError as err:
        print(f"hessdiag: error (rank {os.environ.get('RANK')}): {err}", file=sys.stderr)
        print(f"failed after {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return 2
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(argv_per_rank: Sequence[Sequence[str]], timeout: float = 120.0) -> list[subprocess.CompletedProcess]:
    """Run ``python ARGV`` once per rank as a gloo world on the loopback interface; wait for all."""
    port = str(free_port())
    procs = []
    for rank, argv in enumerate(argv_per_rank):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(argv_per_rank)),
               "LOCAL_WORLD_SIZE": str(len(argv_per_rank)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "stall":
        import warnings

        import hessdiag

        with warnings.catch_warnings():  # warm-up: torch.func's first use takes seconds
            warnings.simplefilter("ignore")
            hessdiag.measure(*problem(), "ce", estimator="hutchinson-plain", samples=3, distributed=False)
        sys.exit(run_flaky(stall=8.0, timeout=3.0))
    run_cases(sys.argv[1])
    sys.exit(run_flaky())
