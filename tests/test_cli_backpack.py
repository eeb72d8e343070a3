"""The command line with the backpack estimator and the GGN/residual split."""

import json

import torch
from torch import nn

from hessdiag.cli import main
from hessdiag.demo import bundled_checkpoint


def bn_net() -> nn.Module:
    """A model factory for --model: BatchNorm has no BackPACK DiagHessian extension."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 10))


def test_bundled_checkpoint_prints_the_split_per_layer(tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main(["measure", str(bundled_checkpoint()), "--estimator", "backpack", "--split-ggn",
                 "--max-examples", "64", "--dtype", "float64", "--json", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["GGN", "residual"]
    doc = json.loads(out.read_text())
    rows = {line.split()[0]: line.split() for line in lines[2:] if line and not line.startswith("-")}
    for layer in doc["per_layer"]:
        row = rows[layer["name"]]
        assert row[-2] == f"{layer['ggn_normalized_norm']:.6g}"
        assert row[-1] == f"{layer['residual_normalized_norm']:.6g}"
    assert doc["estimator"] == "backpack" and doc["ggn_method"] == "tape"
    # Hidden layers carry a residual (φ'' ≠ 0); the linear output layer's is 0 up to the
    # rounding between two float64 computations of the same GGN (hooks vs BackPACK).
    assert doc["per_layer"][0]["residual_normalized_norm"] > 0
    last = doc["per_layer"][-1]
    assert last["residual_normalized_norm"] <= 1e-12 * last["ggn_normalized_norm"]


def test_unsupported_model_exits_2_naming_the_module(tmp_path, capsys):
    torch.manual_seed(0)
    model = bn_net()
    path = tmp_path / "bn.pt"
    torch.save(model.state_dict(), path)
    code = main(["measure", str(path), "--model", "tests.test_cli_backpack:bn_net",
                 "--estimator", "backpack", "--max-examples", "20"])
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err
    assert "'2' (BatchNorm1d)" in err[0] and "--estimator hutchinson" in err[0]
    # The split still works there: exact diagonal, GGN through BackPACK (DiagGGNExact knows
    # BatchNorm in eval mode).
    code = main(["measure", str(path), "--model", "tests.test_cli_backpack:bn_net",
                 "--split-ggn", "--max-examples", "20", "--dtype", "float64"])
    assert code == 0
    assert "residual" in capsys.readouterr().out
