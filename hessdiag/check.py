"""``hessdiag check``: the appendix's decomposition, machine-checked on small MLPs.

For every case of a battery (depth, widths, output dimension, activation, loss, batch size)
the analytic decomposition of :mod:`hessdiag.analytic` (diag H = diag GGN + residual, docs/math.md
§4.3) is compared in float64 with references computed *here*, by autograd, independently of
the recursion:

* diag(H): the diagonal of ``torch.autograd.functional.hessian`` of θ ↦ L(θ);
* diag(GGN): diag(Jᵀ Λ J), J the Jacobian of all outputs, Λ the Hessian of L in the outputs;
* residual: the Hessian of θ ↦ Σ r ⊙ f(θ) with r = ∂L/∂f frozen.

The losses are torch's own (``F.cross_entropy``, ``F.mse_loss``), so hessdiag's conventions
are checked too. Errors are normwise, max|a − b| / max|b|; a case passes when all three are
≤ :data:`TOLERANCE` and the per-neuron (diagonal-only) recursion is exact (same tolerance) on
the layers where docs/appendix.md says it must be: the output Linear and the Linears into the top two
hidden layers. Below those its per-layer error ‖approx − exact‖/‖exact‖ is reported, not
checked: it is what the approximation gets wrong. The symbolic checks of
:mod:`hessdiag.symbolic` run after the battery.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .analytic import mlp_decomposition
from .errors import HessdiagError
from .models import mlp
from .objective import Objective

TOLERANCE = 1e-10
"""Normwise relative error allowed for exact quantities: both sides are float64 routes to the
same number (rounding is O(1e-15); docs/appendix.md saw ≤ 5e-12), while any wrong term is O(1)."""

#: label → activation spec: the paper's RCT-AF at ψ_max = 7 and the smooth baselines.
ACTIVATIONS: dict[str, str] = {
    "rct0": "rct:n=0,alpha=28",
    "rct1": "rct:n=1,alpha=14",
    "rct2": "rct:n=2,alpha=7",
    "silu": "silu",
    "gelu": "gelu",
    "softplus": "softplus",
    "tanh": "tanh",
}
#: depth (hidden layers) → widths, input dimension 5.
ARCHITECTURES: dict[int, tuple[int, ...]] = {
    1: (6,), 2: (5, 4), 3: (4, 5, 3), 4: (3, 4, 3, 4), 5: (4, 3, 4, 3, 4),
}
IN_FEATURES = 5
LOSSES_OUTPUTS: tuple[tuple[str, int], ...] = (("mse", 1), ("mse", 3), ("ce", 3))
BATCH_SIZES: tuple[int, ...] = (1, 5)


class CheckSelectionError(HessdiagError):
    """The battery filters select nothing or name unknown entries."""


@dataclass(frozen=True)
class Case:
    """One network/loss/batch configuration of the battery."""

    depth: int
    outputs: int
    activation: str  # a label of ACTIVATIONS or a registry spec
    loss: str
    batch: int

    @property
    def label(self) -> str:
        widths = "-".join(str(w) for w in (IN_FEATURES, *ARCHITECTURES[self.depth], self.outputs))
        return f"{widths} {self.activation} {self.loss} B={self.batch}"


@dataclass
class CaseResult:
    """Errors of one case; ``per_neuron`` holds the per-Linear error of the approximation."""

    case: Case
    num_params: int
    diag_error: float
    ggn_error: float
    residual_error: float
    per_neuron: list[float]
    per_neuron_exact_error: float  # worst error on the layers where it must be exact
    seconds: float

    @property
    def passed(self) -> bool:
        errs = (self.diag_error, self.ggn_error, self.residual_error, self.per_neuron_exact_error)
        return all(e <= TOLERANCE for e in errs)


def battery(
    *,
    full: bool = False,
    activations: Sequence[str] | None = None,
    losses: Sequence[str] | None = None,
    depths: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> list[Case]:
    """The cases to run. ``full``: every combination (210); otherwise a quick covering set.

    The quick set runs every activation, depth 1–5, both losses, output dimensions 1 and 3
    and batch sizes 1 and 5 at least once each (14 cases), chosen by rotating through the
    lists. Filters restrict either set; activations may be labels or registry specs.
    """
    acts = list(activations) if activations else list(ACTIVATIONS)
    for a in acts:
        if a not in ACTIVATIONS:
            from .activations import get_activation

            get_activation(a)  # raises a HessdiagError naming the bad spec
    for d in depths or ():
        if d not in ARCHITECTURES:
            raise CheckSelectionError(f"depth {d} not in the battery (choose from 1-5)")
    for loss in losses or ():
        if loss not in {name for name, _ in LOSSES_OUTPUTS}:
            raise CheckSelectionError(f"unknown loss {loss!r}; choose ce or mse")
    deps = list(depths) if depths else list(ARCHITECTURES)
    batches = list(batch_sizes) if batch_sizes else list(BATCH_SIZES)
    loss_outs = [lo for lo in LOSSES_OUTPUTS if not losses or lo[0] in losses]
    if full:
        cases = [Case(d, c, a, loss, b)
                 for a, d, (loss, c), b in itertools.product(acts, deps, loss_outs, batches)]
    else:
        width = max(len(acts), len(deps), len(loss_outs), len(batches)) * 2
        cases = []
        for i in range(width):
            # Offsets make the rotation visit many combinations, not one diagonal.
            loss, c = loss_outs[(i + i // len(acts)) % len(loss_outs)]
            cases.append(Case(deps[(i + i // len(acts)) % len(deps)], c, acts[i % len(acts)],
                              loss, batches[(i // 2 + i) % len(batches)]))
        cases = list(dict.fromkeys(cases))
    if not cases:
        raise CheckSelectionError("the filters select no case")
    return cases


# -- independent autograd references -----------------------------------------------------------


def _torch_loss(loss: str, out: Tensor, y: Tensor) -> Tensor:
    if loss == "ce":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def autograd_references(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat float64 (diag H, diag GGN, residual diagonal) by autograd, nothing shared with analytic."""
    net = copy.deepcopy(model).double().eval()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs(t: Tensor) -> Tensor:
        params = {n: v.reshape(s) for n, v, s in zip(names, t.split(sizes), shapes)}
        return functional_call(net, params, (x,))

    hess = torch.autograd.functional.hessian(lambda t: _torch_loss(loss, outputs(t), y), theta,
                                             vectorize=True)
    out = outputs(theta).detach()
    jac = torch.autograd.functional.jacobian(outputs, theta, vectorize=True).reshape(out.numel(), -1)
    lam = torch.autograd.functional.hessian(
        lambda o: _torch_loss(loss, o.reshape(out.shape), y), out.reshape(-1), vectorize=True)
    ggn = ((jac.T @ lam) * jac.T).sum(1)
    leaf = out.clone().requires_grad_(True)
    (r,) = torch.autograd.grad(_torch_loss(loss, leaf, y), leaf)
    res = torch.autograd.functional.hessian(lambda t: (r * outputs(t)).sum(), theta, vectorize=True)
    return hess.diagonal(), ggn, res.diagonal()


def _relative(a: Tensor, b: Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def run_case(case: Case, seed: int = 0) -> CaseResult:
    """Build the case's network and data (seeded), run the analytic decomposition, compare."""
    start = time.perf_counter()
    spec = ACTIVATIONS.get(case.activation, case.activation)
    with torch.random.fork_rng(devices=[]):  # seeded initialization; the caller's RNG is restored
        torch.default_generator.manual_seed(seed)
        model = mlp(IN_FEATURES, ARCHITECTURES[case.depth], case.outputs, spec).double()
    g = torch.Generator().manual_seed(seed + 1)
    # Inputs of scale 1.5 put pre-activations across the curved region of every activation.
    x = 1.5 * torch.randn(case.batch, IN_FEATURES, generator=g, dtype=torch.float64)
    if case.loss == "ce":
        y = torch.randint(0, case.outputs, (case.batch,), generator=g)
    else:
        y = torch.randn(case.batch, case.outputs, generator=g, dtype=torch.float64)
    dec = mlp_decomposition(Objective(model, (x, y), case.loss, dtype=torch.float64),
                            per_neuron=True)
    ref_diag, ref_ggn, ref_res = autograd_references(model, case.loss, x, y)

    def cat(d: dict[str, Tensor]) -> Tensor:
        return torch.cat([v.reshape(-1) for v in d.values()])

    exact, approx = dec.diagonal, dec.per_neuron_diagonal
    assert approx is not None
    linears = [m for m in model if isinstance(m, nn.Linear)]
    names = list(exact)
    per_layer, must_be_exact = [], 0.0
    num = len(linears)
    for index in range(num):
        keys = [k for k in names if k.split(".")[0] == str(list(model).index(linears[index]))]
        a = torch.cat([approx[k].reshape(-1) for k in keys])
        e = torch.cat([exact[k].reshape(-1) for k in keys])
        per_layer.append(float((a - e).norm() / e.norm()))
        if index >= num - 3:  # the output Linear and the Linears into hidden layers L-1, L-2
            must_be_exact = max(must_be_exact, _relative(a, e))
    return CaseResult(
        case=case,
        num_params=sum(p.numel() for p in model.parameters()),
        diag_error=_relative(cat(exact), ref_diag),
        ggn_error=_relative(cat(dec.ggn), ref_ggn),
        residual_error=_relative(cat(dec.residual), ref_res),
        per_neuron=per_layer,
        per_neuron_exact_error=must_be_exact,
        seconds=time.perf_counter() - start,
    )


# -- report -------------------------------------------------------------------------------------


def _fmt_err(e: float) -> str:
    return f"{e:.1e}"


def _fmt_pct(e: float) -> str:
    return "0" if e < 1e-12 else f"{100 * e:.1f}%"


def format_table(results: Sequence[CaseResult]) -> str:
    """One row per case: errors of diag H, GGN, residual; per-Linear per-neuron error; status."""
    head = ("case", "P", "diag H", "GGN", "residual", "per-neuron error by Linear 1..L", "ok")
    rows = [head]
    for r in results:
        rows.append((r.case.label, str(r.num_params), _fmt_err(r.diag_error), _fmt_err(r.ggn_error),
                     _fmt_err(r.residual_error), " ".join(_fmt_pct(e) for e in r.per_neuron),
                     "ok" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j in (0, 5) else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class CheckReport:
    """All results of one ``hessdiag check`` run."""

    results: list[CaseResult]
    symbolic: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, passed, detail)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results) and all(ok for _, ok, _ in self.symbolic)

    def summary(self) -> str:
        """Worst errors over the battery and, per depth, the worst per-neuron per-layer error."""
        worst = {key: max(getattr(r, key) for r in self.results)
                 for key in ("diag_error", "ggn_error", "residual_error", "per_neuron_exact_error")}
        lines = [f"{len(self.results)} cases, tolerance {TOLERANCE:.0e} (normwise relative, float64)",
                 f"worst error: diag H {worst['diag_error']:.1e}, GGN {worst['ggn_error']:.1e}, "
                 f"residual {worst['residual_error']:.1e}, per-neuron where exact "
                 f"{worst['per_neuron_exact_error']:.1e}"]
        by_depth: dict[int, list[float]] = {}
        for r in self.results:
            by_depth.setdefault(r.case.depth, []).extend(r.per_neuron)
        parts = [f"{d} hidden: max {_fmt_pct(max(v))}" for d, v in sorted(by_depth.items())]
        lines.append("per-neuron approximation, worst per-layer error: " + "; ".join(parts))
        return "\n".join(lines)


def run_check(
    cases: Sequence[Case],
    *,
    symbolic: bool = True,
    seed: int = 0,
    echo: Callable[[str], None] | None = print,
) -> CheckReport:
    """Run the battery (and the symbolic checks); print the table and summary through ``echo``."""
    results = [run_case(case, seed) for case in cases]
    report = CheckReport(results)
    if echo:
        echo(format_table(results))
        echo("")
        echo(report.summary())
    if symbolic:
        from .symbolic import run_symbolic_checks

        if echo:
            echo("")
            echo("symbolic checks (sympy, generic φ):")
        for name, ok, detail, seconds in run_symbolic_checks():
            report.symbolic.append((name, ok, detail))
            if echo:
                echo(f"  {'ok  ' if ok else 'FAIL'}  {name}: {detail} ({seconds:.1f} s)")
    if echo:
        echo("")
        echo("check passed" if report.passed else "check FAILED")
    return report
