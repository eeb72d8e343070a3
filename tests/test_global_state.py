"""No global side effects: importing hessdiag or measuring leaves the process as it was.

Warning filters, torch's default dtype, its global RNG, backend flags and matplotlib's
backend belong to the caller; hessdiag scopes whatever it needs (docs/index.md).
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hessdiag
from hessdiag.objective import default_dtype
from hessdiag.output import write_plot
from tests.models import tiny_cnn, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, **env: str) -> str:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=environ, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _global_state() -> dict:
    state = {
        "default_dtype": torch.get_default_dtype(),
        "warnings.filters": list(warnings.filters),
        "cpu_rng": torch.random.get_rng_state(),
        "num_threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "cudnn": torch.backends.cudnn.enabled,
        "sdp_math": torch.backends.cuda.math_sdp_enabled(),
        "sdp_flash": torch.backends.cuda.flash_sdp_enabled(),
        "sdp_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if "matplotlib" in sys.modules:
        import matplotlib

        state["matplotlib_backend"] = matplotlib.get_backend()
    return state


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() <= after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(value, after[key])), key
        else:
            assert value == after[key], key


def test_importing_hessdiag_adds_no_warning_filter():
    # torch (a dependency) installs filters of its own when imported: import it first.
    out = _run_python(
        "import warnings, numpy, torch\n"
        "before = list(warnings.filters)\n"
        "import hessdiag, hessdiag.cli, hessdiag.output\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "removed = [f for f in before if f not in warnings.filters]\n"
        "print(repr((added, removed)))\n")
    assert out.strip() == "([], [])"


def test_torch_jit_deprecation_is_silenced_only_inside_forward_mode_products():
    # The first jvp imports torch's forward-AD decompositions, which warn; a fresh process
    # is needed because the import (hence the warning) happens once per process.
    out = _run_python(
        "import sys, warnings, torch, hessdiag\n"
        "from tests.models import tiny_mlp\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)\n"
        "assert 'torch._decomp.decompositions_for_jvp' not in sys.modules\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    hessdiag.measure(tiny_mlp(), (x, y), estimator='hutchinson', samples=8, hvp_route='func')\n"
        "assert 'torch._decomp.decompositions_for_jvp' in sys.modules\n"
        "print(sum('torch.jit.script' in str(w.message) for w in caught))\n")
    assert out.strip() == "0"


@pytest.mark.parametrize("model, kwargs", [
    (tiny_mlp, {"estimator": "exact"}),
    (tiny_mlp, {"estimator": "hutchinson", "samples": 8, "hvp_route": "func"}),
    (tiny_mlp, {"estimator": "hutchinson", "samples": 8, "hvp_route": "autograd"}),
    (tiny_cnn, {"estimator": "backpack", "split_ggn": True}),
    (tiny_mlp, {"estimator": "exact", "extras": "trace:3,top-eig"}),
], ids=["exact", "hutchinson-func", "hutchinson-autograd", "backpack-split", "pyhessian-extras"])
def test_measure_leaves_global_state_unchanged(model, kwargs):
    if "extras" in kwargs:
        pytest.importorskip("pyhessian")
    net = model()
    shape = (10, 6) if model is tiny_mlp else (10, 1, 5, 5)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (10,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessdiag.UnresolvedEstimateWarning)
        # A first run imports what loads lazily (sympy, imported by torch, adds a warnings
        # filter of its own at import); the second one is the one checked.
        hessdiag.measure(net, (x, y), dtype="float64", **kwargs)
        torch.manual_seed(1234)
        before = _global_state()
        res = hessdiag.measure(net, (x, y), dtype="float64", **kwargs)
        after = _global_state()
    assert res.normalized_norm > 0
    _assert_same(before, after)


def test_default_dtype_is_restored_when_the_block_raises():
    previous = torch.get_default_dtype()
    with pytest.raises(RuntimeError, match="inside"):
        with default_dtype(torch.float64):
            assert torch.get_default_dtype() == torch.float64
            raise RuntimeError("inside")
    assert torch.get_default_dtype() == previous


def test_check_cases_restore_the_callers_rng():
    from hessdiag.check import battery, run_case

    torch.manual_seed(99)
    state = torch.random.get_rng_state()
    run_case(battery()[0], seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_plots_do_not_switch_the_matplotlib_backend(tmp_path):
    # A fresh process with a non-Agg backend chosen by the user (MPLBACKEND); writing
    # figures must neither switch it nor leave pyplot figures open.
    out = _run_python(
        "import sys, torch, matplotlib, hessdiag\n"
        "import matplotlib.pyplot as plt\n"
        "from hessdiag.output import write_plot\n"
        "from tests.models import tiny_mlp\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)\n"
        "res = hessdiag.measure(tiny_mlp(), (x, y), estimator='exact')\n"
        "before = matplotlib.get_backend()\n"
        f"res.plot({str(tmp_path / 'a.png')!r})\n"
        f"write_plot(res, {str(tmp_path / 'b.svg')!r})\n"
        "print(before, matplotlib.get_backend(), len(plt.get_fignums()))\n",
        MPLBACKEND="pdf")
    assert out.split() == ["pdf", "pdf", "0"]
    assert (tmp_path / "a.png").stat().st_size > 500 and (tmp_path / "b.svg").stat().st_size > 500


def test_plot_and_write_plot_keep_the_backend_in_process(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    res = hessdiag.measure(tiny_mlp(), (x, y), estimator="exact")
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    ax = res.plot(tmp_path / "p.png")
    write_plot(res, tmp_path / "p.pdf")
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
    assert [t.get_text() for t in ax.get_xticklabels()] == [layer.name for layer in res.per_layer]
    assert (tmp_path / "p.pdf").read_bytes().startswith(b"%PDF")
