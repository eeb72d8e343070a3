"""Native checkpoints and state dicts, loaded without executing checkpoint code."""

import pytest
import torch

from hessdiag.io import CheckpointError, load_checkpoint, save_checkpoint
from hessdiag.models import mlp

KWARGS = {"in_features": 4, "hidden": [3], "num_classes": 2, "activation": "tanh"}


def test_native_round_trip_restores_weights_and_meta(tmp_path):
    torch.manual_seed(0)
    model = mlp(**KWARGS)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "hessdiag.models:mlp", KWARGS, {"data": "digits"})
    torch.load(path, weights_only=True)  # the native format needs no unpickling of code
    loaded, meta = load_checkpoint(path)
    assert meta == {"data": "digits"}
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_native_factory_outside_hessdiag_is_refused_unless_named_or_trusted(tmp_path):
    model = mlp(**KWARGS)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "collections:OrderedDict", {}, {})
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)


@pytest.mark.parametrize("nest", [False, True])
def test_state_dict_needs_model_and_reports_key_and_shape_problems(tmp_path, nest):
    model = mlp(**KWARGS)
    path = tmp_path / "sd.pt"
    state = model.state_dict()
    torch.save({"state_dict": state} if nest else state, path)
    with pytest.raises(CheckpointError, match="--model"):
        load_checkpoint(path)
    loaded, _ = load_checkpoint(path, model="hessdiag.models:mlp", model_kwargs=KWARGS)
    assert torch.equal(loaded[1].weight, model[1].weight)
    with pytest.raises(CheckpointError, match="shape mismatch for 1.weight"):
        load_checkpoint(path, model="hessdiag.models:mlp", model_kwargs={**KWARGS, "in_features": 5})
    with pytest.raises(CheckpointError, match="missing keys 5.bias, 5.weight"):
        load_checkpoint(path, model="hessdiag.models:mlp", model_kwargs={**KWARGS, "hidden": [3, 3]})


def test_non_finite_parameters_are_named(tmp_path):
    model = mlp(**KWARGS)
    state = model.state_dict()
    state["1.bias"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="non-finite values in 1.bias"):
        load_checkpoint(path, model="hessdiag.models:mlp", model_kwargs=KWARGS)


def test_corrupt_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)


# -- every checkpoint kind of docs/index.md, "Checkpoints and data" ----------------------------------------------------

MODEL = "hessdiag.models:mlp"


def _reference_model():
    torch.manual_seed(1)
    return mlp(**KWARGS)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "layout",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model_state_dict": s, "optimizer_state_dict": {"state": {}, "param_groups": []}},
        lambda s: {"model": s, "step": 10},
        # Lightning: the network sits under self.model, beside e.g. a loss module's buffer.
        lambda s: {"state_dict": {**{f"model.{k}": v for k, v in s.items()},
                                  "criterion.weight": torch.ones(2)}, "epoch": 1},
        # DistributedDataParallel wraps the network in .module.
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"model_state_dict": {f"module.model.{k}": v for k, v in s.items()}},
    ],
    ids=["bare", "state_dict", "model_state_dict", "model", "lightning", "ddp", "ddp+model"],
)
def test_state_dict_layouts_and_prefixes(tmp_path, layout):
    model = _reference_model()
    path = tmp_path / "ckpt.pt"
    torch.save(layout(model.state_dict()), path)
    loaded, meta = load_checkpoint(path, model=MODEL, model_kwargs=KWARGS)
    _assert_same_weights(model, loaded)
    assert meta == {}


def test_prefix_is_stripped_only_when_that_makes_keys_match(tmp_path):
    state = {f"module.{k}": v for k, v in _reference_model().state_dict().items()}
    state["module.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="unexpected keys extra"):
        load_checkpoint(tmp_path / "c.pt", model=MODEL, model_kwargs=KWARGS)


def test_dict_without_state_dict_is_named(tmp_path):
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="no state dict of tensors.*model_state_dict"):
        load_checkpoint(tmp_path / "c.pt", model=MODEL, model_kwargs=KWARGS)


def test_safetensors_with_model(tmp_path):
    from safetensors.torch import save_file

    model = _reference_model()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, _ = load_checkpoint(path, model=MODEL, model_kwargs=KWARGS)
    _assert_same_weights(model, loaded)
    # recognized by its header too, whatever the extension
    other = tmp_path / "weights.bin"
    other.write_bytes(path.read_bytes())
    _assert_same_weights(model, load_checkpoint(other, model=MODEL, model_kwargs=KWARGS)[0])
    with pytest.raises(CheckpointError, match="--model"):
        load_checkpoint(path)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="cannot load safetensors"):
        load_checkpoint(truncated, model=MODEL, model_kwargs=KWARGS)


def test_pickled_module_needs_trust(tmp_path):
    model = _reference_model()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(torch\.nn\..*Sequential\).*"
                                              r"could run code.*--trust-checkpoint"):
        load_checkpoint(path)
    loaded, meta = load_checkpoint(path, trust=True)
    _assert_same_weights(model, loaded)
    with pytest.raises(CheckpointError, match="drop --model"):
        load_checkpoint(path, trust=True, model=MODEL)


MODEL_FILE = '''
import torch
from torch import nn
from helper_layers import WIDTH   # a sibling module: the file's folder is importable

class Net(nn.Module):
    def __init__(self, width=WIDTH):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, x):
        return self.body(x)
'''


def test_model_from_python_file(tmp_path):
    (tmp_path / "helper_layers.py").write_text("WIDTH = 3\n")
    (tmp_path / "my_net.py").write_text(MODEL_FILE)
    spec = f"{tmp_path / 'my_net.py'}:Net"
    from hessdiag.io import build_model

    model = build_model(spec)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.ckpt")
    loaded, _ = load_checkpoint(tmp_path / "c.ckpt", model=spec)
    _assert_same_weights(model, loaded)
    with pytest.raises(CheckpointError, match="shape mismatch for body.1.weight"):
        load_checkpoint(tmp_path / "c.ckpt", model=spec, model_kwargs={"width": 5})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonexistent_dir/net.py:Net", "file not found"),
        ("no_such_module_xyz:Net", "cannot import"),
        ("hessdiag.models:nope", "has no attribute"),
        ("hessdiag.models", "must look like"),
        ("hessdiag.models:FACTORIES", "not a class or factory"),
        ("BROKEN:Net", "importing .* failed: ZeroDivisionError"),
        ("torch.nn:Tanh", "mismatch|unexpected keys"),
    ],
)
def test_bad_model_specs_are_hessdiag_errors(tmp_path, spec, message):
    from hessdiag.errors import HessdiagError

    (tmp_path / "broken.py").write_text("1 / 0\n")
    spec = spec.replace("BROKEN", str(tmp_path / "broken.py"))
    torch.save(_reference_model().state_dict(), tmp_path / "c.pt")
    with pytest.raises(HessdiagError, match=message):
        load_checkpoint(tmp_path / "c.pt", model=spec, model_kwargs={} if "torch" in spec else KWARGS)


def test_missing_unreadable_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_truncated_native_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _reference_model(), MODEL, KWARGS)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cannot load checkpoint"):
            load_checkpoint(path)


@pytest.mark.parametrize("factory", ["hessdiag.cli:main", "hessdiag./../evil.py:make",
                                     "hessdiag.models:mlp.__globals__", "os:system"])
def test_native_checkpoint_cannot_name_arbitrary_callables(tmp_path, factory):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _reference_model(), factory, {"argv": ["psi", "gelu"]})
    with pytest.raises(CheckpointError, match="outside hessdiag.models.*could run code"):
        load_checkpoint(path)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    # Simulated: the tests may run as root, who can read a chmod-000 file.
    import os

    path = tmp_path / "m.pt"
    save_checkpoint(path, _reference_model(), MODEL, KWARGS)
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(CheckpointError, match="not readable"):
        load_checkpoint(path)


def test_trusted_pickle_of_a_class_that_cannot_be_imported(tmp_path, monkeypatch):
    import sys
    import types

    # A model class from a module that is gone by load time (e.g. a training script).
    module = types.ModuleType("hessdiag_vanished_module")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    net_class = type("Net", (torch.nn.Linear,), {"__module__": module.__name__})
    module.Net = net_class
    torch.save(net_class(2, 2), tmp_path / "whole.pt")
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.raises(CheckpointError, match="hessdiag_vanished_module.*class must be importable"):
        load_checkpoint(tmp_path / "whole.pt", trust=True)
