import os

import pytest
import torch

# Two shared cores: small kernels are fastest single-threaded and OpenMP busy-waiting
# on a loaded machine slows them by orders of magnitude (docs/index.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


@pytest.fixture
def tiny_classification():
    """20 examples of 6 features, 3 classes (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    return x, y
