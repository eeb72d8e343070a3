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
