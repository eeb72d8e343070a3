"""Sweeps: the tiny config end to end through the CLI, resuming (also after SIGKILL),
sharding, worker processes, config validation, and the figures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torchattacks")

from hessdiag.cli import main  # noqa: E402
from hessdiag.experiments.sweep import (  # noqa: E402
    RESULTS, append_record, expand, load_config, read_results, trim_torn_line,
)
from hessdiag.io import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "sweeps" / "tiny.toml"


def _lines(folder):
    """Every line of results.jsonl parsed (fails on an invalid or incomplete line)."""
    text = (Path(folder) / RESULTS).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _numbers(record):
    """What must agree between two computations of the same run."""
    keep = ("clean_accuracy", "pgd_accuracy", "autoattack_accuracy", "train_losses", "psi_max")
    measures = {k: {q: v for q, v in m.items() if q != "seconds"} for k, m in record["measure"].items()}
    return {**{k: record[k] for k in keep}, "measure": measures}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    code = main(["sweep", str(TINY), "--out", str(out)])
    return out, code, time.perf_counter() - start


def test_tiny_sweep_runs_end_to_end(tiny_run):
    out, code, seconds = tiny_run
    assert code == 0
    assert seconds < 60
    runs = expand(load_config(TINY))
    records = _lines(out)
    assert len(runs) == 4 and [r["id"] for r in records] == [r.id for r in runs]
    for record in records:
        assert record["config"]["activation"].startswith("rct:n=1,psi=")
        assert record["psi_max"] in (4.0, 8.0)
        assert set(record["measure"]) == {"clean", "adversarial"}
        for m in record["measure"].values():
            assert m["normalized_norm"] > 0 and m["ggn_normalized_norm"] > 0
            assert m["residual_normalized_norm"] is not None and m["invariant_normalized_norm"] > 0
            assert m["ci95"][0] <= m["normalized_norm"] <= m["ci95"][1]
        assert 0 <= record["pgd_accuracy"] <= record["clean_accuracy"] <= 1
        assert set(record["versions"]) == {"hessdiag", "torch", "torchattacks", "python"}
        model, meta = load_checkpoint(out / record["checkpoint"])
        assert meta["sweep_run"] == record["id"]
        assert sum(p.numel() for p in model.parameters()) == record["measure"]["clean"]["num_params"]


def test_rerun_skips_every_finished_run(tiny_run, capsys):
    out, _, _ = tiny_run
    before = (out / RESULTS).read_bytes()
    capsys.readouterr()
    assert main(["sweep", str(TINY), "--out", str(out)]) == 0
    assert "0 run(s) finished, 4 skipped" in capsys.readouterr().out
    assert (out / RESULTS).read_bytes() == before


def test_shards_together_equal_the_whole_sweep(tiny_run, tmp_path):
    out, _, _ = tiny_run
    whole = {r["id"]: r for r in _lines(out)}
    parts = {}
    for i in (0, 1):
        folder = tmp_path / f"shard{i}"
        assert main(["sweep", str(TINY), "--out", str(folder), "--shard", f"{i}/2"]) == 0
        records = _lines(folder)
        assert all(r["index"] % 2 == i for r in records)
        parts.update({r["id"]: r for r in records})
    assert parts.keys() == whole.keys()
    for run_id, record in whole.items():
        assert _numbers(parts[run_id]) == _numbers(record)


def test_worker_processes_give_the_same_numbers(tiny_run, tmp_path):
    out, _, _ = tiny_run
    whole = {r["id"]: r for r in _lines(out)}
    assert main(["sweep", str(TINY), "--out", str(tmp_path), "--jobs", "2", "--shard", "0/2"]) == 0
    records = _lines(tmp_path)
    assert len(records) == 2
    for record in records:
        assert _numbers(record) == _numbers(whole[record["id"]])


def test_sigkill_mid_sweep_then_rerun_gives_each_run_once(tmp_path):
    # Longer runs than tiny.toml, so that the kill lands while runs remain.
    config = tmp_path / "slow.toml"
    config.write_text(TINY.read_text().replace("epochs = 2", "epochs = 60"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "hessdiag", "sweep", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / RESULTS
    deadline = time.monotonic() + 120
    try:
        while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, "the sweep ended before writing a line"
            assert time.monotonic() < deadline, "no line within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = _lines(out)
    assert 1 <= len(killed) < 4
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = _lines(out)
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(r.id for r in expand(load_config(config)))
    assert len(set(ids)) == len(ids) == 4
    assert records[: len(killed)] == killed
    for record in records:
        assert (out / record["checkpoint"]).exists()


def test_a_torn_last_line_is_trimmed(tmp_path):
    path = tmp_path / RESULTS
    append_record(path, {"id": "a", "x": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"id": "b", "x"')
    assert [r["id"] for r in read_results(path)] == ["a"]
    assert trim_torn_line(path)
    assert path.read_bytes() == b'{"id": "a", "x": 1}\n'
    assert not trim_torn_line(path)


BAD = {
    "unknown table": "[sweeps]\nseeds = [0]\n",
    "no models": "[activations]\nbaselines = ['gelu']\n",
    "unknown model": "[models.vit]\n[activations]\nbaselines = ['gelu']\n",
    "bad model kwarg": "[models.mlp]\nwidth = 3\n[activations]\nbaselines = ['gelu']\n",
    "unknown key": "[models.mlp]\n[activations]\nbaselines = ['gelu']\n[training]\nepoch = 2\n",
    "bad method": "[models.mlp]\n[activations]\nbaselines = ['gelu']\n[training]\nmethods = ['fgsm']\n",
    "bad order": "[models.mlp]\n[activations]\nrct_n = [3]\npsi = [4.0]\n",
    "psi without n": "[models.mlp]\n[activations]\npsi = [4.0]\nbaselines = ['gelu']\n",
    "bad baseline": "[models.mlp]\n[activations]\nbaselines = ['swishy']\n",
    "bad seeds": "[sweep]\nseeds = []\n[models.mlp]\n[activations]\nbaselines = ['gelu']\n",
    "bad eps": "[sweep]\neps = -1\n[models.mlp]\n[activations]\nbaselines = ['gelu']\n",
    "bad estimator": "[models.mlp]\n[activations]\nbaselines = ['gelu']\n[measure]\nestimator = 'magic'\n",
    "bad toml": "[models.mlp\n",
    "repeated psi": "[models.mlp]\n[activations]\nrct_n = [1]\npsi = [4, 4.0]\n",
    "bad device": "[sweep]\ndevice = 'gpu'\n[models.mlp]\n[activations]\nbaselines = ['gelu']\n",
    "bad schedule": "[models.mlp]\n[activations]\nbaselines = ['gelu']\n[training]\nlr_schedule = 'step'\n",
}


def test_lr_schedule_enters_the_run_id_only_when_set(tmp_path):
    # Results written before the key existed keep their ids: the default is left out.
    base = TINY.read_text()
    constant, cosine = tmp_path / "constant.toml", tmp_path / "cosine.toml"
    constant.write_text(base.replace("[training]", "[training]\nlr_schedule = \"constant\""))
    cosine.write_text(base.replace("[training]", "[training]\nlr_schedule = \"cosine\""))
    ids = [[r.id for r in expand(load_config(p))] for p in (TINY, constant, cosine)]
    assert ids[0] == ids[1] and not set(ids[0]) & set(ids[2])
    assert all(r.config["training"]["lr_schedule"] == "cosine" for r in expand(load_config(cosine)))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_exits_2_with_one_line(name, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(BAD[name])
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessdiag: error: ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--shard", "2/2"], ["--shard", "x"], ["--jobs", "0"]])
def test_bad_shard_or_jobs_exits_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(["sweep", str(TINY), "--out", str(tmp_path / "o"), *args])
        raise SystemExit(code)
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_config_exits_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_plot_writes_png_and_pdf(tiny_run, tmp_path, capsys):
    out, _, _ = tiny_run
    prefix = tmp_path / "fig"
    assert main(["plot", str(out), "--out", str(prefix)]) == 0
    for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
        path = tmp_path / f"fig-mlp-standard.{ext}"
        assert path.read_bytes().startswith(magic)
    assert main(["plot", str(out)]) == 0
    assert (out / "figures" / "sweep-mlp-standard.pdf").exists()


def test_plot_without_results_exits_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no results" in capsys.readouterr().err


def test_adversarial_methods_and_baselines(tmp_path):
    """pgd-at and trades runs, RCT-AF n = 0 and 2, baselines (ReLU: ψ_max ∞ → null), plot."""
    from hessdiag.experiments.plot import plot_sweep
    from hessdiag.experiments.sweep import run_sweep

    config = tmp_path / "adv.toml"
    config.write_text(
        "[sweep]\nseeds = [3]\neps = 0.1\nmax_train = 64\nmax_test = 32\n"
        "[models.mlp]\nhidden = [6]\n"
        "[activations]\nrct_n = [0, 2]\npsi = [5.0]\nbaselines = ['gelu', 'relu']\n"
        "[training]\nmethods = ['pgd-at', 'trades']\nepochs = 1\nbatch_size = 32\nsteps = 2\n"
        "[evaluation]\npgd_steps = 3\n[measure]\nmax_examples = 16\n"
    )
    summary = run_sweep(config, tmp_path / "out")
    assert (summary.total, summary.done, summary.failed) == (8, 8, [])
    records = _lines(tmp_path / "out")
    assert [r["config"]["activation"] for r in records[::2]] == \
        ["rct:n=0,psi=5", "rct:n=2,psi=5", "gelu", "relu"]
    assert {r["config"]["method"] for r in records} == {"pgd-at", "trades"}
    assert [r["psi_max"] for r in records if r["config"]["activation"] == "relu"] == [None, None]
    assert all(r["measure"]["adversarial"]["normalized_norm"] > 0 for r in records)
    paths = plot_sweep(tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(
        f"sweep-mlp-{m}.{e}" for m in ("pgd-at", "trades") for e in ("png", "pdf"))


def test_a_failing_run_is_reported_and_retried(tmp_path, capsys):
    config = tmp_path / "missing.toml"
    config.write_text(f"[sweep]\ndata = 'npz:{tmp_path / 'none.npz'}'\n"
                      "[models.mlp]\n[activations]\nbaselines = ['gelu']\n")
    assert main(["sweep", str(config), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "1 failed" in out
    assert read_results(tmp_path / "out" / RESULTS) == []


def test_the_shipped_sweep_configs_are_valid(tmp_path):
    digits = expand(load_config(ROOT / "examples" / "sweeps" / "digits.toml"))
    assert len(digits) == 108 and {r.config["seed"] for r in digits} == {0, 1, 2}
    assert {r.config["method"] for r in digits} == {"pgd-at", "trades"}
    # The CIFAR-10 sweep names a GPU; validated here on the CPU.
    text = (ROOT / "examples" / "sweeps" / "cifar10_resnet18.toml").read_text()
    cpu = tmp_path / "cifar10_cpu.toml"
    cpu.write_text(text.replace('device = "cuda"', 'device = "cpu"'))
    cifar = expand(load_config(cpu))
    assert len(cifar) == 156 and cifar[0].config["training"]["lr_schedule"] == "piecewise"
