"""The diagonal itself: ``Result.diagonal`` on request, ``--save-diagonal PATH.safetensors``."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hessdiag
from hessdiag.cli import main
from hessdiag.io import load_checkpoint, load_data
from hessdiag.output import OutputError, write_diagonal

from .models import tiny_mlp, write_digits_checkpoint


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "small.pt"
    write_digits_checkpoint(path)
    return path


def test_the_diagonal_is_kept_only_on_request(data):
    model = tiny_mlp()
    plain = hessdiag.measure(model, data, split_ggn=True)
    assert plain.diagonal is None and plain.ggn_diagonal is None and plain.residual_diagonal is None
    kept = hessdiag.measure(model, data, split_ggn=True, keep_diagonal=True)
    assert set(kept.diagonal) == set(kept.ggn_diagonal) == {n for n, _ in model.named_parameters()}
    assert hessdiag.normalized_norm(kept.diagonal) == pytest.approx(kept.normalized_norm, rel=1e-6)
    diagonal = hessdiag.hessian_diagonal(model, data, keep_diagonal=False)  # returned regardless
    assert all(torch.equal(diagonal[k], kept.diagonal[k]) for k in diagonal)


def test_the_json_document_does_not_depend_on_keep_diagonal(data):
    model = tiny_mlp()
    kept = hessdiag.measure(model, data, estimator="hutchinson", samples=16, keep_diagonal=True)
    assert kept.to_json() == dataclasses.replace(kept, diagonal=None).to_json()
    plain = hessdiag.measure(model, data, estimator="hutchinson", samples=16)
    first, second = json.loads(kept.to_json()), json.loads(plain.to_json())
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert len(json.dumps(first)) == len(json.dumps(second))


def test_save_diagonal_round_trip(checkpoint, tmp_path):
    path = tmp_path / "out" / "diag.safetensors"
    args = ["--max-examples", "20", "--estimator", "hutchinson", "--samples", "16", "--seed", "3",
            "--params", "1.*"]
    assert main(["measure", str(checkpoint), *args, "--save-diagonal", str(path),
                 "--json", str(tmp_path / "r.json")]) == 0
    saved = load_file(path)
    model, _ = load_checkpoint(checkpoint)
    expected = hessdiag.hessian_diagonal(model, load_data("digits", split="train", max_examples=20),
                                         estimator="hutchinson", samples=16, seed=3, params="1.*")
    assert set(saved) == set(expected) == {"1.weight", "1.bias"}
    for name in expected:
        assert saved[name].dtype == expected[name].dtype == torch.float32  # the compute dtype
        assert torch.equal(saved[name], expected[name])
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert meta["format"] == "hessdiag.diagonal" and meta["estimator"] == "hutchinson"
    assert meta["hessdiag_version"] == hessdiag.__version__ == doc["hessdiag_version"]
    assert json.loads(meta["normalized_norm"]) == doc["normalized_norm"]
    assert json.loads(meta["params"]) == ["1.*"] and json.loads(meta["seed"]) == 3
    assert json.loads(meta["names"]) == ["1.weight", "1.bias"]  # the model's order
    assert json.loads(meta["num_params"]) == doc["num_params"] == 64 * 6 + 6


@pytest.mark.parametrize("name, message", [
    ("diag.pt", "--save-diagonal {path}: the file must end in .safetensors"),
    ("folder.safetensors", "--save-diagonal {path} is a directory"),
])
def test_a_bad_diagonal_path_is_refused_before_measuring(checkpoint, tmp_path, monkeypatch, capsys,
                                                         name, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("measured despite a bad output path")

    monkeypatch.setattr(hessdiag.api, "measure", forbidden)
    path = tmp_path / name
    if name.startswith("folder"):
        path.mkdir()
    assert main(["measure", str(checkpoint), "--save-diagonal", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hessdiag: error: {message.format(path=path)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["small.pt", *([name] if path.is_dir() else [])])


def test_write_diagonal_needs_a_kept_diagonal(data, tmp_path):
    res = hessdiag.measure(tiny_mlp(), data)
    with pytest.raises(OutputError, match="keep_diagonal=True"):
        write_diagonal(res, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
