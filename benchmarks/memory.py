"""Peak resident memory of the default ``hutchinson`` estimator vs chunk size and budget.

Usage: PYTHONPATH=. python benchmarks/memory.py CHUNK SAMPLES   (one process per setting,
since ru_maxrss is a per-process high-water mark). Model: 64-512-512-10 tanh MLP
(P = 301,066), 512 random inputs in batches of 128, float32.
"""

import resource
import sys

import torch

import hessdiag
from hessdiag.models import mlp
torch.set_num_threads(1)
chunk, samples = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
m = mlp(64, (512, 512), 10, "tanh")
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 64, generator=g)
y = torch.randint(0, 10, (512,), generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = hessdiag.measure(m, (x, y), "ce", "hutchinson", samples=samples, chunk_size=chunk, batch_size=128)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"P={r.num_params} chunk={chunk} samples={samples} peak RSS {peak/1024:.0f} MB (before {base/1024:.0f} MB)")
