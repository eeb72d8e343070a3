"""Cost of the activation in a training step: RCT-AF beside ReLU, GELU, SiLU, Mish, Softplus.

The setting of the paper's Table 2, on this machine: ``resnet18_cifar(width=32)``, batch of
32 random 3×32×32 images, cross-entropy, one SGD step (zero_grad, forward, backward,
step), float32 and float64, ``--threads`` CPU threads (default 1: the least noisy on a
shared machine). Every activation gets the same initial weights and data. Steps are
interleaved round-robin (one step of each activation per round) so that drifts in machine
load hit all of them alike; the figure is the median over ``--rounds`` rounds.

Memory: the bytes autograd saves for the backward pass in one forward (distinct storages,
counted with ``torch.autograd.graph.saved_tensors_hooks``), for the whole network, and the
number of tensors one activation call saves on its own.

Usage: PYTHONPATH=. python benchmarks/activations.py [--rounds 15] [--threads 1]
       [--dtypes float32,float64] [--width 32] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hessdiag.activations import get_activation
from hessdiag.models import resnet18_cifar

ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "silu": "silu",
    "mish": "mish",
    "softplus": "softplus",
    "rct n=0": "rct:n=0,psi=7",
    "rct n=1": "rct:n=1,psi=7",
    "rct n=2": "rct:n=2,psi=7",
}


def saved_bytes(fn) -> tuple[int, int]:
    """(distinct saved storages' bytes, number of saved tensors) while running ``fn()``."""
    storages: dict[int, int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()), count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"resnet18_cifar(width={args.width}), batch {args.batch}, 3x32x32, SGD step, "
          f"{args.threads} thread(s), torch {torch.__version__}; median of {args.rounds} rounds")

    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, 3, 32, 32, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        models, optims = {}, {}
        for name, spec in ACTIVATIONS.items():
            torch.manual_seed(0)
            models[name] = resnet18_cifar(activation=spec, width=args.width).to(dtype).train()
            optims[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3, momentum=0.9)

        def step(name: str) -> None:
            optims[name].zero_grad(set_to_none=True)
            F.cross_entropy(models[name](x), y).backward()
            optims[name].step()

        times: dict[str, list[float]] = {name: [] for name in ACTIVATIONS}
        for r in range(args.rounds + 2):  # two warm-up rounds
            for name in ACTIVATIONS:
                t0 = time.perf_counter()
                step(name)
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}

        memory = {name: saved_bytes(lambda m=models[name]: F.cross_entropy(m(x), y))[0]
                  for name in ACTIVATIONS}
        probe = torch.randn(1024, dtype=dtype, requires_grad=True)
        per_call = {name: saved_bytes(lambda s=spec: get_activation(s)(probe * 1.0))[1] - 0
                    for name, spec in ACTIVATIONS.items()}

        print(f"\n{str(dtype).replace('torch.', '')}:")
        print(f"{'activation':<10} {'step ms':>8} {'/ReLU':>6} {'/SiLU':>6} "
              f"{'saved MB':>9} {'/SiLU':>6} {'tensors saved per call':>23}")
        for name in ACTIVATIONS:
            print(f"{name:<10} {med[name] * 1e3:8.1f} {med[name] / med['relu']:6.2f} "
                  f"{med[name] / med['silu']:6.2f} {memory[name] / 2**20:9.1f} "
                  f"{memory[name] / memory['silu']:6.2f} {per_call[name]:>23}")


if __name__ == "__main__":
    main()
