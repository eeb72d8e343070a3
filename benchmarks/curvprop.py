"""curvprop against the other estimators: interval width per wall time, exact ReLU GGN, accuracy.

Four parts (``--part``), each on one model and one data set, all methods in one run:

``resnet``
    ``hessdiag.models.resnet18_cifar`` with a smooth activation (``--activations``; SiLU and
    RCT-AF(n=1, α=14) by default), width ``--width``, on ``--examples`` CIFAR-shaped inputs
    (sklearn digits upsampled to 3×32×32 and standardized, or ``--inputs random``), float32,
    cross-entropy. The network is trained for ``--train-epochs`` seeded Adam epochs on all
    1797 upsampled digits (0: left at its initialization) and its BatchNorm running
    statistics are then recomputed on those data; it is measured in eval mode on the first
    ``--examples`` examples of a seeded permutation. For ``hutchinson``,
    ``hutchinson-ggn`` and ``curvprop`` at fixed budgets (``samples``: HVPs for the first,
    residual products for the second, replicates for curvprop) the script records the wall
    time, the 95 % interval's relative half-width on the normalized norm ‖diag H‖₂/√P, and
    the time in *plain-backward equivalents*: wall time divided by the median time of one
    plain forward + backward of the mean loss on the same model and data, timed between
    the runs (the runs of all methods are interleaved, budget by budget, so load on the
    machine affects all alike). Equal-time comparison: for each curvprop run, the
    competitor's run with the smallest wall time ≥ curvprop's gives a lower bound on the
    half-width ratio at equal time (more time never widens an interval, in expectation);
    the nearest run in time, rescaled by √(its time / curvprop's time), gives an estimate.
``exact-relu``
    Piecewise-linear networks, where diag H = diag GGN exactly: torchvision ``resnet18``
    (num_classes=10; a 7×7 stride-2 stem and max pooling, so 32×32 inputs leave 8×8 maps
    in its first stage) and ``resnet18_cifar(activation="relu", width=--width)`` (32×32
    maps in its first stage) on ``--relu-examples`` random inputs
    of 3×32×32, float32. :func:`hessdiag.curvature_tape.tape_ggn_diagonal` against BackPACK
    ``DiagGGNExact`` through ``hessdiag.ggn.ggn_diagonal(objective, method="backpack")``
    (BackPACK's graph converter for ResNets) and against ``hutchinson`` given as many HVPs
    as fit in the tape's time; agreement as max |tape − BackPACK| / max |BackPACK|.
``digits``
    A conv net with BatchNorm and SiLU (P = 2,668), trained 5 seeded epochs on all 1797
    sklearn digits, float64. Exact diagonal from basis-vector HVPs (``exact`` without its
    MLP fast path; cached in ``benchmarks/.cache``); then ``--digits-seeds`` seeded
    curvprop runs at the default ``rtol`` = 0.05 and at fixed budgets, and
    ``--digits-hutchinson-seeds`` runs of ``hutchinson`` at fixed budgets for comparison:
    error of the normalized norm and coverage of its 95 % interval. The exact diagonal takes about
    10 minutes on 2 cores the first time.
``profile``
    Where curvprop's time goes on the ``resnet`` model (first activation): timers around
    the :class:`~hessdiag.curvature_tape.TapedBatch` steps (forward, loss-gradient pass, C
    GGN passes, residual passes) and, inside them, around the per-example square sums
    (:meth:`hessdiag.per_example.AffineCall.square_sums`, by layer type); and one hooked
    backward pass with the CPU's per-example chunk size against 64 MB chunks.

Defaults are small: on 2 shared cores about 7 minutes per activation for ``resnet`` (run
one activation at a time), 3 for ``exact-relu``, 1–2 for ``profile`` and 10 for
``digits`` (plus 10 the first time, for the exact diagonal). Larger settings, e.g.
``--width 32 --examples 512 --batch-size 128 --chunk 4`` or
``--curvprop-samples 16 64 --hutchinson-samples 16 64 128``, take correspondingly longer
(each hooked backward pass costs about one plain backward; each HVP about two to three).

Run: ``PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python benchmarks/curvprop.py --part resnet``
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from hessdiag import per_example  # noqa: E402
from hessdiag.curvature_tape import TapedBatch, tape_ggn_diagonal  # noqa: E402
from hessdiag.estimators import CurvpropEstimator, EstimatorOptions, get_estimator  # noqa: E402
from hessdiag.estimators.curvprop import _rademacher_like  # noqa: E402
from hessdiag.estimators.exact import ExactEstimator  # noqa: E402
from hessdiag.ggn import ggn_diagonal  # noqa: E402
from hessdiag.io import load_data  # noqa: E402
from hessdiag.models import resnet18_cifar  # noqa: E402
from hessdiag.objective import Objective, evaluation_mode  # noqa: E402
from hessdiag.stats import half_width_on_norm  # noqa: E402
from hessdiag.training import accuracy, train_classifier  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
METHODS = ("curvprop", "hutchinson", "hutchinson-ggn")


# -- shared helpers ---------------------------------------------------------------------------


def median_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_backward(model: nn.Module, x: Tensor, y: Tensor):
    """One forward + backward of the mean cross-entropy, the unit of cost."""
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return run


def flat(parts: dict[str, Tensor], names) -> Tensor:
    return torch.cat([parts[n].detach().reshape(-1).double() for n in names])


def normalized(sq_norm: float, num: int) -> float:
    return math.sqrt(max(sq_norm, 0.0) / num)


def summarize(estimate, num: int) -> tuple[float, tuple[float, float], float]:
    """(normalized norm, its 95 % interval, relative half-width) of a stochastic estimate."""
    total = estimate.norm_statistics["total"]
    lo, hi = (normalized(c, num) for c in total.ci95)
    return normalized(total.sq_norm, num), (lo, hi), half_width_on_norm(total)


def digits_images(size: int = 32, channels: int = 3) -> tuple[Tensor, Tensor]:
    """All 1797 digits, bilinearly upsampled to size×size, repeated over channels, standardized."""
    x, y = load_data("digits", "all")
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    return (x - x.mean()) / x.std(), y


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: Tensor, batch: int = 256) -> None:
    """Running statistics of every BatchNorm = exact averages over ``x`` (train-mode passes)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for start in range(0, len(x), batch):
        model(x[start : start + batch])
    for m in norms:
        m.momentum = 0.1
    model.eval()


# -- part 1: smooth ResNet, interval width per wall time --------------------------------------


def resnet_case(args, activation: str) -> tuple[nn.Module, Tensor, Tensor, str]:
    torch.manual_seed(args.seed)
    model = resnet18_cifar(activation=activation, width=args.width)
    if args.inputs == "digits":
        x_all, y_all = digits_images()
        note = ""
        if args.train_epochs:
            start = time.perf_counter()
            train_classifier(model, x_all, y_all, epochs=args.train_epochs, seed=args.seed)
            note = f"trained {args.train_epochs} epoch(s) in {time.perf_counter() - start:.0f} s, "
        calibrate_batchnorm(model, x_all)
        note += f"accuracy on all digits {accuracy(model, x_all, y_all):.3f}"
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(args.seed))
        x, y = x_all[order[: args.examples]], y_all[order[: args.examples]]
    else:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.examples, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.examples,), generator=g)
        calibrate_batchnorm(model, x)
        note = "random inputs and labels, untrained"
    return model.eval(), x, y, note


def run_estimator(objective: Objective, name: str, samples: int, seed: int, probe_layers: int | None = None):
    """``name`` with ``samples`` and ``seed`` (curvprop: ``probe_layers``, default its own)."""
    options = EstimatorOptions(samples=samples, seed=seed)
    if name == "curvprop":
        estimator = (CurvpropEstimator(options) if probe_layers is None
                     else CurvpropEstimator(options, probe_layers=probe_layers))
    else:
        estimator = get_estimator(name, options)
    start = time.perf_counter()
    estimate = estimator.estimate(objective)
    return estimate, time.perf_counter() - start


def block_shares(estimate, numels: dict[str, int]) -> list[tuple[str, int, float, float]]:
    """(block, parameters, share of the estimated ‖d‖², block half-width), largest first."""
    stats = estimate.norm_statistics
    total = stats["total"].sq_norm
    out = [(name, numels[name], stats[name].sq_norm / total if total else math.nan,
            half_width_on_norm(stats[name])) for name in numels]
    return sorted(out, key=lambda row: -abs(row[2]))


def resnet_part(args) -> None:
    budgets = {"curvprop": args.curvprop_samples, "hutchinson": args.hutchinson_samples,
               "hutchinson-ggn": args.ggn_samples}
    rounds = max(len(v) for v in budgets.values())
    for activation in args.activations:
        t0 = time.perf_counter()
        model, x, y, note = resnet_case(args, activation)
        batch = args.batch_size or args.examples
        objective = Objective(model, (x, y), "ce", batch_size=batch, chunk_size=args.chunk)
        num = objective.num_params
        anchor = plain_backward(model, x, y)
        anchor()  # warm-up
        # Warm-up of the HVP route (the first HVP times both routes once per objective).
        objective.hessian.apply(objective.unflatten(torch.ones(2, num)))
        anchors: list[float] = []
        rows = []
        for i in range(rounds):
            for seed in range(args.seeds):
                for method in METHODS:
                    if i >= len(budgets[method]):
                        continue
                    anchors.append(median_time(anchor, 1))
                    samples = budgets[method][i]
                    estimate, secs = run_estimator(objective, method, samples, seed,
                                                   args.curvprop_probe_layers)
                    value, ci, half = summarize(estimate, num)
                    passes = estimate.info.get("backward_passes")
                    cost = f"{passes} backward passes" if passes else f"{estimate.hvps} HVPs"
                    if estimate.info.get("probe_products"):
                        cost += f" + {estimate.info['probe_products']} probe products"
                    rows.append(dict(method=method, samples=samples, seed=seed, secs=secs,
                                     value=value, ci=ci, half=half, cost=cost,
                                     blocks=block_shares(estimate, objective.numels)))
                    print(f"# {activation} {method} samples={samples} seed={seed}: {secs:.1f} s, "
                          f"half-width {100 * half:.2f} %", file=sys.stderr, flush=True)
        backward = statistics.median(anchors)
        print(f"\n### resnet18_cifar({activation}), width {args.width}: P = {num:,}, "
              f"N = {args.examples} ({args.inputs}; {note}), batch {batch}, HVP chunk {args.chunk}, "
              f"float32, {torch.get_num_threads()} threads\n")
        print(f"Plain forward + backward of the mean loss: median {backward:.3f} s over "
              f"{len(anchors)} timings interleaved with the runs [{min(anchors):.3f}, "
              f"{max(anchors):.3f}]; part total {time.perf_counter() - t0:.0f} s.\n")
        print("| method | samples | seed | cost | wall s | × plain backward | normalized norm "
              "[95 % interval] | rel. half-width |")
        print("|---|---:|---:|---:|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['samples']} | {r['seed']} | {r['cost']} | "
                  f"{r['secs']:.1f} | {r['secs'] / backward:.0f} | {r['value']:.5g} "
                  f"[{r['ci'][0]:.5g}, {r['ci'][1]:.5g}] | {100 * r['half']:.2f} % |")
        if args.seeds > 1:
            print(f"\nOver {args.seeds} seeds: medians [min, max].\n")
            print("| method | samples | wall s | × plain backward | rel. half-width |")
            print("|---|---:|---:|---:|---|")
            for method in METHODS:
                for samples in budgets[method]:
                    runs = [r for r in rows if r["method"] == method and r["samples"] == samples]
                    halves = [r["half"] for r in runs]
                    secs = statistics.median(r["secs"] for r in runs)
                    print(f"| {method} | {samples} | {secs:.1f} | {secs / backward:.0f} | "
                          f"{100 * statistics.median(halves):.1f} % [{100 * min(halves):.1f}, "
                          f"{100 * max(halves):.1f}] |")
        print("\nLargest parameter blocks of each method's largest run: share of the estimated "
              "‖diag H‖² and the relative half-width of the block's own normalized norm.\n")
        print("| method (samples) | block | parameters | share of ‖d‖² | block half-width |")
        print("|---|---|---:|---:|---:|")
        for method in METHODS:
            runs = [r for r in rows if r["method"] == method]
            if runs:
                last = max(runs, key=lambda r: (r["samples"], -r["seed"]))
                for name, size, share, block_half in last["blocks"][:3]:
                    print(f"| {method} ({last['samples']}) | {name} | {size:,} | "
                          f"{100 * share:.0f} % | {100 * block_half:.0f} % |")
        print("\nEqual wall time: half-width of the competitor / half-width of curvprop.\n")
        print("| curvprop samples (s) | competitor | lower bound: run with time ≥ curvprop's "
              "| ratio ≥ | nearest run, × √(t/t_curvprop) | ratio ≈ |")
        print("|---|---|---|---:|---|---:|")
        for cp in (r for r in rows if r["method"] == "curvprop"):
            for other in ("hutchinson", "hutchinson-ggn"):
                runs = [r for r in rows if r["method"] == other]
                if not runs:
                    continue
                longer = [r for r in runs if r["secs"] >= cp["secs"]]
                if longer:
                    lb = min(longer, key=lambda r: r["secs"])
                    bound = (f"{lb['samples']} ({lb['secs']:.0f} s): {100 * lb['half']:.2f} %",
                             f"{lb['half'] / cp['half']:.1f}×")
                else:
                    bound = ("none took as long", "—")
                near = min(runs, key=lambda r: abs(math.log(r["secs"] / cp["secs"])))
                scaled = near["half"] * math.sqrt(near["secs"] / cp["secs"])
                print(f"| {cp['samples']} ({cp['secs']:.0f} s, {100 * cp['half']:.2f} %) | {other} | "
                      f"{bound[0]} | {bound[1]} | {near['samples']} ({near['secs']:.0f} s): "
                      f"{100 * scaled:.2f} % | {scaled / cp['half']:.1f}× |")
        sys.stdout.flush()


# -- part 2: exact ReLU ResNet-18 --------------------------------------------------------------


def relu_models(width: int):
    import torchvision

    yield "torchvision resnet18", lambda: torchvision.models.resnet18(num_classes=10)
    yield f"resnet18_cifar(relu, width {width})", lambda: resnet18_cifar(activation="relu",
                                                                         width=width)


def exact_relu_part(args) -> None:
    print(f"\n### Exact diagonal of ReLU ResNet-18s: {args.relu_examples} random 3×32×32 inputs, "
          f"float32, median of {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | P | method | median s | × plain backward | normalized norm | "
          "agreement with BackPACK |")
    print("|---|---:|---|---:|---:|---|---|")
    notes = []
    for label, factory in relu_models(args.width):
        torch.manual_seed(args.seed)
        model = factory()
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.relu_examples, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.relu_examples,), generator=g)
        calibrate_batchnorm(model, torch.randn(256, 3, 32, 32, generator=g))
        objective = Objective(model, (x, y), "ce", batch_size=None, chunk_size=args.chunk)
        names = list(objective.params)
        num = objective.num_params
        results: dict[str, object] = {}
        runs = {
            "plain backward": plain_backward(model, x, y),
            "tape_ggn_diagonal": lambda: results.__setitem__("tape", tape_ggn_diagonal(objective)),
            "curvprop estimator": lambda: results.__setitem__(
                "curvprop", get_estimator("curvprop").estimate(objective).diagonal),
            "BackPACK DiagGGNExact": lambda: results.__setitem__(
                "backpack", ggn_diagonal(objective, method="backpack")),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        failed: dict[str, str] = {}
        for name, run in runs.items():  # warm-up
            try:
                run()
            except Exception as err:  # noqa: BLE001 - reported in the table
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        for _ in range(args.repeats):
            for name, run in runs.items():
                if name not in failed:
                    times[name].append(median_time(run, 1))
        med = {k: statistics.median(v) for k, v in times.items() if v}
        backward = med["plain backward"]
        exact = flat(results["tape"], names)
        exact_norm = float(exact.norm()) / math.sqrt(num)
        reference = None
        if "backpack" in results:
            bp_diag, used = results["backpack"]  # type: ignore[misc]
            reference = flat(bp_diag, names)
            notes.append(f"{label}: BackPACK ran through '{used}'")
        for name in runs:
            if name in failed:
                print(f"| {label} | {num:,} | {name} | fails: {failed[name]} | — | — | — |")
                continue
            value, agree = "—", "—"
            key = {"tape_ggn_diagonal": "tape", "curvprop estimator": "curvprop",
                   "BackPACK DiagGGNExact": "backpack"}.get(name)
            if key is not None:
                diag = results[key] if key != "backpack" else results[key][0]  # type: ignore[index]
                vec = flat(diag, names)
                value = f"{float(vec.norm()) / math.sqrt(num):.6g}"
                if reference is not None and key != "backpack":
                    agree = f"{float((vec - reference).abs().max() / reference.abs().max()):.1e}"
            print(f"| {label} | {num:,} | {name} | {med[name]:.2f} | {med[name] / backward:.1f} | "
                  f"{value} | {agree} |")
        if "BackPACK DiagGGNExact" in med:
            notes.append(f"{label}: tape / BackPACK time = "
                         f"{med['tape_ggn_diagonal'] / med['BackPACK DiagGGNExact']:.2f}")
        # hutchinson with as many HVPs as fit in the tape's time (at least 6: a sketch of
        # rank 1 and 4 probes)
        start = time.perf_counter()
        objective.hessian.apply(objective.unflatten(torch.ones(2, num)))
        per_hvp = (time.perf_counter() - start) / 2
        start = time.perf_counter()
        objective.hessian.apply(objective.unflatten(torch.ones(2, num)))
        per_hvp = min(per_hvp, (time.perf_counter() - start) / 2)
        samples = max(6, int(med["tape_ggn_diagonal"] / per_hvp))
        estimate, secs = run_estimator(objective, "hutchinson", samples, args.seed)
        value, ci, half = summarize(estimate, num)
        print(f"| {label} | {num:,} | hutchinson, {samples} HVPs | {secs:.2f} | "
              f"{secs / backward:.1f} | {value:.6g} [{ci[0]:.4g}, {ci[1]:.4g}], half-width "
              f"{100 * half:.0f} %, error {100 * (value / exact_norm - 1):+.0f} % | — |")
        sys.stdout.flush()
    print()
    for note in notes:
        print(f"- {note}")


# -- part 3: digits CNN, accuracy and coverage against the exact diagonal ----------------------


def digits_cnn() -> nn.Sequential:
    """Conv(1→6)–BN–SiLU, Conv(6→12, stride 2)–BN–SiLU, Linear(192→10): P = 2,668."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.SiLU(),
        nn.Conv2d(6, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.SiLU(),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
    )


def digits_case(seed: int = 0):
    """(model, x, y, exact diagonal flat [P], seconds of the exact run or None if cached)."""
    x, y = load_data("digits", "all")
    x = x.double()
    torch.manual_seed(seed)
    model = digits_cnn().double()
    train_classifier(model, x, y, epochs=5, seed=seed)
    model.eval()
    path = CACHE / f"digits_cnn_bn_silu_seed{seed}_torch{torch.__version__}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if torch.equal(saved["params"], flat(dict(model.named_parameters()),
                                             [n for n, _ in model.named_parameters()])):
            return model, x, y, saved["diagonal"], None
    objective = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=600)
    start = time.perf_counter()
    exact = ExactEstimator(EstimatorOptions(force=True), analytic=False).estimate(objective)
    seconds = time.perf_counter() - start
    diagonal = flat(exact.diagonal, list(objective.params))
    CACHE.mkdir(exist_ok=True)
    torch.save({"diagonal": diagonal,
                "params": flat(dict(model.named_parameters()),
                               [n for n, _ in model.named_parameters()])}, path)
    return model, x, y, diagonal, seconds


def digits_part(args) -> None:
    t0 = time.perf_counter()
    model, x, y, exact_diag, exact_secs = digits_case(args.seed)
    objective = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=None,
                          chunk_size=32)
    num = objective.num_params
    exact = float(exact_diag.norm()) / math.sqrt(num)
    ggn = flat(tape_ggn_diagonal(objective), list(objective.params))
    func_ggn = flat(objective.ggn.per_example_diagonal(), list(objective.params))
    residual = exact_diag - ggn
    anchor = median_time(plain_backward(model, x, y), 5)
    objective.hessian.apply(objective.unflatten(torch.ones(2, num, dtype=torch.float64)))  # HVP route
    settings = ([("curvprop", "rtol 0.05 (default)", None)]
                + [("curvprop", f"{s} replicates", s) for s in args.digits_samples]
                + [("hutchinson", f"{s} HVPs", s) for s in args.digits_hutchinson_samples])
    records: dict[str, list[dict]] = {label: [] for _, label, _ in settings}
    for seed in range(args.digits_seeds):
        for method, label, samples in settings:
            if method == "hutchinson" and seed >= args.digits_hutchinson_seeds:
                continue
            est = get_estimator(method, EstimatorOptions(samples=samples, seed=1000 + seed))
            start = time.perf_counter()
            estimate = est.estimate(objective)
            secs = time.perf_counter() - start
            value, ci, half = summarize(estimate, num)
            records[label].append(dict(err=value / exact - 1, cover=ci[0] <= exact <= ci[1],
                                       reps=(estimate.samples if method == "curvprop"
                                             else estimate.hvps), half=half, secs=secs,
                                       passes=estimate.info.get("backward_passes", "—")))
        print(f"# digits seed {seed + 1}/{args.digits_seeds} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    cached = "cached" if exact_secs is None else f"{exact_secs:.0f} s"
    print(f"\n### Digits CNN (Conv–BN–SiLU ×2, Linear), P = {num:,}, all {len(y)} digits, "
          f"float64, accuracy {accuracy(model, x, y):.3f}\n")
    print(f"Exact normalized norm {exact:.6g} (basis-vector HVPs: {cached}); "
          f"‖diag GGN‖/‖diag H‖ = {float(ggn.norm() / exact_diag.norm()):.3f}, "
          f"‖diag H − diag GGN‖/‖diag H‖ = {float(residual.norm() / exact_diag.norm()):.3f}; "
          f"exact GGN diagonal from the tape vs torch.func (``objective.ggn.per_example_diagonal``): "
          f"max |Δ|/max = {float((ggn - func_ggn).abs().max() / func_ggn.abs().max()):.1e}. "
          f"Plain forward + backward over all digits: {1e3 * anchor:.1f} ms. "
          f"Seeds: {args.digits_seeds} per curvprop row, "
          f"{min(args.digits_seeds, args.digits_hutchinson_seeds)} per hutchinson row "
          f"(HVPs in chunks of 32); part total {time.perf_counter() - t0:.0f} s.\n")
    print("| method | setting | replicates / HVPs median [min, max] | backward passes | median |err| | "
          "max |err| | median signed err | median rel. half-width | 95 % coverage | "
          "median s (× plain backward) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for method, label, _ in settings:
        r = records[label]
        if not r:
            continue
        reps = [v["reps"] for v in r]
        errs = [v["err"] for v in r]
        secs = statistics.median(v["secs"] for v in r)
        passes = r[len(r) // 2]["passes"] if method == "curvprop" else "—"
        print(f"| {method} | {label} | {statistics.median(reps):.0f} [{min(reps)}, {max(reps)}] | "
              f"{passes} | {100 * statistics.median(abs(e) for e in errs):.2f} % | "
              f"{100 * max(abs(e) for e in errs):.2f} % | {100 * statistics.median(errs):+.2f} % | "
              f"{100 * statistics.median(v['half'] for v in r):.2f} % | "
              f"{100 * sum(v['cover'] for v in r) / len(r):.0f} % | "
              f"{secs:.2f} ({secs / anchor:.0f}) |")


# -- part 4: profile of curvprop on the ResNet -------------------------------------------------


def profile_part(args) -> None:
    activation = args.activations[0]
    model, x, y, note = resnet_case(args, activation)
    objective = Objective(model, (x, y), "ce", batch_size=None)
    anchor = plain_backward(model, x, y)
    anchor()
    backward = median_time(anchor, 3)
    with torch.no_grad():
        forward = median_time(lambda: model(x), 3)
    squares: collections.Counter[str] = collections.Counter()
    original = per_example.AffineCall.square_sums

    def timed(self, grad, weights):
        start = time.perf_counter()
        out = original(self, grad, weights)
        squares[self.func.__name__] += time.perf_counter() - start
        return out

    steps: dict[str, list[float]] = collections.defaultdict(list)
    inside: dict[str, float] = collections.Counter()

    def step(label: str, run, passes: int = 0):
        before = sum(squares.values())
        start = time.perf_counter()
        out = run()
        steps[label].append(time.perf_counter() - start)
        inside[label] += sum(squares.values()) - before
        return out

    per_example.AffineCall.square_sums = timed
    try:
        generator = torch.Generator().manual_seed(0)
        for repeat in range(args.profile_repeats + 1):  # the first one warms up, unrecorded
            if repeat == 1:
                steps.clear()
                inside.clear()
                squares.clear()
            with evaluation_mode(model):
                batch = step("forward (TapedBatch)", lambda: TapedBatch(objective, x, y))
                step("loss-gradient pass", batch.loss_gradient)
                step("GGN passes (C = 10)", batch.ggn_squares)
                coefficients = [site.coefficient() for site in batch.sites]
                positive = [c.clamp(min=0).sqrt() for c in coefficients]
                negative = [(-c).clamp(min=0).sqrt() for c in coefficients]
                for _ in range(args.profile_replicates):
                    signs = step("Rademacher draws",
                                 lambda: [_rademacher_like(generator, c) for c in coefficients])
                    for part in (positive, negative):
                        step("residual passes (2 per replicate)", lambda: batch.injected_squares(
                            [s * p for s, p in zip(signs, part)]))
    finally:
        per_example.AffineCall.square_sums = original
    reps = args.profile_repeats
    print(f"\n### Profile of curvprop: resnet18_cifar({activation}), width {args.width}, "
          f"N = {args.examples} ({args.inputs}; {note}), one batch, float32, "
          f"{torch.get_num_threads()} threads; {reps} repeat(s), {args.profile_replicates} "
          f"replicate(s) each\n")
    print(f"Plain forward + backward {backward:.3f} s (forward alone, no grad, {forward:.3f} s); "
          f"{len(batch.sites)} activation sites, {len(batch._tape.calls)} affine calls.\n")
    print("| step | s per call | calls per repeat | backward passes per call | s per pass "
          "| of which per-example squares | × plain backward per pass |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total_sq = sum(squares.values())
    passes = {"loss-gradient pass": 1, "GGN passes (C = 10)": batch.num_classes,
              "residual passes (2 per replicate)": 1}
    for label, values in steps.items():
        per_call = sum(values) / len(values)
        count = passes.get(label, 0)
        per_pass = per_call / count if count else per_call
        print(f"| {label} | {per_call:.3f} | {len(values) // reps} | {count or '—'} | "
              f"{per_pass:.3f} | {100 * inside[label] / max(sum(values), 1e-12):.0f} % | "
              f"{per_pass / backward:.2f} |")
    print("\nPer-example square sums by layer type (all steps): " + ", ".join(
        f"{k} {100 * v / total_sq:.0f} %" for k, v in squares.most_common()))
    pass_time = sum(steps["residual passes (2 per replicate)"]) / len(
        steps["residual passes (2 per replicate)"])
    fixed = sum(sum(steps[k]) / reps for k in ("forward (TapedBatch)", "loss-gradient pass",
                                               "GGN passes (C = 10)"))
    # Chunk size of the per-example gradients on the CPU: the default against 64 MB chunks,
    # interleaved, on one GGN column.
    chunks = {"default": per_example.CPU_CHUNK_NUMBERS, "64 MB": per_example.CHUNK_NUMBERS}
    chunk_times: dict[str, list[float]] = {k: [] for k in chunks}
    column = batch.factor[:, :, 0]
    try:
        for _ in range(5):
            for label, numbers in chunks.items():
                per_example.CPU_CHUNK_NUMBERS = numbers
                chunk_times[label].append(median_time(lambda: batch.output_squares(column), 1))
    finally:
        per_example.CPU_CHUNK_NUMBERS = chunks["default"]
    a, b = (statistics.median(chunk_times[k]) for k in ("default", "64 MB"))
    print(f"\nOne hooked backward pass (a GGN column), median of 5 interleaved: {a:.3f} s with "
          f"per-example chunks of {chunks['default']:,} numbers, {b:.3f} s with "
          f"{chunks['64 MB']:,} (64 MB in float32): {b / a:.2f}×.")
    for replicates in (16, 64):
        total = fixed + replicates * (2 * pass_time + sum(steps["Rademacher draws"])
                                      / len(steps["Rademacher draws"]))
        print(f"\nModel of a {replicates}-replicate run: {total:.1f} s = {total / backward:.0f} "
              f"plain backwards (forward + loss gradient + GGN {100 * fixed / total:.0f} %, "
              f"residual passes {100 * (1 - fixed / total):.0f} %).")


# -- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("resnet", "exact-relu", "digits", "profile", "all"),
                        default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="model, data and training seed")
    parser.add_argument("--activations", nargs="+", default=["silu", "rct:n=1,alpha=14"])
    parser.add_argument("--width", type=int, default=16, help="ResNet width (64: the standard one)")
    parser.add_argument("--examples", type=int, default=128, help="measured examples (ResNet)")
    parser.add_argument("--inputs", choices=("digits", "random"), default="digits")
    parser.add_argument("--train-epochs", type=int, default=1,
                        help="Adam epochs on all upsampled digits before measuring (ResNet)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: all examples")
    parser.add_argument("--chunk", type=int, default=8, help="HVP probes per vmapped call")
    parser.add_argument("--curvprop-samples", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--curvprop-probe-layers", type=int, default=None,
                        help="curvprop's probe_layers option (resnet part; default: the estimator's)")
    parser.add_argument("--hutchinson-samples", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--ggn-samples", type=int, nargs="*", default=[8])
    parser.add_argument("--seeds", type=int, default=1, help="runs per budget (ResNet)")
    parser.add_argument("--relu-examples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits-seeds", type=int, default=30)
    parser.add_argument("--digits-samples", type=int, nargs="*", default=[4, 16, 64],
                        help="fixed curvprop budgets (replicates) on the digits CNN")
    parser.add_argument("--digits-hutchinson-samples", type=int, nargs="*", default=[16, 64],
                        help="hutchinson budgets (HVPs) on the digits CNN, for comparison")
    parser.add_argument("--digits-hutchinson-seeds", type=int, default=10)
    parser.add_argument("--profile-repeats", type=int, default=1)
    parser.add_argument("--profile-replicates", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}")
    parts = ("resnet", "exact-relu", "digits", "profile") if args.part == "all" else (args.part,)
    for part in parts:
        {"resnet": resnet_part, "exact-relu": exact_relu_part, "digits": digits_part,
         "profile": profile_part}[part](args)
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
