"""`make lint` exists, is configured in setup.cfg, runs in CI before the tests, and flake8 is clean.

mypy is left to `make lint` itself (about 40 s cold), which `.ci/run` runs first.
"""

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_configures_flake8_and_mypy():
    cfg = configparser.ConfigParser()
    assert cfg.read(ROOT / "setup.cfg")
    assert int(cfg["flake8"]["max-line-length"]) >= 100
    assert ".venv" in cfg["flake8"]["exclude"]
    assert cfg["mypy"]["files"].strip() == "hessdiag"
    assert any(s.startswith("mypy-") and cfg[s].getboolean("ignore_missing_imports") for s in cfg.sections())
    assert "strict" not in cfg["mypy"]


def test_make_lint_runs_in_ci_before_the_tests_and_is_installed_by_make():
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^lint: .*\n((?:\t.*\n)+)", makefile, re.M)
    assert target and "-m flake8 hessdiag tests" in target.group(1) and "-m mypy hessdiag" in target.group(1)
    assert re.search(r"pip install .*-e '\.\[[^\]]*\blint\b", makefile)
    assert re.search(r'^lint = \[.*"flake8.*"mypy', (ROOT / "pyproject.toml").read_text(), re.M)
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip().startswith("make ")]
    assert steps == ["make lint", "make test"]


def test_flake8_is_clean():
    pytest.importorskip("flake8")
    proc = subprocess.run([sys.executable, "-m", "flake8", "hessdiag", "tests", "benchmarks", "examples"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
