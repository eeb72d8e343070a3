"""AutoAttack on a finished sweep's checkpoints, after the fact (docs/findings.md).

A sweep with ``autoattack = false`` records PGD-20 robust accuracy only. This script loads
the checkpoints of the selected runs (native checkpoints, no unpickling of code), runs
torchattacks' standard AutoAttack at the run's own ε and seed on the run's test examples,
and appends one JSON line per run to ``OUT`` (``{"id", "autoattack_accuracy",
"pgd_accuracy"}``); runs already in ``OUT`` are skipped, so it resumes.

Usage: PYTHONPATH=. python examples/sweep_autoattack.py DIR OUT.jsonl [--model mlp]
       [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hessdiag.experiments import autoattack_accuracy
from hessdiag.experiments.sweep import RESULTS, append_record, read_results, records_by_id
from hessdiag.io import load_checkpoint, load_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", metavar="DIR")
    p.add_argument("out", metavar="OUT.jsonl")
    p.add_argument("--model", help="only runs of this model (e.g. mlp)")
    p.add_argument("--seeds", type=int, nargs="*", help="only runs with these seeds")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    done = {r["id"] for r in read_results(args.out)}
    records = records_by_id(read_results(Path(args.results) / RESULTS)).values()
    for r in sorted(records, key=lambda r: r["index"]):
        c = r["config"]
        if r["id"] in done or (args.model and c["model"] != args.model) or \
                (args.seeds is not None and c["seed"] not in args.seeds):
            continue
        model, _ = load_checkpoint(Path(args.results) / r["checkpoint"])
        x, y = load_data(c["data"], split="test", max_examples=c["max_test"])
        acc = autoattack_accuracy(model.eval(), x, y, c["eps"], seed=c["seed"])
        append_record(args.out, {"id": r["id"], "autoattack_accuracy": acc, "pgd_accuracy": r["pgd_accuracy"]})
        print(json.dumps({"id": r["id"], "model": c["model"], "activation": c["activation"],
                          "method": c["method"], "seed": c["seed"], "pgd": r["pgd_accuracy"],
                          "autoattack": acc}), flush=True)


if __name__ == "__main__":
    main()
