# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the project into it (with the test, lint and
# pyhessian extras, so the PyHessian context metrics are tested too, and torchattacks for
# hessdiag.experiments); `make lint` (flake8 and mypy, configured in setup.cfg) too. torch and
# torchvision are pinned here (TORCH_PINS) to the releases this machine serves from local
# disk, so pip never reaches for a newer (multi-GB) build; the package metadata
# (pyproject.toml) only asks for torch>=2.4, so installs elsewhere may use newer releases.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The `experiments` extra (torchattacks), installed without its dependencies: it declares
# requests~=2.25.1, which it never imports and which would pull idna below the 3.18 that
# huggingface_hub's httpx2 needs; its real dependencies (torch, torchvision, scipy, numpy,
# tqdm) come with hessdiag itself.
TORCHATTACKS := 'torchattacks>=3.5'
# Some configured local indexes do not exist on every machine; their warnings are noise.
QUIET_PIP := 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-all check lint venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) $(QUIET_PIP)
	$(PY) -m pip install -q -e '.[test,lint,pyhessian]' $(TORCH_PINS) $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps $(TORCHATTACKS) $(QUIET_PIP)
	$(PY) -c "import hessdiag, torch, torchattacks; print('hessdiag', hessdiag.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hessdiag demo

test: $(STAMP)
	$(PY) -m pytest -q

# flake8 on the code and tests, mypy on the package; settings in setup.cfg.
lint: $(STAMP)
	$(PY) -m flake8 hessdiag tests benchmarks examples
	$(PY) -m mypy hessdiag

# The appendix, machine-checked (docs/appendix.md): analytic decomposition vs autograd, sympy proofs.
# `make test` runs the same quick battery through tests/test_check.py.
check: $(STAMP)
	$(PY) -m hessdiag check

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache
