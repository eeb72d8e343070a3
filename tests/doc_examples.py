"""The example outputs shown in docs/cli.md, and real runs of their commands.

docs/cli.md shows commands with their output in ```` ```console ```` blocks: a line
``$ hessdiag ...`` (continued by a trailing backslash), then what the command prints
(stdout, then stderr). A line ``...`` inside the output marks an abridged part: the lines
above it are the first lines of the real output, the lines below it its last lines.

:func:`run_examples` runs every documented command in document order in one scratch
folder (later examples use what earlier ones wrote, e.g. a sweep's checkpoint), in process
through :func:`hessdiag.cli.main`. The scratch folder links the repository's ``hessdiag``,
``examples`` and ``docs`` folders, so repository paths in the commands resolve, and holds
the few input files the examples name but the repository does not ship
(:data:`INPUT_FILES`, built from the bundled demo checkpoint).

:func:`shape` reduces an output line to what the docs promise about it: its words, column
names and ``key=`` fields, with every number, run id and time unit replaced, so figures may
differ between runs but a field or row that appears on one side only does not.

``python -m tests.doc_examples`` rewrites the outputs in docs/cli.md from real runs
(keeping each block's abridgement), which is how the documented figures are produced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
LINKED = ("hessdiag", "examples", "docs")
"""Repository folders the documented commands name by relative path."""
ELLIPSIS = "..."

_BLOCK = re.compile(r"^```console\n(.*?)^```$", re.M | re.S)
_RUN_ID = re.compile(r"\b[0-9a-f]{16}\b")
_TIME_UNIT = re.compile(r"\b(?:ms|s|seconds|minutes|hours|days|years)\b")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|\b(?:inf|nan)\b")


@dataclass(frozen=True)
class Example:
    """One documented command and the output docs/cli.md shows for it."""

    command: str  # as written after "$ ", continuation lines joined
    source: list[str]  # the command's lines as written in the doc (with "$ " and backslashes)
    output: list[str]  # the documented output lines, possibly with an ELLIPSIS line
    line: int  # 1-based line of the "$ " line in docs/cli.md

    @property
    def argv(self) -> list[str]:
        """The command's words: ``hessdiag ...`` or ``torchrun ... -m hessdiag ...``."""
        words = shlex.split(self.command)
        assert words[0] in ("hessdiag", "torchrun"), self.command
        return words

    @property
    def label(self) -> str:
        return f"cli.md:{self.line}: {self.command[:70]}"


def parse_examples(text: str) -> list[Example]:
    """Every ``$ hessdiag`` command with its output, from the console blocks of ``text``."""
    examples = []
    for block in _BLOCK.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise ValueError(f"docs/cli.md:{first_line + i}: output before any '$ ' command line")
            start = i
            while lines[i].endswith("\\"):
                i += 1
            source = lines[start:i + 1]
            command = " ".join(part.rstrip("\\").strip() for part in source)[2:]
            i += 1
            output_start = i
            while i < len(lines) and not lines[i].startswith("$ "):
                i += 1
            examples.append(Example(command, source, lines[output_start:i], first_line + start))
    return examples


def shape(line: str) -> str:
    """``line`` without its figures: numbers, run ids and time units replaced, spacing collapsed.

    ``< x`` (an unresolved estimate) counts as a number, so a cell that happens to resolve
    in one run and not in another does not change the shape.
    """
    line = _TIME_UNIT.sub("<unit>", _NUMBER.sub("#", _RUN_ID.sub("<id>", line)))
    return " ".join(line.replace("< #", "#").split())


def abridge_like(documented: Sequence[str], actual: Sequence[str]) -> list[str]:
    """``actual`` cut as ``documented`` is: the same number of lines before and after ``...``."""
    if ELLIPSIS not in documented:
        return list(actual)
    cut = list(documented).index(ELLIPSIS)
    tail = len(documented) - cut - 1
    return [*actual[:cut], ELLIPSIS, *(actual[len(actual) - tail:] if tail else [])]


def shape_mismatch(example: Example, actual: Sequence[str]) -> str | None:
    """``None`` if ``actual`` has the documented lines' shape, else a description."""
    documented = [shape(line) for line in example.output]
    real = [shape(line) for line in abridge_like(example.output, actual)]
    if documented == real:
        return None
    return (f"{example.label}: the real output differs from the documented one in shape\n"
            "documented:\n  " + "\n  ".join(example.output) + "\nreal run:\n  " + "\n  ".join(actual))


# -- inputs the examples name that the repository does not ship ---------------------------


def _demo_model() -> torch.nn.Module:
    from hessdiag.demo import bundled_checkpoint
    from hessdiag.io import load_checkpoint

    return load_checkpoint(bundled_checkpoint())[0]


def _whole_model(path: Path) -> None:
    """A whole pickled ``nn.Module`` (``torch.save(model, ...)``)."""
    torch.save(_demo_model(), path)


def _lightning_checkpoint(path: Path) -> None:
    """A Lightning-style checkpoint: the network's state dict under ``model.`` prefixes."""
    state = {f"model.{k}": v for k, v in _demo_model().state_dict().items()}
    torch.save({"state_dict": state, "epoch": 19, "global_step": 460}, path)


def _safetensors_file(path: Path) -> None:
    from safetensors.torch import save_file

    save_file(dict(_demo_model().state_dict()), str(path))


def _cnn_checkpoint(path: Path) -> None:
    """A native checkpoint of ``hessdiag.models:cnn`` (channels 8, 16; 3,818 parameters)."""
    from hessdiag.io import save_checkpoint
    from hessdiag.models import cnn

    kwargs = {"channels": [8, 16]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cnn(**kwargs)
    save_checkpoint(path, model, "hessdiag.models:cnn", kwargs, {"data": "digits", "loss": "ce"})


INPUT_FILES: dict[str, Callable[[Path], None]] = {
    "whole.pt": _whole_model,
    "lightning.ckpt": _lightning_checkpoint,
    "model.safetensors": _safetensors_file,
    "cnn.pt": _cnn_checkpoint,
}
"""File name → writer, for the checkpoints the examples use besides the bundled one."""


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary working folder with the repository links and :data:`INPUT_FILES`."""
    with tempfile.TemporaryDirectory(prefix="hessdiag-doc-examples-") as name:
        folder = Path(name)
        for entry in LINKED:
            (folder / entry).symlink_to(ROOT / entry, target_is_directory=True)
        for file_name, write in INPUT_FILES.items():
            write(folder / file_name)
        yield folder


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_command(argv: Sequence[str]) -> tuple[int, list[str]]:
    """Run ``hessdiag ...`` in process, or ``torchrun ...`` as torchrun would (its ranks are
    processes); (exit code, stdout lines followed by stderr lines)."""
    if argv[0] == "torchrun":
        return _run_torchrun(argv[1:])
    from hessdiag.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv[1:]))
        except SystemExit as exit_:  # argparse usage errors
            code = int(exit_.code or 0)
    return code, (out.getvalue() + err.getvalue()).splitlines()


def _run_torchrun(arguments: Sequence[str]) -> tuple[int, list[str]]:
    """``torchrun ARGUMENTS`` on this Python, one thread per rank, on a free local port (set
    through torchrun's ``PET_`` environment, so the documented command is run as written)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *arguments], env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, (done.stdout + done.stderr).splitlines()


def run_examples(examples: Sequence[Example], folder: Path) -> dict[int, tuple[int, list[str]]]:
    """Run the examples in order in ``folder``; {example line: (exit code, real output lines)}."""
    with _working_directory(folder):
        return {example.line: run_command(example.argv) for example in examples}


def expected_exit_code(example: Example) -> int:
    """2 where the documented output is an error line (bad input), else 0."""
    return 2 if any(line.startswith("hessdiag: error:") for line in example.output) else 0


def regenerate(text: str, outputs: dict[int, Sequence[str]]) -> str:
    """``text`` (docs/cli.md) with each example's output replaced by its real one."""
    lines = text.splitlines(keepends=True)
    for example in sorted(parse_examples(text), key=lambda e: e.line, reverse=True):
        start = example.line - 1 + len(example.source)
        new = [f"{line}\n" for line in abridge_like(example.output, outputs[example.line])]
        lines[start:start + len(example.output)] = new
    return "".join(lines)


def main() -> int:
    """Rewrite the example outputs of docs/cli.md from real runs."""
    text = DOC.read_text()
    examples = parse_examples(text)
    with scratch_folder() as folder:
        outputs = run_examples(examples, folder)
        result = folder / "out" / "result.json"
        if result.exists():  # the figures the prose quotes from the last run's JSON
            doc = json.loads(result.read_text())
            print({k: doc.get(k) for k in ("normalized_norm", "ci95", "sq_norm", "sq_norm_ci95", "rtol_budget")})
    DOC.write_text(regenerate(text, {line: lines for line, (_, lines) in outputs.items()}))
    print(f"rewrote the outputs of {len(examples)} examples in {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
