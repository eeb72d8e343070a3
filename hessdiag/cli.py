"""Command line (docs/cli.md): argument parsing only; the API does the work.

Exit codes: 0 success; 2 bad input or usage (one line, no traceback); 1 unexpected
internal error (short message; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import HessdiagError, first_line

if TYPE_CHECKING:
    from .distributed import World
    from .result import Result

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"hessdiag: error: {message} (see hessdiag {self.prog.split()[-1]} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _smoothing(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object")
    return value


def _extras(text: str) -> str:
    from .extras import parse_extras

    try:
        parse_extras(text)
    except HessdiagError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _patterns(text: str) -> list[str]:
    """``--params``: comma-separated parameter names or glob patterns."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"--params {text!r}: an empty name or pattern")
    return items


def _add_measurement_options(p: argparse.ArgumentParser) -> None:
    from .estimators import estimator_names
    from .losses import LOSSES
    from .objective import HVP_ROUTES

    p.add_argument("--data", metavar="DATA",
                   help="digits | tensors:PATH | npz:PATH | cifar10:DIR | cifar100:DIR "
                        "(default: the checkpoint's, else digits)")
    p.add_argument("--split", default="train", choices=("train", "test", "all"),
                   help="split of digits/CIFAR; file specs hold one split (default: train)")
    p.add_argument("--max-examples", type=_positive_int, help="measure on the first N examples")
    p.add_argument("--batch-size", type=_positive_int, default=512, help="examples per batch (default: 512)")
    p.add_argument("--loss", choices=LOSSES,
                   help="loss, averaged over examples: ce, nll (log-probability outputs), bce (with logits), "
                        "mse, huber (default: the checkpoint's, else ce)")
    p.add_argument("--label-smoothing", type=_smoothing, metavar="EPS",
                   help="label smoothing of the ce loss, in [0, 1) (default: 0)")
    # The names include estimators added with register_estimator() before main() runs, and
    # those of installed packages' hessdiag.estimators entry points (loaded only if chosen).
    p.add_argument("--estimator", default="auto", choices=estimator_names(),
                   help="estimator (default: auto, the cheapest route the model's structure allows)")
    p.add_argument("--params", metavar="PATTERN", action="append", type=_patterns,
                   help="measure only these parameters: names or glob patterns on the dotted names of "
                        "named_parameters(), comma-separated or repeated, e.g. 'layer4.*' "
                        "(default: every parameter with requires_grad)")
    p.add_argument("--samples", type=_positive_int, help="fixed number of probes (stochastic estimators)")
    p.add_argument("--rtol", type=_positive_float, default=0.05,
                   help="adaptive stop: relative CI half-width (default: 0.05)")
    p.add_argument("--max-samples", type=_positive_int, default=1024, help="adaptive stop: probe cap (default: 1024)")
    p.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    p.add_argument("--split-ggn", action="store_true",
                   help="also report the Gauss-Newton and residual parts of the diagonal (exact GGN)")
    p.add_argument("--extras", metavar="LIST", type=_extras,
                   help="PyHessian context metrics: trace[:PROBES],top-eig[:K] (needs hessdiag[pyhessian])")
    p.add_argument("--dtype", choices=("float32", "float64"), help="compute dtype (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--hvp-route", default="auto", choices=HVP_ROUTES,
                   help="Hessian-vector products by vmap(jvp(grad)) (func), double backward "
                        "(autograd), or auto: func, falling back to autograd only where "
                        "torch.func refuses the model (default: auto)")
    p.add_argument("--max-params", type=_positive_int, help="parameter budget of the exact estimator")
    p.add_argument("--force", action="store_true", help="run the exact estimator above its budget")
    p.add_argument("--json", metavar="PATH", help="write the result document (docs/index.md) atomically")
    p.add_argument("--plot", metavar="PATH", help="write a per-layer bar chart (png/svg/pdf)")
    p.add_argument("--save-diagonal", metavar="PATH",
                   help="write the diagonal, one tensor per parameter, to a .safetensors file atomically")
    p.add_argument("--quiet", action="store_true", help="print only the total; no progress bar")
    p.add_argument("--distributed", action="store_true", default=None,
                   help="measure data-parallel over the ranks of torchrun or srun (docs/scaling.md); "
                        "under torchrun this is the default, srun's tasks join only with this flag")
    p.add_argument("--dist-timeout", type=_positive_float, metavar="SECONDS",
                   help="seconds a collective waits for the other ranks before every rank stops "
                        "(default: 1800)")


def build_parser() -> argparse.ArgumentParser:
    """The ``hessdiag`` argument parser with its subcommands."""
    parser = _Parser(prog="hessdiag", description="Diagonal of the loss Hessian of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("measure", help="measure diag H of a checkpoint")
    m.add_argument("checkpoint", metavar="CKPT",
                   help="native checkpoint, state dict (.pt/.pth/.ckpt) or .safetensors file")
    m.add_argument("--model", metavar="MODULE:ATTR",
                   help="class or factory building the network: package.module:Attr or path/to/file.py:Attr")
    m.add_argument("--model-kwargs", type=_json_object, metavar="JSON", help="keyword arguments for --model")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling arbitrary objects (a whole pickled model); runs code from the file")
    _add_measurement_options(m)

    psi = sub.add_parser("psi", help="ψ_max = sup φ'' of activations")
    psi.add_argument("activations", nargs="+", metavar="ACTIVATION",
                     help="registry names, e.g. gelu mish rct:n=2,alpha=7")

    check = sub.add_parser("check", help="analytic GGN + residual decomposition vs autograd on small MLPs, "
                                         "and the symbolic checks (exit 1 on any failure)")
    scope = check.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="a covering subset (default; what CI runs)")
    scope.add_argument("--full", action="store_true", help="every combination (210 cases)")
    check.add_argument("--activations", nargs="+", metavar="ACT",
                       help="rct0 rct1 rct2 silu gelu softplus tanh, or registry specs (default: all)")
    check.add_argument("--losses", nargs="+", choices=("ce", "mse"), help="default: both")
    check.add_argument("--depths", nargs="+", type=int, choices=range(1, 6), metavar="{1..5}",
                       help="hidden layers (default: 1-5)")
    check.add_argument("--batch-sizes", nargs="+", type=_positive_int, metavar="B", help="default: 1 5")
    check.add_argument("--no-symbolic", action="store_true", help="skip the sympy checks")
    check.add_argument("--seed", type=int, default=0, help="network and data seed (default: 0)")

    sweep = sub.add_parser("sweep", help="train, attack and measure a grid of runs from a TOML config "
                                         "(resumable, shardable)")
    sweep.add_argument("config", metavar="CONFIG.toml", help="sweep config (schema: docs/experiments.md)")
    sweep.add_argument("--out", required=True, metavar="DIR",
                       help="output folder: results.jsonl and checkpoints/ (reruns skip finished runs)")
    sweep.add_argument("--jobs", type=_positive_int, default=1, metavar="K",
                       help="worker processes on this machine, one torch thread each (default: 1)")
    sweep.add_argument("--shard", default="0/1", metavar="I/K",
                       help="keep the runs whose index in the run order is I modulo K (default: 0/1)")

    plot = sub.add_parser("plot", help="figures (PNG and PDF) of a sweep's results.jsonl")
    plot.add_argument("results", metavar="DIR", help="a sweep's output folder")
    plot.add_argument("--out", metavar="PREFIX",
                      help="path prefix of the figures (default: DIR/figures/sweep)")

    analyze = sub.add_parser("analyze", help="test the paper's psi_max claims on a sweep's results "
                                             "(markdown tables)")
    analyze.add_argument("results", metavar="DIR", help="a sweep's output folder")
    analyze.add_argument("--json", metavar="PATH", help="also write the analysis as JSON (atomically)")
    analyze.add_argument("--bootstrap", type=_positive_int, default=2000, metavar="B",
                         help="bootstrap resamples of the seeds (default: 2000)")

    demo = sub.add_parser("demo", help="measure the bundled example checkpoint")
    demo.add_argument("--estimator", default="auto", help="estimator (default: auto)")
    return parser


def _measure_reporting_later(*args: Any, **kwargs: Any) -> Result:
    """:func:`hessdiag.measure` with its UnresolvedEstimateWarning held back (the filter is
    scoped to this call; other warnings pass unchanged): :func:`_report_unresolved` prints
    it as one line once the table is out."""
    from .api import measure
    from .result import UnresolvedEstimateWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnresolvedEstimateWarning)
        return measure(*args, **kwargs)


def _report_unresolved(result: Result) -> None:
    """The one-line ``hessdiag: warning:`` on stderr for an unresolved total or residual."""
    message = result.resolution_warning()
    if message is not None:
        sys.stdout.flush()  # after the table, also when both streams go to one file
        print(f"hessdiag: warning: {message}", file=sys.stderr)


def _measure(args: argparse.Namespace) -> int:
    from .distributed import joined_world

    with joined_world(args.distributed, args.device, args.dist_timeout) as (world, device), \
            warnings.catch_warnings():
        if world.rank != 0:  # rank 0 reports for all; the others stay silent
            warnings.simplefilter("ignore")
        return _measure_on_rank(args, world, device)


def _measure_on_rank(args: argparse.Namespace, world: World, device: Any) -> int:
    from .io import load_checkpoint, load_data
    from .losses import resolve_loss
    from .output import check_outputs, write_diagonal, write_json, write_plot
    from .progress import progress_bar

    failure: BaseException | None = None
    try:
        check_outputs(args.json, args.plot, args.save_diagonal)  # before any work: a bad path wastes no run
        model, meta = load_checkpoint(args.checkpoint, model=args.model, model_kwargs=args.model_kwargs,
                                      trust=args.trust_checkpoint)
        spec = args.data or meta.get("data") or "digits"
        loss = args.loss or meta.get("loss") or "ce"
        if args.label_smoothing and loss != "ce":
            raise HessdiagError(f"--label-smoothing applies to the ce loss, not {loss}")
        data = load_data(spec, split=args.split, max_examples=args.max_examples)
    except Exception as err:  # noqa: BLE001 - every rank learns of it before any collective
        if not world.distributed:
            raise
        failure = err
    world.agree(failure)  # one rank that cannot load its input stops all of them
    terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    with progress_bar(enabled=terminal and not args.quiet and world.rank == 0) as progress:
        result = _measure_reporting_later(
            model, data, loss=resolve_loss(loss, label_smoothing=args.label_smoothing),
            estimator=args.estimator,
            params=None if args.params is None else [p for group in args.params for p in group],
            samples=args.samples, rtol=args.rtol,
            max_samples=args.max_samples, seed=args.seed, dtype=args.dtype, device=device,
            batch_size=args.batch_size, hvp_route=args.hvp_route,
            max_params=args.max_params, force=args.force,
            checkpoint=str(args.checkpoint), split_ggn=args.split_ggn,
            extras=args.extras, keep_diagonal=bool(args.save_diagonal), progress=progress,
            distributed=world.distributed or None,
        )
    if world.rank != 0:
        return EXIT_OK
    print(result.total_text() if args.quiet else result.table())
    _report_unresolved(result)
    if args.json:
        write_json(result, args.json)
    if args.plot:
        write_plot(result, args.plot)
    if args.save_diagonal:
        write_diagonal(result, args.save_diagonal)
    return EXIT_OK


def _psi(args: argparse.Namespace) -> int:
    from .activations import get_activation, psi_max

    rows = [(spec, psi_max(get_activation(spec))) for spec in args.activations]
    width = max(len(spec) for spec, _ in rows)
    for spec, value in rows:
        print(f"{spec.ljust(width)}  {value:.4g}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from .check import battery, run_check

    cases = battery(full=args.full, activations=args.activations, losses=args.losses,
                    depths=args.depths, batch_sizes=args.batch_sizes)
    report = run_check(cases, symbolic=not args.no_symbolic, seed=args.seed)
    return EXIT_OK if report.passed else EXIT_INTERNAL


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CHECKPOINT, bundled_checkpoint
    from .io import load_checkpoint, load_data

    path = bundled_checkpoint()
    if not path.is_file():
        raise HessdiagError(f"bundled checkpoint hessdiag/data/{DEMO_CHECKPOINT} is missing from the "
                            "installed package; reinstall hessdiag, or run examples/train_digits.py")
    model, meta = load_checkpoint(path)
    data = load_data(meta.get("data", "digits"), split="test")
    print(f"hessdiag demo: {path.name} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"test accuracy {meta.get('test_accuracy', float('nan')):.3f}), "
          f"{len(data[1])} test examples, float64")
    result = _measure_reporting_later(model, data, loss=meta.get("loss", "ce"),
                                      estimator=args.estimator, dtype="float64",
                                      checkpoint=str(path))
    print(result.table())
    _report_unresolved(result)
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    from .experiments.sweep import load_config, parse_shard, run_sweep

    shard = parse_shard(args.shard)
    config = load_config(args.config)  # validated before any output is touched
    summary = run_sweep(config, args.out, jobs=args.jobs, shard=shard,
                        log=lambda text: print(f"hessdiag sweep: {text}", flush=True))
    print(f"hessdiag sweep: {summary.done} run(s) finished, {summary.skipped} skipped, "
          f"{len(summary.failed)} failed; results in {args.out}/results.jsonl", flush=True)
    return EXIT_INTERNAL if summary.failed else EXIT_OK


def _plot(args: argparse.Namespace) -> int:
    from .experiments.plot import plot_sweep

    for path in plot_sweep(args.results, args.out):
        print(path)
    return EXIT_OK


def _analyze(args: argparse.Namespace) -> int:
    from .experiments.analysis import analyze_sweep, render_markdown, write_analysis
    from .output import check_output_path

    if args.json:
        check_output_path(args.json, "--json")
    analyses = analyze_sweep(args.results, n_boot=args.bootstrap)
    print(render_markdown(analyses), end="")
    if args.json:
        write_analysis(analyses, args.json)
    return EXIT_OK


def _launch_rank(slurm: bool = False) -> int:
    """This process's rank in a launcher's world of several ranks (0 outside one)."""
    from .distributed import launch_environment

    try:
        env = launch_environment(slurm=slurm)
    except HessdiagError:
        return 0
    return env.rank if env is not None and env.size > 1 else 0


def _rank_label() -> str:
    """`` (rank 3)`` in a process that torchrun started as a rank other than 0, else nothing."""
    rank = _launch_rank()
    return f" (rank {rank})" if rank else ""


def _reported_elsewhere(err: HessdiagError) -> bool:
    """An error of a distributed run that rank 0 reports for every rank (the ranks agreed on
    it, or this rank only stopped because another failed): the other ranks stay silent."""
    from .distributed import DistributedError

    return isinstance(err, DistributedError) and err.shared and _launch_rank(slurm=True) != 0


COMMANDS = {"measure": _measure, "psi": _psi, "check": _check, "demo": _demo, "sweep": _sweep,
            "plot": _plot, "analyze": _analyze}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessdiag`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HessdiagError as err:
        if not _reported_elsewhere(err):
            print(f"hessdiag: error{_rank_label()}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hessdiag: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place internal errors are reported
        if args.debug:
            raise
        print(f"hessdiag: internal error: {first_line(err, with_type=True)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
