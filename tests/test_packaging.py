"""Packaging: one version source, py.typed, no torch cap, and a wheel that runs the demo.

The wheel is built from a copy of the package (``pip wheel --no-deps
--no-build-isolation``, so nothing is downloaded and the checkout gets no build/ folder),
installed with ``pip install --no-deps --target`` and run from a folder outside the
repository with only that folder on ``PYTHONPATH``: the demo must find its checkpoint in
the installed package, not in a source checkout.
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hessdiag
from hessdiag._version import __version__
from hessdiag.demo import DEMO_CHECKPOINT, bundled_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation",
                           "--no-index", "-q"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "hessdiag", src / "hessdiag", ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (built,) = (tmp / "dist").glob("hessdiag-*.whl")
    return built


def test_one_version_source():
    assert hessdiag.__version__ == __version__
    assert 'dynamic = ["version"]' in PYPROJECT
    assert re.search(r'^version = \{ attr = "hessdiag\._version\.__version__" \}$', PYPROJECT, re.M)
    assert not re.search(r'^version = "', PYPROJECT, re.M)
    try:
        installed = importlib.metadata.version("hessdiag")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("hessdiag is not installed (no metadata to compare)")
    assert installed == hessdiag.__version__


def test_torch_is_not_capped_in_the_package_metadata():
    (torch_req,) = re.findall(r'^\s*"(torch[<>=!~ ].*)",', PYPROJECT, re.M)
    assert "<" not in torch_req and "==" not in torch_req and "~=" not in torch_req


def test_py_typed_and_checkpoint_are_package_files():
    assert (ROOT / "hessdiag" / "py.typed").is_file()
    assert bundled_checkpoint() == ROOT / "hessdiag" / "data" / DEMO_CHECKPOINT
    assert bundled_checkpoint().is_file()


def test_wheel_ships_py_typed_checkpoint_and_the_version(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert {"hessdiag/py.typed", f"hessdiag/data/{DEMO_CHECKPOINT}"} <= names
    assert f"\nVersion: {__version__}\n" in text
    assert "\nRequires-Dist: torch>=2.4\n" in text
    assert wheel.name.startswith(f"hessdiag-{__version__}-")


def test_demo_runs_from_the_installed_wheel(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _pip("install", "--target", str(target), str(wheel), cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, hessdiag, hessdiag.demo as d; "
         "print(hessdiag.__file__); print(m.version('hessdiag'), hessdiag.__version__); "
         "print(d.bundled_checkpoint())"],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    module, versions, checkpoint = where.stdout.splitlines()
    assert Path(module).is_relative_to(target) and Path(checkpoint).is_relative_to(target)
    assert versions == f"{__version__} {__version__}"

    demo = subprocess.run([sys.executable, "-m", "hessdiag", "demo"], capture_output=True, text=True,
                          cwd=elsewhere, env=env, timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    lines = demo.stdout.splitlines()
    assert lines[0].startswith(f"hessdiag demo: {DEMO_CHECKPOINT} (5,962 parameters, test accuracy 0.9")
    assert "359 test examples, float64" in lines[0]
    rows = [line.split() for line in lines if re.match(r"^\d\.(weight|bias) ", line)]
    assert [r[0] for r in rows] == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    total = next(line.split() for line in lines if line.startswith("total "))
    assert total[1] == "5,962" and float(total[2]) > 0
    assert any(line.startswith("estimator=exact") for line in lines)
    assert not list(elsewhere.iterdir())  # nothing written into the working directory
