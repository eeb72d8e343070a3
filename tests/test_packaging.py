"""Packaging: one version source, py.typed, no torch cap.

The wheel is built from a copy of the package (``pip wheel --no-deps
--no-build-isolation``, so nothing is downloaded and the checkout gets no build/ folder).
"""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hessdiag
from hessdiag._version import __version__

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


def test_py_typed_is_a_package_file():
    assert (ROOT / "hessdiag" / "py.typed").is_file()


def test_wheel_ships_py_typed_and_the_version(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert "hessdiag/py.typed" in names
    assert f"\nVersion: {__version__}\n" in text
    assert "\nRequires-Dist: torch>=2.4\n" in text
    assert wheel.name.startswith(f"hessdiag-{__version__}-")

