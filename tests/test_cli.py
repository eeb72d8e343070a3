"""The command line: happy path end to end, and one-line exit-2 errors."""

import json

import pytest
import torch

from hessdiag.cli import main
from hessdiag.demo import bundled_checkpoint
from hessdiag.io import save_checkpoint
from hessdiag.models import cnn, mlp

from .models import write_digits_checkpoint


@pytest.fixture
def small_checkpoint(tmp_path):
    path = tmp_path / "small.pt"
    write_digits_checkpoint(path)
    return path


def test_measure_round_trip_writes_valid_json(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "res" / "result.json"
    code = main(["measure", str(small_checkpoint), "--max-examples", "50", "--dtype", "float64",
                 "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    required = {"hessdiag_version", "checkpoint", "estimator", "loss", "num_params", "num_examples",
                "dtype", "normalized_norm", "norm", "ci95", "naive_normalized_norm", "samples", "hvps",
                "seconds", "seed", "ggn_normalized_norm", "residual_normalized_norm", "per_layer"}
    assert required <= doc.keys()
    assert doc["num_params"] == 64 * 6 + 6 + 6 * 10 + 10 and doc["num_examples"] == 50
    assert doc["ci95"] == [doc["normalized_norm"], doc["normalized_norm"]]
    assert sum(layer["num_params"] for layer in doc["per_layer"]) == doc["num_params"]
    table = capsys.readouterr().out
    assert "total" in table and f"{doc['normalized_norm']:.6g}" in table


def test_measure_state_dict_with_model_spec(tmp_path, capsys):
    torch.manual_seed(0)
    model = mlp(in_features=64, hidden=(4,), num_classes=10)
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    code = main(["measure", str(path), "--model", "hessdiag.models:mlp",
                 "--model-kwargs", '{"hidden": [4]}', "--max-examples", "20", "--quiet"])
    assert code == 0
    assert float(capsys.readouterr().out) > 0


def run_cli(args):
    """Exit code of the CLI, whether it returns or exits through argparse."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(
    "args, message",
    [
        (["measure", "missing.pt"], "checkpoint not found"),
        (["measure", "CKPT", "--estimator", "nope"], "invalid choice"),
        (["measure", "CKPT", "--data", "imagenet"], "unknown data spec"),
        (["measure", "CKPT", "--data", "tensors:/nonexistent.pt"], "data file not found"),
        # A CNN: the MLP fast path of `exact` is cheap and exempt from the budget.
        (["measure", "CNN", "--max-params", "5"], "exceed the budget"),
        (["measure", "CKPT", "--model-kwargs", "{"], "not valid JSON"),
        (["psi", "swishy"], "unknown activation"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, small_checkpoint, tmp_path, capsys):
    if "CNN" in args:
        kwargs = {"in_channels": 1, "image_size": 8, "channels": [2], "num_classes": 10}
        cnn_path = tmp_path / "cnn.pt"
        save_checkpoint(cnn_path, cnn(**kwargs), "hessdiag.models:cnn", kwargs, {"data": "digits", "loss": "ce"})
        args = [str(cnn_path) if a == "CNN" else a for a in args]
    args = [str(small_checkpoint) if a == "CKPT" else a for a in args]
    if args[0] == "measure":
        args += ["--max-examples", "10"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_exit_2():
    assert run_cli(["measure"]) == 2


def test_psi_prints_table(capsys):
    assert main(["psi", "gelu", "mish", "rct:n=2,alpha=7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out] == ["0.7979", "0.6442", "7"]


def test_internal_error_exits_1_with_hint(small_checkpoint, monkeypatch, capsys):
    import hessdiag.api

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(hessdiag.api, "measure", boom)
    assert main(["measure", str(small_checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err


def test_demo_prints_table_and_total(capsys):
    assert bundled_checkpoint().is_file()
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "1.weight" in out and "5,962" in out


@pytest.mark.parametrize("route, ran", [(None, "func"), ("func", "func"), ("autograd", "autograd")])
def test_hvp_route_flag_is_recorded(route, ran, small_checkpoint, tmp_path, capsys):
    out = tmp_path / "route.json"
    args = ["measure", str(small_checkpoint), "--max-examples", "20", "--estimator", "hutchinson",
            "--samples", "5", "--json", str(out)] + (["--hvp-route", route] if route else [])
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["hvp_route"] == ran and doc["hvp_fallback"] is None
    assert f"hvp-route={ran}  " in capsys.readouterr().out
    assert run_cli(args[:2] + ["--hvp-route", "fastest"]) == 2
