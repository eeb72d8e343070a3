"""The model zoo: every factory takes an activation spec; WRN-28-10 has its 36.5 M parameters."""

import pytest
import torch
from torch import nn

from hessdiag.activations import RCTAF
from hessdiag.io import load_checkpoint, save_checkpoint
from hessdiag.models import FACTORIES, cnn, mlp, resnet18_cifar, wide_resnet

TINY = {
    "mlp": ({"in_features": 64, "hidden": [5], "num_classes": 10}, (2, 1, 8, 8)),
    "cnn": ({"channels": [2, 3], "num_classes": 10}, (2, 1, 8, 8)),
    "resnet18_cifar": ({"width": 1, "in_channels": 1, "num_classes": 10}, (2, 1, 8, 8)),
    "wide_resnet": ({"depth": 10, "widen": 1, "in_channels": 1, "num_classes": 10}, (2, 1, 8, 8)),
}


def test_wrn_28_10_has_the_reference_parameter_count():
    with torch.device("meta"):  # no memory, no initialization
        model = wide_resnet(depth=28, widen=10, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert count == 36_479_194  # the reference WRN-28-10 (Zagoruyko & Komodakis), ≈ 36.5 M
    assert abs(count / 1e6 - 36.5) < 0.05


def test_wide_resnet_refuses_depths_that_are_not_6n_plus_4():
    with pytest.raises(ValueError, match="6n"):
        wide_resnet(depth=12)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_factory_takes_any_activation_spec(name):
    kwargs, shape = TINY[name]
    assert name in FACTORIES
    model = FACTORIES[name](**kwargs, activation="rct:n=2,alpha=3")
    acts = [m for m in model.modules() if isinstance(m, RCTAF)]
    assert acts and all(a.n == 2 and a.alpha == 3.0 for a in acts)
    assert model(torch.rand(shape)).shape == (2, 10)
    other = FACTORIES[name](**kwargs, activation="gelu")
    assert any(isinstance(m, nn.GELU) for m in other.modules())


def test_wide_resnet_native_checkpoint_round_trip(tmp_path):
    kwargs = {"depth": 10, "widen": 2, "num_classes": 10, "activation": "rct:n=1,alpha=4",
              "in_channels": 1}
    torch.manual_seed(0)
    model = wide_resnet(**kwargs)
    model.train()
    model(torch.rand(16, 1, 8, 8))  # move the BatchNorm running statistics off their defaults
    model.eval()
    path = tmp_path / "wrn.pt"
    save_checkpoint(path, model, "hessdiag.models:wide_resnet", kwargs, {"data": "digits"})
    loaded, meta = load_checkpoint(path)  # a zoo factory: trusted by name
    assert meta == {"data": "digits"} and isinstance(loaded, type(model))
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(3, 1, 8, 8)
    loaded.eval()
    assert torch.equal(loaded(x), model(x))
    # the --model route: a bare state dict plus the factory name and kwargs
    torch.save(state, tmp_path / "sd.pt")
    again, _ = load_checkpoint(tmp_path / "sd.pt", model="hessdiag.models:wide_resnet", model_kwargs=kwargs)
    again.eval()
    assert torch.equal(again(x), model(x))


def test_existing_factories_are_unchanged():
    torch.manual_seed(0)
    assert sum(p.numel() for p in mlp().parameters()) == 64 * 48 + 48 + 48 * 48 + 48 + 48 * 10 + 10
    assert isinstance(cnn(), nn.Sequential)
    with torch.device("meta"):
        assert sum(p.numel() for p in resnet18_cifar().parameters()) == 11_173_962
