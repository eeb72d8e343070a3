"""Loading never runs code from a file unless the user trusts it (docs/index.md, "Checkpoints and data").

Each payload is a pickle whose unpickling creates a marker file. The CLI must refuse it
with exit 2 and the marker must not appear; with ``--trust-checkpoint`` the same file
does create the marker, which shows the payload is live (so the refusal is what saved us).
"""

import os
import pathlib

import pytest
import torch

from hessdiag.cli import main
from hessdiag.io import save_checkpoint
from hessdiag.models import mlp


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TouchPayload:
    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("payload", [SystemPayload, TouchPayload])
@pytest.mark.parametrize("wrap", [lambda p: p, lambda p: {"state_dict": {"w": torch.zeros(1)}, "extra": p}],
                         ids=["bare", "nested"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, payload, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(wrap(payload(marker)), path)
    code = main(["measure", str(path), "--model", "hessdiag.models:mlp", "--max-examples", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert not marker.exists()
    assert "--trust-checkpoint" in err and len(err.strip().splitlines()) == 1

    # The payload is live: trusting the file runs it (then fails to find a model: exit 2).
    assert main(["measure", str(path), "--trust-checkpoint", "--max-examples", "5"]) == 2
    assert marker.exists()


def test_malicious_data_file_runs_nothing(tmp_path, capsys):
    from tests.io.test_checkpoints import KWARGS

    marker = tmp_path / "pwned"
    torch.save({"x": SystemPayload(marker), "y": torch.zeros(3)}, tmp_path / "evil.pt")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, mlp(**KWARGS), "hessdiag.models:mlp", KWARGS)
    code = main(["measure", str(ckpt), "--data", f"tensors:{tmp_path / 'evil.pt'}"])
    assert code == 2 and not marker.exists()
    capsys.readouterr()


def test_native_checkpoint_naming_a_foreign_factory_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.py").write_text(
        f"import pathlib\ndef make(**kw):\n    pathlib.Path({str(marker)!r}).touch()\n")
    path = tmp_path / "m.pt"
    save_checkpoint(path, mlp(in_features=4, hidden=[3], num_classes=2),
                    f"{tmp_path / 'evil.py'}:make", {})
    assert main(["measure", str(path), "--max-examples", "5"]) == 2
    assert not marker.exists()
    assert "could run code" in capsys.readouterr().err
    # Trusted, the factory is called (and returns no module: exit 2), proving it was live.
    assert main(["measure", str(path), "--trust-checkpoint", "--max-examples", "5"]) == 2
    assert marker.exists()
