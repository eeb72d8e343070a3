"""Data-parallel measurement on ``torch.distributed`` (docs/scaling.md).

A :class:`World` is the group of processes ("ranks") that measure one objective together.
Each rank holds the whole model and a shard of the data: an ``(x, y)`` pair of tensors is
split into contiguous slices of examples, any other data source by batches, batch i going
to rank i mod K (so every rank must see the same batches in the same order). Every
quantity the estimators compute is a sum over examples (Hessian-vector products, GGN and
analytic diagonals, per-example squares), so each rank sums its shard, :meth:`World.all_reduce_`
adds the shards, and the sum is divided by the global N: the result is the single-process
one up to rounding. Probes are drawn on every rank from the same seeded generator, and every
rank sees the same reduced products, so every rank takes the same adaptive-stopping
decision without another collective.

Failure. A rank that fails before the first collective (bad input in its shard, an
unsupported option) must not leave the others waiting: :meth:`World.agree` is one
all-gather after validation in which every rank reports success or its error, and every
rank raises the same :class:`DistributedError` if any failed. A rank that fails later
exits; the others' pending collective then fails (gloo notices the closed connection at
once; any backend gives up after the timeout) and raises a :class:`DistributedError` too.

Nothing here changes a single-process run: the default :class:`World` has one rank and
every method is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import HessdiagError, first_line

DEFAULT_TIMEOUT_SECONDS = 1800.0
"""How long a collective waits for the other ranks (``--dist-timeout``). Between two
collectives a rank makes one pass over its shard for one chunk of probes, so this must
exceed the longest such pass; a rank that died is noticed sooner by gloo."""

FINGERPRINT_SIZE = 5
"""Numbers in a :func:`fingerprint`."""

MESSAGE_BYTES = 512
"""Room for one rank's error message in :meth:`World.agree` (longer ones are cut)."""


class DistributedError(HessdiagError):
    """A distributed measurement failed: on some rank, or in a collective.

    ``shared`` is ``True`` when rank 0 raises it too, so that its report suffices: every
    rank raised this same error (the outcome of :meth:`World.agree`), or this rank only
    stopped because a collective failed (the rank that failed reports why).
    """

    def __init__(self, message: str, *, shared: bool = False) -> None:
        super().__init__(message)
        self.shared = shared


@dataclass(frozen=True)
class World:
    """The ranks measuring together: this process's ``rank`` of ``size``.

    ``device`` is where collective buffers live (the CPU for gloo, this rank's GPU for
    nccl); ``group`` the process group (``None``: the default one).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None

    @property
    def distributed(self) -> bool:
        """More than one rank: sums must be all-reduced."""
        return self.size > 1

    # -- sharding -----------------------------------------------------------------------

    def shard(self, num: int) -> slice:
        """This rank's contiguous slice of ``num`` examples (sizes differ by at most one)."""
        return slice(num * self.rank // self.size, num * (self.rank + 1) // self.size)

    def owns_batch(self, index: int) -> bool:
        """Whether batch ``index`` (0-based, in the data's order) belongs to this rank."""
        return index % self.size == self.rank

    def draw_seed(self, seed: int) -> int:
        """A seed for draws that must differ between ranks (per-example draws of a shard):
        ``seed`` itself on rank 0, a distinct derived seed on every other rank."""
        if self.rank == 0:
            return seed
        return zlib.crc32(f"{seed}:{self.rank}".encode()) + (1 << 32)

    # -- collectives --------------------------------------------------------------------

    def _collective(self, operation: Any, *args: Any) -> None:
        try:
            operation(*args, group=self.group)
        except (RuntimeError, ValueError) as err:  # a peer died, the timeout expired, ...
            raise DistributedError(
                f"rank {self.rank}: stopped because another rank failed or did not answer within the "
                f"timeout ({first_line(err, 160)})", shared=True) from None

    def all_reduce_(self, tensors: Iterable[Tensor]) -> None:
        """Replace each tensor by its sum over the ranks, in place (no-op on one rank)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for tensor in tensors:
            if tensor.device != self.device and self.device.type != "cpu":
                raise DistributedError(f"rank {self.rank}: a tensor on {tensor.device} cannot be reduced "
                                       f"by a process group on {self.device}")
            self._collective(dist.all_reduce, tensor)

    def all_gather(self, row: Tensor) -> list[Tensor]:
        """Every rank's ``row`` (same shape and dtype on every rank), in rank order."""
        if not self.distributed:
            return [row]
        import torch.distributed as dist

        row = row.to(self.device)
        rows = [torch.empty_like(row) for _ in range(self.size)]
        self._collective(dist.all_gather, rows, row)
        return [r.cpu() for r in rows]

    def agree(self, failure: BaseException | None, fingerprint: Sequence[float] = (),
              count: int = 0) -> list[int]:
        """Make every rank's outcome of a step known to all: one all-gather.

        ``failure``: this rank's error in the step (``None``: it succeeded);
        ``fingerprint``: numbers that must be equal on every rank (the options, a checksum
        of the parameters); ``count``: a number to collect from every rank (the examples
        of its shard). If any rank failed, or a fingerprint differs from rank 0's, every
        rank raises the same :class:`DistributedError` naming the first failing rank.
        Returns the ``count`` of every rank, in rank order.
        """
        message = b"" if failure is None else first_line(failure, MESSAGE_BYTES).encode()[:MESSAGE_BYTES]
        row = torch.zeros(3 + len(fingerprint) + MESSAGE_BYTES, dtype=torch.float64)
        row[0] = float(failure is not None)
        row[1] = float(count)
        row[2] = float(len(message))
        row[3 : 3 + len(fingerprint)] = torch.tensor(list(fingerprint), dtype=torch.float64)
        row[3 + len(fingerprint) : 3 + len(fingerprint) + len(message)] = torch.tensor(
            list(message), dtype=torch.float64)
        rows = self.all_gather(row)
        failed = [rank for rank, r in enumerate(rows) if r[0] != 0]
        if failed:
            first = rows[failed[0]]
            start = 3 + len(fingerprint)
            text = bytes(int(b) for b in first[start : start + int(first[2])]).decode(errors="replace")
            others = "" if len(failed) == 1 else \
                f" (rank{'s' if len(failed) > 2 else ''} {', '.join(map(str, failed[1:]))} failed too)"
            prefix = f"rank {failed[0]} of {self.size}: " if self.distributed else ""
            if not self.distributed and failure is not None:
                raise failure
            raise DistributedError(f"{prefix}{text}{others}", shared=True) from failure
        reference = rows[0][3 : 3 + len(fingerprint)]
        for rank, r in enumerate(rows[1:], start=1):
            if not torch.allclose(r[3 : 3 + len(fingerprint)], reference, rtol=1e-9, atol=0.0):
                raise DistributedError(
                    f"rank {rank} of {self.size} measures a different model, data or options than rank 0 "
                    "(every rank must load the same checkpoint and data and pass the same arguments)",
                    shared=True)
        return [int(r[1]) for r in rows]


SINGLE = World()
"""The world of a single-process run."""


def fingerprint(params: dict[str, Tensor], options: str, data_checksum: float | None = None) -> list[float]:
    """Numbers equal on ranks that measure the same parameters with the same options (and
    data, where a checksum of them is at hand): a CRC of ``options``, the parameter count,
    two checksums of the values and ``data_checksum`` (0 for ``None``)."""
    total = sum((p.detach().double().sum() for p in params.values()), torch.zeros((), dtype=torch.float64))
    absolute = sum((p.detach().double().abs().sum() for p in params.values()),
                   torch.zeros((), dtype=torch.float64))
    count = sum(p.numel() for p in params.values())
    return [float(zlib.crc32(options.encode())), float(count), float(total), float(absolute),
            data_checksum or 0.0]


# -- joining a process group -------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnvironment:
    """Rank, world size and local rank as a launcher (torchrun, SLURM's srun) sets them."""

    rank: int
    size: int
    local_rank: int
    launcher: str


def launch_environment(slurm: bool = False) -> LaunchEnvironment | None:
    """What torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or, with ``slurm``, srun
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) says about this process;
    ``None`` outside a launcher. SLURM's variables are read only on request, since a job
    step may run independent tasks."""
    env = os.environ
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            return LaunchEnvironment(int(env["RANK"]), int(env["WORLD_SIZE"]),
                                     int(env.get("LOCAL_RANK", "0")), "torchrun")
        if slurm and "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
            return LaunchEnvironment(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                                     int(env.get("SLURM_LOCALID", "0")), "srun")
    except ValueError as err:
        raise DistributedError(f"the launcher's rank variables are not integers: {err}") from None
    return None


def _existing_world(device: torch.device | str | None) -> World | None:
    """The world of a process group the caller initialized, or ``None``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    size, rank = dist.get_world_size(), dist.get_rank()
    if dist.get_backend() != "nccl":
        return World(rank, size)
    if device is not None and torch.device(device).type != "cuda":
        raise DistributedError(f"rank {rank}: an nccl process group reduces GPU tensors; measure on a cuda "
                               f"device, not {device}")
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    return World(rank, size, _rank_gpu(device or "cuda", rank, torch.cuda.current_device() if local is None
                                       else int(local)))


def _rank_gpu(device: torch.device | str, rank: int, local_rank: int) -> torch.device:
    """The compute device of this rank: ``cuda`` (no index) becomes ``cuda:local_rank``."""
    where = torch.device(device)
    if where.type == "cuda" and where.index is None:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: local rank {local_rank} but only "
                                   f"{torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", local_rank)
    return where


_RENDEZVOUS: dict[tuple[str, int, int, int], Any] = {}
"""The rendezvous store of each world this process joined, kept for the next call (see
:func:`_call_store`)."""

_CALLS = itertools.count()
"""Process groups this process created; the same sequence on every rank."""


def _call_store(env: LaunchEnvironment, seconds: float) -> Any:
    """The key-value store through which the ranks meet for one call, under a key prefix
    of its own.

    One TCP store per world serves every call: had each call its own, a rank that starts
    the next call early could meet the previous call's store (rank 0 hosts it and may not
    have closed it yet) and read stale addresses. It is multi-tenant, so that the caller
    can still create a group of its own at the same address.
    """
    import torch.distributed as dist

    key = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.rank, env.size)
    if key not in _RENDEZVOUS:
        # torchrun's agent hosts the store already (as torch's own env:// rendezvous knows).
        host = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        _RENDEZVOUS[key] = dist.TCPStore(key[0], key[1], env.size, host,
                                         timeout=datetime.timedelta(seconds=seconds), multi_tenant=True)
    return dist.PrefixStore(f"hessdiag/{next(_CALLS)}", _RENDEZVOUS[key])


@contextlib.contextmanager
def joined_world(
    distributed: bool | None = None,
    device: torch.device | str | None = None,
    timeout: float | None = None,
) -> Iterator[tuple[World, torch.device | str | None]]:
    """The world a measurement runs in, and the compute device on this rank.

    ``distributed``: ``False``: one process, whatever the environment; ``None``
    (default): the caller's initialized process group if it has more than one rank, else
    torchrun's environment if it says more than one rank, else one process; ``True``: as
    ``None``, also reading SLURM's variables, and an error if neither gives a world.

    A process group this function initializes (gloo for a CPU device, nccl for a GPU one,
    one GPU per rank from ``LOCAL_RANK``, rendezvous at ``MASTER_ADDR``/``MASTER_PORT``;
    collectives time out after ``timeout`` seconds) is destroyed on exit; one the caller
    initialized is left alone.
    """
    if distributed is False:
        yield SINGLE, device
        return
    if distributed not in (None, True):
        raise HessdiagError(f"distributed must be True, False or None, got {distributed!r}")
    existing = _existing_world(device)
    if existing is not None:
        yield existing, existing.device if existing.device.type == "cuda" else device
        return
    env = launch_environment(slurm=bool(distributed))
    if env is None or env.size <= 1:
        if distributed and env is None:
            raise DistributedError(
                "distributed=True needs an initialized process group, or the environment of torchrun "
                "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or srun (SLURM_PROCID, SLURM_NTASKS)")
        yield SINGLE, device
        return
    if not 0 <= env.rank < env.size:
        raise DistributedError(f"rank {env.rank} is outside a world of {env.size}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedError(f"{env.launcher} started {env.size} ranks but {name} is not set "
                                   "(docs/scaling.md: the address and port of rank 0)")
    compute = None if device is None else _rank_gpu(device, env.rank, env.local_rank)
    gpu = compute is not None and compute.type == "cuda"
    seconds = DEFAULT_TIMEOUT_SECONDS if timeout is None else float(timeout)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise HessdiagError(f"the collective timeout must be a positive number of seconds, got {timeout!r}")
    import torch.distributed as dist

    try:
        dist.init_process_group("nccl" if gpu else "gloo", store=_call_store(env, seconds), rank=env.rank,
                                world_size=env.size, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {env.rank}: cannot join the process group at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                               f"({first_line(err, 160)})") from None
    try:
        yield World(env.rank, env.size, compute if compute is not None and gpu else torch.device("cpu")), compute
    finally:
        dist.destroy_process_group()


__all__ = ["DEFAULT_TIMEOUT_SECONDS", "FINGERPRINT_SIZE", "DistributedError", "LaunchEnvironment", "SINGLE", "World",
           "fingerprint", "joined_world", "launch_environment"]
