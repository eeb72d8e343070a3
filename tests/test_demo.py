"""The committed example checkpoint is what examples/train_digits.py produces."""

import torch

from hessdiag.demo import DEMO_FACTORY, DEMO_KWARGS, bundled_checkpoint, train_demo_model
from hessdiag.io import load_checkpoint


def test_regenerated_checkpoint_matches_the_committed_one():
    committed, meta = load_checkpoint(bundled_checkpoint())
    fresh, fresh_meta = train_demo_model()
    # Same seed, single-threaded float32 training on the same torch build reproduces the
    # weights bitwise; across builds/CPUs the kernels may round differently, so allow
    # float32-level drift accumulated over 460 Adam steps.
    for (name, a), (_, b) in zip(committed.state_dict().items(), fresh.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    assert meta["test_accuracy"] > 0.93
    assert abs(meta["test_accuracy"] - fresh_meta["test_accuracy"]) < 0.01
    assert DEMO_FACTORY.startswith("hessdiag.") and DEMO_KWARGS["activation"].startswith("rct:")
