r"""Sweeps over models × activations × training methods × seeds, resumable and shardable.

A TOML file (schema and a full example: ``docs/experiments.md``, "Sweeps") names the
grid; :func:`load_config` validates it up front and :func:`expand` turns it into the
deterministic run order. Each run trains one network (:func:`~hessdiag.experiments.train`),
evaluates clean and PGD-20 accuracy (AutoAttack if enabled), measures the normalized norm
‖diag H‖₂/√P with its GGN/residual split on the clean training loss and on the adversarial
training loss (adversarial examples made once at the trained θ, then held fixed), and the
invariant measure ‖θ² ⊙ diag H‖₂/√P.

Output in ``DIR``:

- ``results.jsonl``: one complete JSON line per finished run, appended with a single
  ``os.write`` on a file opened with ``O_APPEND`` and then fsynced, so a killed sweep never
  leaves half a line behind (a torn last line from another writer is trimmed on start);
- ``checkpoints/<id>.pt``: the trained network as a native checkpoint, written atomically.

The run id is a hash of the run's full configuration: re-running skips ids already in
``results.jsonl``; changing any setting of a run gives it a new id.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from ._common import ExperimentError

RESULTS = "results.jsonl"
CHECKPOINTS = "checkpoints"
RCT_ORDERS = (0, 1, 2)
BASELINES = ("relu", "gelu", "silu", "mish", "softplus", "tanh")
SCHEMA_VERSION = 1

# Allowed keys of each table, with their defaults (None: required or optional without one).
_SWEEP_KEYS = {"data": "digits", "seeds": [0], "eps": 0.1, "max_train": None, "max_test": None,
               "device": "cpu"}
_ACT_KEYS: dict[str, list[Any]] = {"rct_n": [], "psi": [], "baselines": []}
_TRAIN_KEYS = {"methods": ["standard"], "epochs": 20, "lr": 3e-3, "batch_size": 64, "steps": 10,
               "alpha": None, "beta": 6.0, "optimizer": "adam", "weight_decay": 0.0, "momentum": 0.9,
               "lr_schedule": "constant"}
# Keys added after a sweep format was in use enter a run's config (and so its id) only when
# they differ from their defaults above: existing results keep their ids and are not rerun.
_LATER_TRAIN_KEYS = ("lr_schedule",)
_EVAL_KEYS = {"pgd_steps": 20, "autoattack": False, "batch_size": 512}
_MEASURE_KEYS = {"estimator": "auto", "max_examples": None, "samples": None, "rtol": 0.05,
                 "max_samples": 1024, "seed": 0, "dtype": None, "adversarial": True}
_TABLES: dict[str, dict[str, Any]] = {"sweep": _SWEEP_KEYS, "activations": _ACT_KEYS, "training": _TRAIN_KEYS,
                                      "evaluation": _EVAL_KEYS, "measure": _MEASURE_KEYS}


class SweepConfigError(ExperimentError):
    """A sweep configuration that cannot be run (reported as one line, exit code 2)."""


@dataclass(frozen=True)
class Run:
    """One point of the grid: its index in the run order, its id and its full config."""

    index: int
    id: str
    config: dict[str, Any]


# -- configuration ----------------------------------------------------------------------

def _fail(where: str, message: str) -> NoReturn:
    raise SweepConfigError(f"{where}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _table(doc: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        _fail(source, f"[{name}] must be a table")
    allowed = _TABLES[name]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        _fail(source, f"unknown key(s) in [{name}]: {', '.join(unknown)} "
                      f"(allowed: {', '.join(allowed)})")
    return {**allowed, **value}


def _check_positive_int(v: Any, where: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not (_is_int(v) and v >= 1):
        _fail(where, f"must be a positive integer, got {v!r}")


def validate(doc: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The normalized configuration (defaults filled in) of a parsed TOML document.

    Raises :class:`SweepConfigError` naming the first problem.
    """
    from ..activations import get_activation
    from ..estimators import ESTIMATORS
    from ..models import FACTORIES
    from .training import LR_SCHEDULES, METHODS, OPTIMIZERS

    unknown = sorted(set(doc) - set(_TABLES) - {"models"})
    if unknown:
        _fail(source, f"unknown table(s) {', '.join(unknown)} "
                      f"(allowed: sweep, models, activations, training, evaluation, measure)")
    cfg = {name: _table(doc, name, source) for name in _TABLES}

    sw = cfg["sweep"]
    if not isinstance(sw["data"], str) or sw["data"].partition(":")[0] not in (
            "digits", "tensors", "npz", "cifar10", "cifar100"):
        _fail(source, f"[sweep] data must be a data spec (digits, cifar10:DIR, ...), got {sw['data']!r}")
    seeds = sw["seeds"]
    if not (isinstance(seeds, list) and seeds and all(_is_int(s) for s in seeds)) or len(set(seeds)) != len(seeds):
        _fail(source, f"[sweep] seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if not (_is_num(sw["eps"]) and sw["eps"] > 0):
        _fail(source, f"[sweep] eps must be a number > 0, got {sw['eps']!r}")
    sw["eps"] = float(sw["eps"])
    _check_positive_int(sw["max_train"], f"{source}: [sweep] max_train", allow_none=True)
    _check_positive_int(sw["max_test"], f"{source}: [sweep] max_test", allow_none=True)
    if not (isinstance(sw["device"], str) and re.fullmatch(r"cpu|cuda(:\d+)?", sw["device"])):
        _fail(source, f"[sweep] device must be cpu, cuda or cuda:N, got {sw['device']!r}")
    if sw["device"] != "cpu" and not torch.cuda.is_available():
        _fail(source, f"[sweep] device {sw['device']!r}: CUDA is not available here")

    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        _fail(source, f"[models] needs at least one table [models.NAME] with NAME in "
                      f"{', '.join(FACTORIES)}")
    for name, kwargs in models.items():
        if name not in FACTORIES:
            _fail(source, f"unknown model {name!r}; choose from {', '.join(FACTORIES)}")
        if not isinstance(kwargs, dict):
            _fail(source, f"[models.{name}] must be a table of keyword arguments")
        if "activation" in kwargs:
            _fail(source, f"[models.{name}] must not set activation (the sweep sets it)")
        try:
            inspect.signature(FACTORIES[name]).bind(**kwargs)
        except TypeError as err:
            _fail(source, f"[models.{name}]: {err}")
    cfg["models"] = {name: dict(kwargs) for name, kwargs in models.items()}

    act = cfg["activations"]
    for key in ("rct_n", "psi", "baselines"):
        if not isinstance(act[key], list):
            _fail(source, f"[activations] {key} must be a list, got {act[key]!r}")
    if any(n not in RCT_ORDERS for n in act["rct_n"]) or not all(_is_int(n) for n in act["rct_n"]):
        _fail(source, f"[activations] rct_n must list orders from {list(RCT_ORDERS)}, got {act['rct_n']!r}")
    if not all(_is_num(p) and p > 0 for p in act["psi"]):
        _fail(source, f"[activations] psi must list numbers > 0, got {act['psi']!r}")
    if bool(act["rct_n"]) != bool(act["psi"]):
        _fail(source, "[activations] rct_n and psi go together: give both or neither")
    act["psi"] = [float(p) for p in act["psi"]]
    for b in act["baselines"]:
        if not isinstance(b, str):
            _fail(source, f"[activations] baselines must be activation names, got {b!r}")
        try:
            get_activation(b)
        except Exception as err:  # noqa: BLE001 - any registry complaint is a config error
            _fail(source, f"[activations] baseline {b!r}: {err}")
    if not (act["rct_n"] or act["baselines"]):
        _fail(source, "[activations] is empty: give rct_n and psi, or baselines")

    tr = cfg["training"]
    methods = tr["methods"]
    if not (isinstance(methods, list) and methods and all(m in METHODS for m in methods)):
        _fail(source, f"[training] methods must be a non-empty list from {', '.join(METHODS)}, got {methods!r}")
    for key in ("epochs", "batch_size", "steps"):
        _check_positive_int(tr[key], f"{source}: [training] {key}")
    for key in ("lr", "beta", "weight_decay", "momentum"):
        if not (_is_num(tr[key]) and tr[key] >= 0):
            _fail(source, f"[training] {key} must be a number >= 0, got {tr[key]!r}")
    if tr["alpha"] is not None and not (_is_num(tr["alpha"]) and tr["alpha"] > 0):
        _fail(source, f"[training] alpha must be a number > 0, got {tr['alpha']!r}")
    if tr["optimizer"] not in OPTIMIZERS:
        _fail(source, f"[training] optimizer must be one of {', '.join(OPTIMIZERS)}, got {tr['optimizer']!r}")
    if tr["lr_schedule"] not in LR_SCHEDULES:
        _fail(source, f"[training] lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                      f"got {tr['lr_schedule']!r}")

    ev = cfg["evaluation"]
    _check_positive_int(ev["pgd_steps"], f"{source}: [evaluation] pgd_steps")
    _check_positive_int(ev["batch_size"], f"{source}: [evaluation] batch_size")
    if not isinstance(ev["autoattack"], bool):
        _fail(source, f"[evaluation] autoattack must be true or false, got {ev['autoattack']!r}")

    me = cfg["measure"]
    if me["estimator"] not in ESTIMATORS and me["estimator"] != "auto":
        _fail(source, f"[measure] unknown estimator {me['estimator']!r}; choose from {', '.join(sorted(ESTIMATORS))}")
    _check_positive_int(me["max_examples"], f"{source}: [measure] max_examples", allow_none=True)
    _check_positive_int(me["samples"], f"{source}: [measure] samples", allow_none=True)
    _check_positive_int(me["max_samples"], f"{source}: [measure] max_samples")
    if not (_is_num(me["rtol"]) and me["rtol"] > 0):
        _fail(source, f"[measure] rtol must be a number > 0, got {me['rtol']!r}")
    if not _is_int(me["seed"]):
        _fail(source, f"[measure] seed must be an integer, got {me['seed']!r}")
    if me["dtype"] not in (None, "float32", "float64"):
        _fail(source, f"[measure] dtype must be float32 or float64, got {me['dtype']!r}")
    if not isinstance(me["adversarial"], bool):
        _fail(source, f"[measure] adversarial must be true or false, got {me['adversarial']!r}")
    ids = [run.id for run in expand(cfg)]
    if len(set(ids)) != len(ids):
        _fail(source, "the grid repeats a run: remove repeated entries of rct_n, psi, "
                      "baselines or methods")
    return cfg


def _toml() -> Any:
    """``tomllib`` (Python 3.11+), else the ``tomli`` backport."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise SweepConfigError("reading a sweep config on Python 3.10 needs tomli: "
                               "pip install tomli (or 'hessdiag[experiments]')") from None
    return tomli


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and :func:`validate` a sweep TOML file."""
    source = str(path)
    tomllib = _toml()
    try:
        with open(path, "rb") as handle:
            doc = tomllib.load(handle)
    except FileNotFoundError:
        raise SweepConfigError(f"{source}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise SweepConfigError(f"{source}: invalid TOML: {err}") from None
    except OSError as err:
        raise SweepConfigError(f"{source}: cannot read: {err.strerror}") from None
    return validate(doc, source)


def _activations(act: dict[str, Any]) -> list[str]:
    specs = [f"rct:n={n},psi={p:.12g}" for n in act["rct_n"] for p in act["psi"]]
    return specs + list(act["baselines"])


def run_id(config: dict[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of the run config as canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def expand(cfg: dict[str, Any]) -> list[Run]:
    """The deterministic run order: models (file order) × activations (RCT-AF n, then ψ_max,
    then baselines) × methods × seeds."""
    sw, tr = cfg["sweep"], cfg["training"]
    runs: list[Run] = []
    for model, kwargs in cfg["models"].items():
        for activation in _activations(cfg["activations"]):
            for method in tr["methods"]:
                for seed in sw["seeds"]:
                    training = {k: v for k, v in tr.items() if k != "methods"
                                and not (k in _LATER_TRAIN_KEYS and v == _TRAIN_KEYS[k])}
                    config = {
                        "schema": SCHEMA_VERSION, "model": model, "model_kwargs": kwargs,
                        "activation": activation, "method": method, "seed": seed,
                        "data": sw["data"], "max_train": sw["max_train"], "max_test": sw["max_test"],
                        "eps": sw["eps"], "device": sw["device"], "training": training,
                        "evaluation": dict(cfg["evaluation"]), "measure": dict(cfg["measure"]),
                    }
                    runs.append(Run(len(runs), run_id(config), config))
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/K"`` → ``(I, K)`` with 0 ≤ I < K."""
    i, sep, k = text.partition("/")
    try:
        index, count = int(i), int(k)
    except ValueError:
        index = count = -1
    if not sep or count < 1 or not 0 <= index < count:
        raise SweepConfigError(f"--shard must be I/K with 0 <= I < K, got {text!r}")
    return index, count


# -- results file -----------------------------------------------------------------------

def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete, valid JSON records of a ``results.jsonl`` (others are skipped)."""
    file = Path(path)
    if not file.exists():
        return []
    records = []
    for line in file.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records.append(record)
    return records


def trim_torn_line(path: str | os.PathLike[str]) -> bool:
    """Cut a last line without its newline (a write cut short); True if one was cut."""
    file = Path(path)
    if not file.exists():
        return False
    data = file.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    with open(file, "r+b") as handle:
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line with a single ``os.write`` (``O_APPEND``), then fsync."""
    data = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a regular file takes it whole; a full disk may not
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


# -- one run ----------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """JSON-safe number: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pair(values: Any) -> list[float] | None:
    return None if values is None else [_finite(float(v)) for v in values]


def versions() -> dict[str, str | None]:
    """Versions of hessdiag, torch, torchattacks and Python."""
    from .. import __version__

    try:
        import torchattacks

        ta: str | None = getattr(torchattacks, "__version__", "unknown")
    except ImportError:
        ta = None
    return {"hessdiag": __version__, "torch": torch.__version__, "torchattacks": ta,
            "python": platform.python_version()}


def _measured(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor],
              me: dict[str, Any]) -> dict[str, Any]:
    from ..api import measure
    from ..result import UnresolvedEstimateWarning
    from .invariant import invariant_normalized_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnresolvedEstimateWarning)
        result = measure(model, data, estimator=me["estimator"], samples=me["samples"],
                         rtol=me["rtol"], max_samples=me["max_samples"], seed=me["seed"],
                         dtype=me["dtype"], device=_model_device(model), split_ggn=True,
                         keep_diagonal=True)
    diagonal = result.diagonal
    assert diagonal is not None  # kept on request
    return {
        "normalized_norm": _finite(result.normalized_norm),
        "ci95": _pair(result.ci95),
        "resolved": result.resolved,
        "ggn_normalized_norm": _finite(result.ggn_normalized_norm),
        "residual_normalized_norm": _finite(result.residual_normalized_norm),
        "residual_ci95": _pair(result.residual_ci95),
        "invariant_normalized_norm": _finite(invariant_normalized_norm(model, diagonal)),
        "estimator": result.estimator,
        "samples": result.samples,
        "num_params": result.num_params,
        "num_examples": result.num_examples,
        "seconds": result.seconds,
    }


def _model_device(model: torch.nn.Module) -> torch.device:
    from ._common import model_device

    return model_device(model)


def _adversarial(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                 tr: dict[str, Any], seed: int, device: torch.device) -> torch.Tensor:
    """PGD examples at the training ε (the training loop's steps and step size), made once."""
    from ._common import import_torchattacks, seeded

    ta = import_torchattacks()
    alpha = tr["alpha"] if tr["alpha"] is not None else 2.5 * eps / tr["steps"]
    attack = ta.PGD(model, eps=eps, alpha=alpha, steps=tr["steps"], random_start=True)
    with seeded(seed, device):
        out = [attack(x[i:i + 512], y[i:i + 512]).detach() for i in range(0, len(y), 512)]
    model.eval()
    return torch.cat(out)


def execute(run: Run, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train, evaluate and measure one run; save its checkpoint; return its record.

    The run seeds torch's global RNG (``torch.manual_seed(seed)`` before building the
    model); the caller's RNG state is restored afterwards, so that running sweeps in
    process (``jobs=1``) leaves the global generators as they were.
    """
    from ._common import forked_rng

    with forked_rng(torch.device(run.config["device"])):
        return _execute(run, out_dir)


def _execute(run: Run, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    from ..activations import get_activation, psi_max
    from ..io.checkpoints import save_checkpoint
    from ..io.data import load_data
    from ..models import FACTORIES
    from .attacks import evaluate
    from .training import train

    start = time.perf_counter()
    c = run.config
    x, y = load_data(c["data"], split="train", max_examples=c["max_train"])
    x_test, y_test = load_data(c["data"], split="test", max_examples=c["max_test"])
    kwargs = {**c["model_kwargs"], "activation": c["activation"]}
    device = torch.device(c["device"])
    torch.manual_seed(c["seed"])
    model = FACTORIES[c["model"]](**kwargs).to(device)
    tr = c["training"]
    adversarial = c["method"] != "standard"
    history = train(model, (x, y), c["method"], epochs=tr["epochs"], lr=tr["lr"],
                    batch_size=tr["batch_size"], eps=c["eps"] if adversarial else None,
                    alpha=tr["alpha"] if adversarial else None, steps=tr["steps"], beta=tr["beta"],
                    seed=c["seed"], optimizer=tr["optimizer"], weight_decay=tr["weight_decay"],
                    momentum=tr["momentum"], lr_schedule=tr.get("lr_schedule", "constant"))
    ev = c["evaluation"]
    attacks = ("pgd", "autoattack") if ev["autoattack"] else ("pgd",)
    robust = evaluate(model, (x_test, y_test), c["eps"], attacks=attacks, pgd_steps=ev["pgd_steps"],
                      seed=c["seed"], batch_size=ev["batch_size"])
    me = c["measure"]
    n = me["max_examples"]
    xm, ym = (x[:n], y[:n]) if n else (x, y)
    measures = {"clean": _measured(model, (xm, ym), me)}
    if me["adversarial"]:
        x_adv = _adversarial(model, xm.to(device), ym.to(device), c["eps"], tr, c["seed"], device)
        measures["adversarial"] = _measured(model, (x_adv.cpu(), ym), me)
    psi = psi_max(get_activation(c["activation"]))
    record = {
        "id": run.id, "index": run.index, "config": c, "psi_max": _finite(float(psi)),
        "clean_accuracy": robust.clean_accuracy, "pgd_accuracy": robust.pgd_accuracy,
        "autoattack_accuracy": robust.autoattack_accuracy, "eval_examples": robust.num_examples,
        "train_examples": len(y), "train_losses": [_finite(v) for v in history.losses],
        "measure": measures, "checkpoint": f"{CHECKPOINTS}/{run.id}.pt", "versions": versions(),
    }
    meta = {"data": c["data"], "loss": "ce", "sweep_run": run.id, "training": history.config.to_dict(),
            "test_accuracy": robust.clean_accuracy}
    save_checkpoint(Path(out_dir) / CHECKPOINTS / f"{run.id}.pt", model, f"hessdiag.models:{c['model']}",
                    kwargs, meta)
    record["seconds"] = time.perf_counter() - start
    return record


def _init_worker() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _worker(args: tuple[Run, str]) -> tuple[Run, dict[str, Any] | None, str | None]:
    run, out_dir = args
    try:
        return run, execute(run, out_dir), None
    except Exception as err:  # noqa: BLE001 - reported by the parent, the sweep goes on
        from ..errors import first_line

        return run, None, first_line(err, with_type=True)


# -- the sweep --------------------------------------------------------------------------

@dataclass
class SweepSummary:
    """What :func:`run_sweep` did: runs in its shard, skipped (done before), run now, failed."""

    total: int
    selected: int
    skipped: int
    done: int
    failed: list[str]


def run_sweep(config: str | os.PathLike[str] | dict[str, Any], out_dir: str | os.PathLike[str], *,
              jobs: int = 1, shard: tuple[int, int] = (0, 1),
              log: Callable[[str], None] | None = None) -> SweepSummary:
    """Run the runs of ``config`` (a TOML path or a :func:`validate`-d dict) not yet in
    ``out_dir/results.jsonl``; ``jobs`` worker processes (spawned), or in this process for
    ``jobs=1``; either way each run uses one torch thread, so that a run's numbers do not
    depend on ``jobs``. ``shard=(I, K)`` keeps the runs whose index in the run order is I
    modulo K."""
    cfg = load_config(config) if not isinstance(config, dict) else config
    if not (_is_int(jobs) and jobs >= 1):
        raise SweepConfigError(f"--jobs must be a positive integer, got {jobs!r}")
    index, count = shard
    say = log or (lambda text: None)
    out = Path(out_dir)
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    if trim_torn_line(results):
        say(f"trimmed a torn last line of {results}")
    done_ids = {r["id"] for r in read_results(results)}
    runs = expand(cfg)
    selected = [r for r in runs if r.index % count == index]
    todo = [r for r in selected if r.id not in done_ids]
    summary = SweepSummary(len(runs), len(selected), len(selected) - len(todo), 0, [])
    say(f"{len(runs)} runs, {len(selected)} in shard {index}/{count}, "
        f"{summary.skipped} done before, {len(todo)} to run with {jobs} job(s)")

    def finish(run: Run, record: dict[str, Any] | None, error: str | None) -> None:
        if record is None:
            summary.failed.append(run.id)
            say(f"run {run.index} {run.id} failed: {error}")
            return
        append_record(results, record)
        summary.done += 1
        say(f"run {run.index} {run.id} {run.config['model']} {run.config['activation']} "
            f"{run.config['method']} seed {run.config['seed']}: clean {record['clean_accuracy']:.3f} "
            f"pgd {record['pgd_accuracy']:.3f} norm {record['measure']['clean']['normalized_norm']:.3g} "
            f"({record['seconds']:.1f} s)")

    if jobs == 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: the same numbers whatever --jobs
        try:
            for run in todo:
                finish(*_worker((run, str(out))))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(jobs, len(todo)), initializer=_init_worker) as pool:
            for result in pool.imap_unordered(_worker, [(r, str(out)) for r in todo]):
                finish(*result)
    return summary


#: A sweep's RCT-AF activation spec, ``rct:n=N,psi=PSI``; group 1 is the order n.
RCT_ACTIVATION = re.compile(r"rct:n=(\d+),psi=")


def record_value(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    """A getter of the finite number at ``record[k1][k2]...`` of a results line (None if
    missing or not finite)."""
    def getter(record: dict[str, Any]) -> float | None:
        value: Any = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return getter


def records_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each run id."""
    return {r["id"]: r for r in records}


if __name__ == "__main__":  # pragma: no cover - python -m hessdiag.experiments.sweep CONFIG DIR
    print(run_sweep(sys.argv[1], sys.argv[2], log=print))
