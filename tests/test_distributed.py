"""Data-parallel measurement: 2 CPU ranks with gloo on the loopback interface give the
single-process result, and a failing rank stops every rank with exit code 2.

The ranks are separate processes started as torchrun starts them (tests/distributed_worker.py).
"""

import json

import pytest
import torch

import hessdiag
from hessdiag.cli import main
from hessdiag.distributed import SINGLE, DistributedError, World, joined_world
from hessdiag.objective import BatchSource

from . import distributed_worker as worker
from .models import write_digits_checkpoint


def relative_error(got: dict, want: dict) -> float:
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's two processes (every case, then the failing run) and rank 0's results."""
    out = tmp_path_factory.mktemp("distributed") / "results.pt"
    ranks = worker.launch([["-m", "tests.distributed_worker", str(out)]] * 2)
    assert out.exists(), ranks[0].stderr[-2000:]
    return ranks, torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def two_rank_results(two_ranks):
    return two_ranks[1]


@pytest.fixture(scope="module")
def one_process_results():
    results = {}
    for name, options in worker.cases().items():
        options = dict(options)
        model, data = worker.problem(relu=options.pop("model", None) == "relu")
        chosen = worker.batches(data) if options.pop("data", None) == "batches" else data
        result = hessdiag.measure(model, chosen, worker.loss_of(options), dtype="float64", keep_diagonal=True,
                                  **options)
        results[name] = {"diagonal": result.diagonal, "samples": result.samples, "doc": result.to_dict(),
                         "ggn": result.ggn_diagonal}
    return results


@pytest.mark.parametrize("case", ["exact-analytic", "exact-weighted-loss", "exact-basis", "exact-basis-batches",
                                  "exact-tape-relu", "backpack"])
def test_exact_estimators_match_one_process(case, two_rank_results, one_process_results):
    got, want = two_rank_results[case], one_process_results[case]
    assert got["doc"]["method"] == want["doc"]["method"]
    assert relative_error(got["diagonal"], want["diagonal"]) <= 1e-10
    assert got["doc"]["normalized_norm"] == pytest.approx(want["doc"]["normalized_norm"], rel=1e-10)
    if want["ggn"] is not None:
        assert relative_error(got["ggn"], want["ggn"]) <= 1e-10


@pytest.mark.parametrize("case", ["hutchinson", "hutchinson-plain-adaptive", "hutchinson-ggn"])
def test_seeded_stochastic_runs_match_one_process(case, two_rank_results, one_process_results):
    got, want = two_rank_results[case], one_process_results[case]
    assert got["samples"] == want["samples"]  # same probes, same adaptive stop
    assert relative_error(got["diagonal"], want["diagonal"]) <= 1e-10
    for key in ("normalized_norm", "sq_norm"):
        assert got["doc"][key] == pytest.approx(want["doc"][key], rel=1e-10)
    assert got["doc"]["ci95"] == pytest.approx(want["doc"]["ci95"], rel=1e-8)


def test_curvprop_runs_distributed(two_rank_results, one_process_results):
    got, want = two_rank_results["curvprop"], one_process_results["curvprop"]
    assert got["samples"] == want["samples"] == 6
    # Per-example draws differ per rank; the exact GGN part does not depend on them.
    assert all(bool(torch.isfinite(v).all()) for v in got["diagonal"].values())
    low, high = got["doc"]["ci95"]
    assert low <= got["doc"]["normalized_norm"] <= high


def test_result_records_world_size_and_shards(two_rank_results, one_process_results):
    doc = two_rank_results["exact-basis"]["doc"]
    assert doc["world_size"] == 2 and doc["examples_per_rank"] == [18, 19] and doc["num_examples"] == 37
    assert "ranks=2  examples per rank: 18, 19" in two_rank_results["exact-basis"]["table"]
    # Batches go round robin: batches 0, 2, 4 (8 + 8 + 5 examples) to rank 0.
    assert two_rank_results["exact-basis-batches"]["doc"]["examples_per_rank"] == [21, 16]
    single = one_process_results["exact-basis"]["doc"]
    assert single["world_size"] == 1 and single["examples_per_rank"] == [37]


@pytest.mark.parametrize("case, message", [
    ("other-data", "rank 1 of 2 measures a different model, data or options than rank 0"),
    ("extras", "extras (PyHessian's trace and top eigenvalue) do not run distributed"),
    ("plugin", "estimator 'plugin' does not run on several processes"),
])
def test_refused_on_every_rank_before_any_product(case, message, two_rank_results):
    assert two_rank_results["refusals"][case].startswith("DistributedError: ")
    assert message in two_rank_results["refusals"][case]


def test_cli_under_two_ranks_matches_one_process_and_stops_on_bad_input(tmp_path, capsys):
    checkpoint = tmp_path / "small.pt"
    write_digits_checkpoint(checkpoint)
    common = ["-m", "hessdiag", "measure", str(checkpoint), "--max-examples", "50", "--dtype", "float64",
              "--estimator", "hutchinson", "--samples", "24", "--dist-timeout", "60"]
    assert main([*common[2:], "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    # One world measuring; then rank 1 alone gets labels outside the model's range.
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.randn(50, 64), "y": torch.full((50,), 12)}, bad)
    runs = [worker.launch([[*common, "--json", str(tmp_path / "two.json")]] * 2),
            worker.launch([common, [*common, "--data", f"tensors:{bad}"]])]
    good, failed = runs
    assert [r.returncode for r in good] == [0, 0], good[0].stderr[-2000:]
    assert good[1].stdout == "" and "ranks=2  examples per rank: 25, 25" in good[0].stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["samples"] == one["samples"]
    assert two["normalized_norm"] == pytest.approx(one["normalized_norm"], rel=1e-10)
    assert [r.returncode for r in failed] == [2, 2]
    assert "error: rank 1 of 2: " in failed[0].stderr and "label 12 is outside" in failed[0].stderr
    assert failed[1].stderr == ""  # rank 0 reports for both


def test_rank_failing_mid_run_stops_every_rank_with_exit_2(two_ranks):
    ranks, _ = two_ranks
    assert [r.returncode for r in ranks] == [2, 2]
    assert ranks[1].stdout == ""  # rank 1 was silent until its own error
    assert ranks[1].stderr.startswith("hessdiag: error (rank 1): the data changed between passes")
    assert "rank 0: stopped because another rank failed" in ranks[0].stderr
    # gloo notices the closed connection: no waiting for the 60 s timeout.
    seconds = [float(r.stderr.split("failed after ")[1].split()[0]) for r in ranks]
    assert max(seconds) < 30


def test_shards_cover_every_example_once():
    for num in (1, 7, 37, 100):
        for size in (1, 2, 3, 8):
            slices = [World(rank, size).shard(num) for rank in range(size)]
            covered = [i for s in slices for i in range(num)[s]]
            assert covered == list(range(num))
            assert max(len(range(num)[s]) for s in slices) - min(len(range(num)[s]) for s in slices) <= 1


def test_batch_source_yields_this_ranks_share():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    third = BatchSource((x, y), batch_size=2, world=World(1, 3))
    assert [b[1].tolist() for b in third] == [[3, 4], [5]]
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2)]
    second = BatchSource(batches, world=World(1, 2))
    assert [b[1].tolist() for b in second] == [[2, 3], [6, 7]] and len(second) == 2
    assert len(BatchSource(batches)) == 5


def test_joined_world_outside_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with joined_world() as (world, device):
        assert world is SINGLE and device is None
    with joined_world(False, "cpu") as (world, device):
        assert world is SINGLE and device == "cpu"
    with pytest.raises(DistributedError, match="needs an initialized process group"):
        with joined_world(True):
            pass
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set"):
        with joined_world():
            pass


def test_a_callers_process_group_is_used_and_left_alone(tmp_path, tiny_classification):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with joined_world() as (world, device):
            assert (world.rank, world.size, world.distributed, device) == (0, 1, False, None)
        model, _ = worker.problem()
        x, y = tiny_classification
        result = hessdiag.measure(model.float()[:1], (x[:, :5], y), "ce", estimator="exact")
        assert result.world_size == 1 and result.examples_per_rank == [20]
        assert dist.is_initialized()  # the caller's group outlives the call
    finally:
        dist.destroy_process_group()


def test_a_rank_that_stops_answering_times_out_on_every_rank():
    ranks = worker.launch([["-m", "tests.distributed_worker", "stall"]] * 2, timeout=90)
    assert [r.returncode for r in ranks] == [2, 2], ranks[0].stderr[-2000:]
    assert "did not answer within the timeout" in ranks[0].stderr
    # Rank 0 gives up after the 3 s timeout, long before rank 1 answers (8 s).
    seconds = float(ranks[0].stderr.split("failed after ")[1].split()[0])
    assert 2.5 < seconds < 8
