"""`hessdiag measure` on every input kind and every kind of bad input (docs/cli.md, docs/index.md).

Bad input must end in exit 2 with one line on stderr and no traceback; output files are
written only after success, atomically.
"""

import json
import sys

import numpy as np
import pytest
import torch

from hessdiag.cli import main
from hessdiag.io import save_checkpoint
from hessdiag.models import cnn, mlp
from tests.io.test_data import fake_cifar10

KWARGS = {"in_features": 64, "hidden": [5], "num_classes": 10, "activation": "tanh"}
FEW = ["--max-examples", "12"]


def run(args):
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:  # argparse usage errors
        return exit_.code


def one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def native(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "native.pt"
    save_checkpoint(path, mlp(**KWARGS), "hessdiag.models:mlp", KWARGS, {"data": "digits"})
    return path


@pytest.fixture
def state_dict(tmp_path):
    torch.manual_seed(0)
    model = mlp(**KWARGS)
    return model


# -- every checkpoint and data kind, end to end --------------------------------------------


def test_lightning_style_checkpoint(tmp_path, state_dict, capsys):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state_dict.state_dict().items()},
                "epoch": 3, "global_step": 100}, path)
    assert run(["measure", path, "--model", "hessdiag.models:mlp", "--model-kwargs",
                json.dumps({"hidden": [5], "activation": "tanh"}), *FEW, "--quiet"]) == 0
    assert float(capsys.readouterr().out) > 0


def test_safetensors_and_npz(tmp_path, state_dict, capsys):
    from safetensors.torch import save_file

    save_file(dict(state_dict.state_dict()), str(tmp_path / "w.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((9, 64)).astype(np.float32), y=np.arange(9))
    args = ["measure", tmp_path / "w.safetensors", "--model", "hessdiag.models:mlp", "--model-kwargs",
            json.dumps(KWARGS), "--data", f"npz:{tmp_path / 'd.npz'}", "--quiet"]
    assert run(args) == 0
    assert float(capsys.readouterr().out) > 0


def test_cifar10_folder_with_a_cnn(tmp_path, capsys):
    fake_cifar10(tmp_path, per_batch=2)
    kwargs = {"in_channels": 3, "image_size": 32, "channels": [1, 1, 1], "num_classes": 10}
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, cnn(**kwargs), "hessdiag.models:cnn", kwargs)
    assert run(["measure", path, "--data", f"cifar10:{tmp_path}", "--split", "test", "--json",
                tmp_path / "r.json"]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["num_examples"] == 2 and doc["num_params"] == 28 + 10 + 10 + 8 * 8 * 10 + 10
    capsys.readouterr()


def test_batch_size_does_not_change_the_result(native, tmp_path, capsys):
    values = []
    for size in ("1", "5", "512"):
        assert run(["measure", native, *FEW, "--dtype", "float64", "--batch-size", size, "--quiet"]) == 0
        values.append(float(capsys.readouterr().out))
    assert values[0] == pytest.approx(values[1], rel=1e-5) == pytest.approx(values[2], rel=1e-5)


def test_pickled_module_needs_trust(tmp_path, state_dict, capsys):
    path = tmp_path / "whole.pt"
    torch.save(state_dict, path)
    err = one_line_error(capsys, run(["measure", path, *FEW]))
    assert "pickled Python objects" in err and "could run code" in err and "--trust-checkpoint" in err
    assert run(["measure", path, "--trust-checkpoint", *FEW, "--quiet"]) == 0


# -- bad input: exit 2, one line ----------------------------------------------------------


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda p, m: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), [], "cannot load checkpoint"),
        (lambda p, m: p.write_bytes(b""), [], "cannot load checkpoint"),
        (lambda p, m: torch.save({k.replace("3.", "4."): v for k, v in m.state_dict().items()}, p),
         ["--model", "hessdiag.models:mlp", "--model-kwargs", json.dumps(KWARGS)],
         "missing keys 3.bias, 3.weight; unexpected keys 4.bias, 4.weight"),
        (lambda p, m: torch.save(m.state_dict(), p),
         ["--model", "hessdiag.models:mlp", "--model-kwargs", '{"hidden": [7]}'], "shape mismatch for 1.weight"),
        (lambda p, m: torch.save({k: v.fill_(float("nan")) for k, v in m.state_dict().items()}, p),
         ["--model", "hessdiag.models:mlp", "--model-kwargs", json.dumps(KWARGS)], "non-finite values in 1.weight"),
        (lambda p, m: torch.save(m.state_dict(), p), [], "pass --model"),
        (lambda p, m: (p.unlink(), p.mkdir()), [], "not a file"),
    ],
    ids=["truncated", "empty-file", "keys", "shape", "nan", "no-model", "directory"],
)
def test_bad_checkpoints(tmp_path, state_dict, capsys, make, extra, message):
    path = tmp_path / "c.pt"
    torch.save(state_dict.state_dict(), path)
    make(path, state_dict)
    err = one_line_error(capsys, run(["measure", path, *extra, *FEW]))
    assert message in err


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="root reads any file; permissions cannot be tested")
def test_unreadable_checkpoint(native, capsys):
    native.chmod(0)
    assert "not readable" in one_line_error(capsys, run(["measure", native]))


@pytest.mark.parametrize(
    "kwargs, data, message",
    [
        ({**KWARGS, "num_classes": 5}, None, "label 9 is outside the model's output range"),
        ({**KWARGS, "in_features": 10}, None, "model rejects inputs of shape (12, 1, 8, 8)"),
        (KWARGS, {"x": torch.zeros(0, 64), "y": torch.zeros(0, dtype=torch.long)}, "holds no examples"),
        (KWARGS, {"x": torch.randn(4, 64), "y": torch.randn(4)}, "ce needs integer class labels"),
        (KWARGS, {"x": torch.randn(4, 64), "y": torch.arange(5)}, "4 examples but y has 5"),
    ],
    ids=["labels", "input-shape", "empty", "float-labels", "lengths"],
)
def test_bad_data_for_the_model(tmp_path, capsys, kwargs, data, message):
    path = tmp_path / "m.pt"
    save_checkpoint(path, mlp(**kwargs), "hessdiag.models:mlp", kwargs)
    extra = []
    if data is not None:
        torch.save(data, tmp_path / "d.pt")
        extra = ["--data", f"tensors:{tmp_path / 'd.pt'}"]
    assert message in one_line_error(capsys, run(["measure", path, *extra, *FEW]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--estimator", "magic"], "invalid choice: 'magic'"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--label-smoothing", "1.5"], "expected a number in [0, 1)"),
        (["--loss", "mse", "--label-smoothing", "0.1"], "--label-smoothing applies to the ce loss"),
        (["--data", "mnist"], "unknown data spec 'mnist'"),
        (["--data", "npz:/no/such.npz"], "data file not found"),
        (["--data", "cifar100:/no/such/dir"], "CIFAR folder not found"),
        (["--split", "val"], "invalid choice: 'val'"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--device", "cuda:7"], "cuda"),
        (["--model", "no/such/file.py:Net"], "file not found"),
    ],
)
def test_unknown_names_and_specs(native, capsys, extra, message):
    if "--device" in extra and torch.cuda.device_count() > 7:
        pytest.skip("eight GPUs present")
    assert message in one_line_error(capsys, run(["measure", native, *extra, *FEW]))


NAN_MODEL = '''
import torch
from torch import nn

class Kinked(nn.Module):
    """Linear logits plus |s|^1.5 at s = 0: finite loss and gradient, NaN curvature in s."""
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.linear(x.flatten(1)) + self.scale.abs() ** 1.5
'''


def test_nan_in_the_hessian_names_the_tensor(tmp_path, capsys):
    (tmp_path / "kinked.py").write_text(NAN_MODEL)
    spec = f"{tmp_path / 'kinked.py'}:Kinked"
    from hessdiag.io import build_model

    torch.save(build_model(spec).state_dict(), tmp_path / "k.pt")
    out = tmp_path / "r.json"
    err = one_line_error(capsys, run(["measure", tmp_path / "k.pt", "--model", spec, *FEW, "--json", out]))
    assert "Hessian diagonal of scale contains NaN or Inf" in err
    assert not out.exists()


# -- output files ------------------------------------------------------------------------


def test_json_is_replaced_only_by_a_complete_new_document(native, tmp_path, monkeypatch, capsys):
    from hessdiag.estimators.exact import ExactEstimator

    out = tmp_path / "result.json"
    out.write_text('{"old": true}\n')
    original = ExactEstimator.estimate

    def crash(self, objective):
        next(objective.batches())  # the data pass has begun
        raise RuntimeError("simulated crash mid-measurement")

    monkeypatch.setattr(ExactEstimator, "estimate", crash)
    err = one_line_error(capsys, run(["measure", native, *FEW, "--json", out]), expected_code=1)
    assert "simulated crash" in err and "--debug" in err
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native.pt", "result.json"]  # no temp files

    monkeypatch.setattr(ExactEstimator, "estimate", original)
    assert run(["measure", native, *FEW, "--json", out]) == 0
    doc = json.loads(out.read_text())
    assert doc["num_examples"] == 12 and "old" not in doc
    capsys.readouterr()


def test_bad_output_paths_fail_before_measuring(native, tmp_path, monkeypatch, capsys):
    import hessdiag.api

    def never(*args, **kwargs):
        raise AssertionError("measured although the output path is bad")

    monkeypatch.setattr(hessdiag.api, "measure", never)
    (tmp_path / "file").write_text("x")
    for extra, message in [
        (["--plot", tmp_path / "fig.gif"], "unknown figure format 'gif'"),
        (["--plot", tmp_path / "fig"], "no extension"),
        (["--json", tmp_path], "is a directory"),
        (["--json", tmp_path / "file" / "r.json"], "is not a directory"),
    ]:
        assert message in one_line_error(capsys, run(["measure", native, *FEW, *extra]))


@pytest.mark.parametrize("ext, magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_plot_formats(native, tmp_path, capsys, ext, magic):
    path = tmp_path / "figs" / f"layers.{ext.upper() if ext == 'pdf' else ext}"
    assert run(["measure", native, *FEW, "--plot", path]) == 0
    assert path.read_bytes().startswith(magic)
    capsys.readouterr()


class FakeTerminal:
    """A stderr that says it is a terminal and records what is written."""

    def __init__(self):
        self.parts = []

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True

    @property
    def text(self):
        return "".join(self.parts)


@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bar_only_on_a_terminal_and_not_quiet(native, monkeypatch, capsys, tty, quiet, shown):
    import hessdiag.progress

    monkeypatch.setattr(hessdiag.progress, "PROGRESS_DELAY", 0.0)
    terminal = FakeTerminal()
    if tty:
        monkeypatch.setattr(sys, "stderr", terminal)
    assert run(["measure", native, *FEW, *(["--quiet"] if quiet else [])]) == 0
    written = terminal.text + capsys.readouterr().err
    assert ("examples processed" in written) == shown


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_json_write_failure_leaves_the_old_file_and_no_temporary(native, tmp_path, monkeypatch, capsys, failing):
    import os

    out = tmp_path / "result.json"
    out.write_text('{"old": true}\n')

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    err = one_line_error(capsys, run(["measure", native, *FEW, "--json", out]))
    assert "cannot write --json" in err and "No space left on device" in err
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native.pt", "result.json"]
