"""The shared plumbing: HVPs and GGN products against float64 references."""

import pytest
import torch

from hessdiag.models import cnn, mlp
from hessdiag.objective import Objective, ObjectiveError

from .reference import flat, max_relative_error, reference_ggn, reference_hessian, split_like


def models():
    torch.manual_seed(0)
    yield "mlp", mlp(in_features=6, hidden=(5, 4), num_classes=3, activation="rct:n=2,alpha=7"), (20, 6)
    yield "cnn", cnn(in_channels=1, image_size=4, channels=(2, 2), num_classes=3, activation="silu"), (9, 1, 4, 4)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name, model, shape", list(models()))
def test_hvp_and_ggn_vp_equal_dense_references(name, model, shape, loss):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)
    obj = Objective(model, (x, y), loss, dtype=torch.float64, batch_size=4, chunk_size=3)
    v = torch.randn(5, obj.num_params, generator=g, dtype=torch.float64)
    hv = obj.flatten(obj.hvp(obj.unflatten(v)))
    gv = obj.flatten(obj.ggn_vp(obj.unflatten(v)))
    h, ggn = reference_hessian(model, loss, x, y), reference_ggn(model, loss, x, y)
    # float64 on both sides, different routes: rounding is ~1e-15 relative.
    assert float((hv - v @ h).abs().max() / (v @ h).abs().max()) < 1e-10
    assert float((gv - v @ ggn).abs().max() / (v @ ggn).abs().max()) < 1e-10
    diag = obj.ggn_diagonal(examples_per_chunk=3)
    assert max_relative_error(diag, split_like(ggn.diagonal(), model)) < 1e-10
    assert bool((flat(diag) >= 0).all())
    # The fused residual product is (H − G)·V, the same rounding argument.
    rv = obj.flatten(obj.residual_vp(obj.unflatten(v)))
    ref = v @ (h - ggn)
    assert float((rv - ref).abs().max() / ref.abs().max()) < 1e-10


def test_empty_data_and_bad_loss_are_user_errors():
    model = mlp(in_features=2, hidden=(2,), num_classes=2)
    with pytest.raises(ObjectiveError, match="empty"):
        Objective(model, (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ObjectiveError, match="unknown loss"):
        Objective(model, (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), loss="hinge")


def test_both_hvp_paths_agree_and_one_is_chosen():
    torch.manual_seed(0)
    model = mlp(in_features=6, hidden=(5, 4), num_classes=3, activation="silu")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    v = torch.randn(4, 74, generator=g, dtype=torch.float64)  # P = 35 + 24 + 15
    results = {}
    for path in (None, "func", "autograd"):
        obj = Objective(model, (x, y), "ce", dtype=torch.float64, batch_size=8)
        obj.hvp_path = path
        results[path] = obj.flatten(obj.hvp(obj.unflatten(v)))
        assert obj.hvp_path in ("func", "autograd")  # the first call chose when None
    # Same product by two routes in float64: rounding only.
    assert torch.allclose(results["func"], results["autograd"], rtol=1e-12, atol=1e-15)
    assert torch.allclose(results[None], results["func"], rtol=1e-12, atol=1e-15)
