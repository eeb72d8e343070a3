"""Time per Hessian-vector product over a whole data set: hessdiag vs PyHessian vs curvlinops.

Each method computes H·v over ALL the data of the case (not one cached batch), batches
of the same size, same model, same dtype, in one run with the methods interleaved
(``--rounds`` rounds, medians reported) and thread count pinned:
  ours/k        hessdiag ``objective.hessian.apply`` on k probes at once (one data pass; vmapped
                forward-over-reverse, ``hvp_route="auto"``; ``--hvp-route autograd``
                for shared-graph double backward); ``ours/1`` is a single probe
  pyhessian     PyHessian 0.1 ``hessian(..., dataloader=..., cuda=False)
                .dataloader_hv_product(v)`` (double backward, one probe per data pass)
  cl-matvec     curvlinops 3.0.1 ``HessianLinearOperator @ v`` (one vector)
  cl-matmat/k   the same operator on a [P, k] matrix
Cases: the digits MLP (64-48-48-10 tanh, 1797 examples), a small CNN on digits, and a
CIFAR-style ResNet-18 (width 64, 11.2 M parameters, SiLU, BatchNorm in eval mode) on a
fixed batch of 32×32 inputs (``--resnet-inputs``, default 16, to finish in minutes on
2 cores; ``--resnet-activation tanh`` gives curvlinops a model it can differentiate).
Reported: seconds per probe and the ratio of each anchor to ours/k.

Run: PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python benchmarks/hvp_throughput.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hessdiag.io import load_data  # noqa: E402
from hessdiag.models import cnn, mlp, resnet18_cifar  # noqa: E402
from hessdiag.objective import Objective  # noqa: E402


def methods(model: nn.Module, batches, probes: int, device: str, route: str = "auto"):
    """name → zero-argument callable computing H·v for ``probes`` (or 1) vectors; name → k."""
    from curvlinops import HessianLinearOperator
    from pyhessian import hessian as PyHessian

    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    num = sum(p.numel() for p in params)
    objective = Objective(model, batches, "ce", chunk_size=probes, device=device, hvp_route=route)
    gen = torch.Generator().manual_seed(0)
    flat = (torch.randint(0, 2, (probes, num), generator=gen).to(params[0].dtype) * 2 - 1).to(device)
    stack = objective.unflatten(flat)
    single = objective.unflatten(flat[:1])
    criterion = nn.CrossEntropyLoss()
    pyh = PyHessian(model, criterion, dataloader=batches, cuda=device == "cuda")
    v_list = [t[0] for t in single.values()]
    cl = HessianLinearOperator(model, criterion, params, batches, check_deterministic=False)
    out = {
        f"ours/{probes}": (lambda: objective.hessian.apply(stack), probes),
        "ours/1": (lambda: objective.hessian.apply(single, chunk_size=1), 1),
        "pyhessian": (lambda: pyh.dataloader_hv_product(v_list), 1),
        "cl-matvec": (lambda: cl @ flat[0], 1),
        f"cl-matmat/{probes}": (lambda: cl @ flat.T.contiguous(), probes),
    }
    return out, num, objective


def run_case(name: str, model: nn.Module, batches, probes: int, rounds: int, device: str,
             route: str = "auto") -> None:
    table, num, objective = methods(model, batches, probes, device, route)
    times: dict[str, list[float]] = {k: [] for k in table}
    failed: dict[str, str] = {}
    for r in range(rounds + 1):  # round 0 warms up (compilation of vmapped kernels, caches)
        for key, (fn, k) in table.items():
            if key in failed:
                continue
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[key].append((time.perf_counter() - start) / k)
            except Exception as err:  # an anchor that cannot handle the model is reported
                failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:70]}"
    n_ex = sum(int(x.shape[0]) for x, _ in batches)
    print(f"\n### {name}: P = {num:,}, {n_ex} examples in {len(batches)} batches, "
          f"{next(model.parameters()).dtype}, {device}")
    print(f"\n(ours: HVP route: {objective.hvp_route_used})")
    print("\n| method | ms per probe (median) | anchor / ours |")
    print("|---|---|---|")
    ours = statistics.median(times[f"ours/{probes}"])
    for key in table:
        if key in failed:
            print(f"| {key} | fails: {failed[key]} | — |")
            continue
        t = statistics.median(times[key])
        print(f"| {key} | {1e3 * t:.2f} | {t / ours:.2f}× |")
    sys.stdout.flush()


def digits_batches(dtype, batch, image=True):
    x, y = load_data("digits", "all")
    x = x.to(dtype)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--resnet-inputs", type=int, default=16)
    parser.add_argument("--resnet-probes", type=int, default=4)
    parser.add_argument("--resnet-rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="mlp,cnn,resnet", help="comma list of mlp, cnn, resnet")
    parser.add_argument("--resnet-activation", default="silu")
    parser.add_argument("--hvp-route", default="auto", choices=["auto", "func", "autograd"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from importlib.metadata import version
    print(f"torch {torch.__version__}, curvlinops {version('curvlinops-for-pytorch')}, "
          f"PyHessian {version('pyhessian')}, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in digits_batches(dtype, args.batch_size)]
    cases = set(args.cases.split(","))
    torch.manual_seed(0)
    if "mlp" in cases:
        run_case("digits MLP 64-48-48-10 tanh", mlp(64, (48, 48), 10, "tanh").to(args.device, dtype),
                 batches, args.probes, args.rounds, args.device, args.hvp_route)
    torch.manual_seed(0)
    if "cnn" in cases:
        run_case("small CNN (8, 16 channels, tanh) on digits",
                 cnn(1, 8, (8, 16), 10, "tanh").to(args.device, dtype),
                 batches, args.probes, args.rounds, args.device, args.hvp_route)
    if "resnet" in cases:
        torch.manual_seed(0)
        act = args.resnet_activation
        model = resnet18_cifar(10, act).to(args.device, dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.resnet_inputs, 3, 32, 32, generator=gen).to(args.device, dtype)
        y = torch.randint(0, 10, (args.resnet_inputs,), generator=gen).to(args.device)
        run_case(f"ResNet-18 (CIFAR, width 64, {act}, BN eval) on {args.resnet_inputs} 32×32 inputs",
                 model, [(x, y)], args.resnet_probes, args.resnet_rounds, args.device, args.hvp_route)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
