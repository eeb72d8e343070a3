r"""Symbolic (sympy) derivations and checks behind docs/index.md ("Activations") and docs/appendix.md.

* **RCT-AF.** :func:`rct_derived` derives f_n, f_n', f_n'' from the definition
  f_0 = log(1 + e^{αx})/α, f_{n+1} = x f_n'; :func:`check_rct_closed_forms` proves that the
  closed forms of docs/index.md, "Activations" (in s = σ(u), q = s(1−s), t = 1−2s, w = 1−6q, u = αx) equal them,
  by reducing the difference to a rational function of E = e^{αx} that cancels to 0.
* **ψ_max.** :func:`psi_coefficients` gives g_n''(0) = 2^n/4 exactly (1/4, 1/2, 1);
  :func:`prove_max_at_zero` proves that 0 is the global maximum of g_0'' and g_1'';
  :func:`numerical_max_n2` checks n = 2 numerically (all roots of g_2''' on [0, 40]; docs/index.md, "Activations").
* **Tiny networks with a generic φ.** φ is an undefined function whose derivatives φ', φ'', …
  are again undefined functions (:class:`Phi`, :class:`DPhi`, :class:`D2Phi`), so Hessian
  entries come out as polynomials in the symbols φ(z), φ'(z), φ''(z), the weights and the
  data. :func:`check_network` compares every diagonal entry of the exact Hessian (sympy
  ``diff`` twice) with GN + the backward recursion of docs/appendix.md (full M, or the per-neuron
  diagonal-only M of §4.5); :func:`check_affine_in_phi2` checks the §4.6 property.

:func:`run_symbolic_checks` runs them all (each within seconds) for ``hessdiag check``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sympy as sp

__all__ = [
    "NetworkCheck",
    "check_affine_in_phi2",
    "check_network",
    "check_rct_closed_forms",
    "numerical_max_n2",
    "prove_max_at_zero",
    "psi_coefficients",
    "rct_closed",
    "rct_derived",
    "run_symbolic_checks",
]

X = sp.Symbol("x", real=True)
ALPHA = sp.Symbol("alpha", positive=True)
U = sp.Symbol("u", real=True)
E = sp.Symbol("E", positive=True)  # e^{αx} (or e^u)


# --------------------------------------------------------------------------------------------
# RCT-AF
# --------------------------------------------------------------------------------------------


def rct_derived(n: int) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """(f_n, f_n', f_n'') in x and α, derived from f_0 = log(1 + e^{αx})/α and f_{k+1} = x f_k'."""
    f = sp.log(1 + sp.exp(ALPHA * X)) / ALPHA
    for _ in range(n):
        f = X * sp.diff(f, X)
    return f, sp.diff(f, X), sp.diff(f, X, 2)


def rct_closed(n: int) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """The closed forms of docs/index.md, "Activations" with s, q, t, w written in E = e^{αx} (u = αx)."""
    u = ALPHA * X
    s = E / (1 + E)
    q = E / (1 + E) ** 2
    t = (1 - E) / (1 + E)
    w = 1 - 6 * q
    if n == 0:
        return sp.log(1 + E) / ALPHA, s, ALPHA * q
    if n == 1:
        return X * s, s + u * q, ALPHA * q * (2 + u * t)
    if n == 2:
        return X * (s + u * q), s + q * (3 * u + u**2 * t), ALPHA * q * (4 + 5 * u * t + u**2 * w)
    raise ValueError(f"RCT-AF order must be 0, 1 or 2, got {n}")


def _in_e(expr: sp.Expr) -> sp.Expr:
    return expr.subs(sp.exp(ALPHA * X), E)


def check_rct_closed_forms() -> dict[tuple[int, int], bool]:
    """{(n, order): derived − closed cancels to 0} for n = 0, 1, 2 and orders 0, 1, 2."""
    out = {}
    for n in range(3):
        for order, (derived, closed) in enumerate(zip(rct_derived(n), rct_closed(n))):
            difference = _in_e(derived) - closed
            out[(n, order)] = sp.cancel(sp.together(sp.expand_log(difference, force=True))) == 0
    return out


def rct_numeric(n: int, order: int) -> Callable[[float, float], float]:
    """mpmath evaluator (x, α) ↦ f_n^{(order)}(x) of the *derived* expression (any precision)."""
    return sp.lambdify((X, ALPHA), rct_derived(n)[order], "mpmath")


# --------------------------------------------------------------------------------------------
# ψ_max
# --------------------------------------------------------------------------------------------


def g_derivatives(n: int) -> tuple[sp.Expr, sp.Expr]:
    """(g_n'', g_n''') in u, with g_n = (u d/du)^n softplus(u)."""
    g = sp.log(1 + sp.exp(U))
    for _ in range(n):
        g = U * sp.diff(g, U)
    return sp.diff(g, U, 2), sp.diff(g, U, 3)


def psi_coefficients() -> dict[int, sp.Expr]:
    """c_n = g_n''(0) exactly: {0: 1/4, 1: 1/2, 2: 1} (= 2^n/4, since (u g')''(0) = 2 g''(0))."""
    return {n: sp.nsimplify(sp.simplify(g_derivatives(n)[0].subs(U, 0))) for n in range(3)}


def prove_max_at_zero() -> dict[int, bool]:
    """Symbolic proof steps that g_n''(u) ≤ g_n''(0), equality only at u = 0, for n = 0, 1.

    n = 0: g_0'' = q = E/(1+E)² with E = e^u, and 1/4 − q = ((E−1)/(2(E+1)))² ≥ 0, zero iff
    E = 1, i.e. u = 0.
    n = 1: g_1'' = q (2 + u t), t = (1−E)/(1+E) = −tanh(u/2); g_1'' is even, and for v = |u| ≥ 0
    the term u t = −v tanh(v/2) ≤ 0 (sympy's sign inference), so g_1'' ≤ 2q ≤ 1/2, with
    equality only where u t = 0 and q = 1/4, i.e. u = 0.
    """
    q = E / (1 + E) ** 2
    t = (1 - E) / (1 + E)
    g0, _ = g_derivatives(0)
    g1, _ = g_derivatives(1)
    v = sp.Symbol("v", nonnegative=True)
    n0 = (
        sp.cancel(g0.subs(sp.exp(U), E) - q) == 0
        and sp.cancel(sp.Rational(1, 4) - q - ((E - 1) / (2 * (E + 1))) ** 2) == 0
        and bool(q.is_positive)
    )
    g1_e = g1.subs(sp.exp(U), E)
    n1 = (
        sp.cancel(g1_e - q * (2 + U * t)) == 0
        # even: u → −u maps E → 1/E
        and sp.cancel(g1_e - g1_e.subs({U: -U, E: 1 / E}, simultaneous=True)) == 0
        and sp.simplify((U * t).subs(E, sp.exp(U)) + U * sp.tanh(U / 2)).rewrite(sp.exp).simplify() == 0
        and bool((-v * sp.tanh(v / 2)).is_nonpositive)
        and sp.cancel(sp.Rational(1, 2) - 2 * q - 2 * ((E - 1) / (2 * (E + 1))) ** 2) == 0
    )
    return {0: bool(n0), 1: bool(n1)}


def numerical_max_n2(digits: int = 30, bound: float = 40.0, step: float = 1e-3) -> dict[str, Any]:
    """All critical points of the even g_2'' on [0, bound] and where the maximum sits.

    g_2''' = q·B(u) with B = 9t + 7uw + u²t(1 − 12q) (docs/index.md, "Activations"; the identity is checked
    symbolically here) and q > 0, so the critical points are the roots of B: sign changes on a
    float64 grid (B has no cancellation), each refined by mpmath ``findroot`` at ``digits``.
    A numerical statement: g_2'' is negligible beyond the bound (docs/index.md, "Activations").
    """
    import mpmath
    import numpy as np

    g2, g3 = g_derivatives(2)
    q = E / (1 + E) ** 2
    t = (1 - E) / (1 + E)
    bracket = 9 * t + 7 * U * (1 - 6 * q) + U**2 * t * (1 - 12 * q)
    if sp.cancel(g3.subs(sp.exp(U), E) - q * bracket) != 0:
        raise AssertionError("g_2''' != q B(u)")
    grid = np.arange(0.0, bound, step) + step / 2
    s = 1.0 / (1.0 + np.exp(-grid))
    qn, tn = s * (1.0 - s), -np.tanh(grid / 2)
    values = 9 * tn + 7 * grid * (1 - 6 * qn) + grid**2 * tn * (1 - 12 * qn)
    changes = np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0)
    f2 = sp.lambdify(U, g2, "mpmath")
    fb = sp.lambdify(U, bracket.subs(E, sp.exp(U)), "mpmath")
    points = [(0.0, float(f2(mpmath.mpf(0))))]
    with mpmath.workdps(digits):
        for k in changes:
            root = mpmath.findroot(fb, (mpmath.mpf(grid[k]), mpmath.mpf(grid[k + 1])), solver="anderson")
            points.append((float(root), float(f2(root))))
    best = max(points, key=lambda p: p[1])
    return {"critical_points": points, "argmax": best[0], "max": best[1]}


# --------------------------------------------------------------------------------------------
# Tiny networks with a generic activation
# --------------------------------------------------------------------------------------------


class D3Phi(sp.Function):
    """φ''' of the generic activation (never needed beyond the Hessian, kept for closure)."""


class D2Phi(sp.Function):
    """φ'' of the generic activation."""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return D3Phi(self.args[0])


class DPhi(sp.Function):
    """φ' of the generic activation."""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return D2Phi(self.args[0])


class Phi(sp.Function):
    """A generic activation φ whose derivatives are the undefined functions DPhi, D2Phi."""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return DPhi(self.args[0])


def _loss_function_classes() -> tuple[type, dict[int, type], dict[tuple[int, int], type]]:
    """A generic two-argument loss ℓ(f1, f2) with symmetric undefined second derivatives."""
    second = {(i, j): type(f"Ell{min(i, j)}{max(i, j)}", (sp.Function,), {})
              for i in (1, 2) for j in (1, 2) if i <= j}
    second[(2, 1)] = second[(1, 2)]

    def make_first(i: int) -> type:
        return type(f"Ell{i}", (sp.Function,),
                    {"fdiff": lambda self, argindex=1: second[(i, argindex)](*self.args)})

    first = {i: make_first(i) for i in (1, 2)}
    ell = type("Ell", (sp.Function,), {"fdiff": lambda self, argindex=1: first[argindex](*self.args)})
    return ell, first, second


_EXACT_CACHE: dict[tuple[tuple[int, ...], str], dict[str, sp.Expr]] = {}


@dataclass
class NetworkCheck:
    """Result of :func:`check_network`: which diagonal entries match (by parameter name)."""

    sizes: tuple[int, ...]
    loss: str
    per_neuron: bool
    matches: dict[str, bool]
    exact: dict[str, sp.Expr]  # the exact Hessian diagonal, as polynomials in the symbols
    phi2_symbols: tuple[sp.Symbol, ...]
    gauss_newton: dict[str, sp.Expr]

    @property
    def failures(self) -> list[str]:
        return [name for name, ok in self.matches.items() if not ok]


def check_network(sizes: Sequence[int], loss: str = "squared", per_neuron: bool = False) -> NetworkCheck:
    """Exact diag(H) (sympy diff) versus GN + the docs/appendix.md recursion on an MLP of ``sizes``.

    ``loss``: ``"squared"`` (½(f − y)², scalar output) or ``"generic"`` (ℓ(f_1, f_2), two
    outputs, an undefined function). ``per_neuron``: use the diagonal-only M of docs/appendix.md
    One example; the batch mean is an average of such terms.
    """
    sizes = tuple(sizes)
    depth = len(sizes) - 1
    x = sp.Matrix(sp.symbols(f"x1:{sizes[0] + 1}", real=True))
    weights: list[sp.Matrix] = []
    biases: list[sp.Matrix] = []
    params: list[tuple[str, sp.Symbol, int, int, int | None]] = []
    for l in range(1, depth + 1):
        w = sp.Matrix(sizes[l], sizes[l - 1], lambda i, j: sp.Symbol(f"W{l}_{i + 1}{j + 1}", real=True))
        b = sp.Matrix(sp.symbols(f"b{l}_1:{sizes[l] + 1}", real=True))
        weights.append(w)
        biases.append(b)
        params += [(f"W{l}_{i + 1}{j + 1}", w[i, j], l, i, j) for i in range(sizes[l])
                   for j in range(sizes[l - 1])]
        params += [(f"b{l}_{i + 1}", b[i], l, i, None) for i in range(sizes[l])]
    # Forward with composite expressions, and the symbols that stand for φ(z), φ'(z), φ''(z).
    replace: dict[sp.Expr, sp.Symbol] = {}
    a_sym, d_sym, p_sym = [x], [], []
    a = x
    for l in range(1, depth + 1):
        z = weights[l - 1] * a + biases[l - 1]
        if l == depth:
            f = z
            break
        n = sizes[l]
        av = sp.Matrix(sp.symbols(f"a{l}_1:{n + 1}", real=True))
        dv = sp.Matrix(sp.symbols(f"d{l}_1:{n + 1}", real=True))
        pv = sp.Matrix(sp.symbols(f"p{l}_1:{n + 1}", real=True))
        for i in range(n):
            replace[Phi(z[i])] = av[i]
            replace[DPhi(z[i])] = dv[i]
            replace[D2Phi(z[i])] = pv[i]
        a_sym.append(av)
        d_sym.append(dv)
        p_sym.append(pv)
        a = z.applyfunc(Phi)
    f_sym = weights[-1] * a_sym[-1] + biases[-1]
    # Loss and its derivatives in the output.
    if loss == "squared":
        if sizes[-1] != 1:
            raise ValueError("the squared loss here is for scalar output")
        y = sp.Symbol("y", real=True)
        value = (f[0] - y) ** 2 / 2
        r = sp.Matrix([f_sym[0] - y])
        lam = sp.Matrix([[1]])
    elif loss == "generic":
        if sizes[-1] != 2:
            raise ValueError("the generic loss here takes two outputs")
        ell, first, second = _loss_function_classes()
        value = ell(f[0], f[1])
        lsym = {k: sp.Symbol(f"l{k}", real=True) for k in ("1", "2", "11", "12", "22")}
        replace[first[1](f[0], f[1])] = lsym["1"]
        replace[first[2](f[0], f[1])] = lsym["2"]
        replace[second[(1, 1)](f[0], f[1])] = lsym["11"]
        replace[second[(1, 2)](f[0], f[1])] = lsym["12"]
        replace[second[(2, 2)](f[0], f[1])] = lsym["22"]
        r = sp.Matrix([lsym["1"], lsym["2"]])
        lam = sp.Matrix([[lsym["11"], lsym["12"]], [lsym["12"], lsym["22"]]])
    else:
        raise ValueError(f"unknown loss {loss!r}")
    # The recursion, in the symbols: δ, M (full or diagonal-only) and the GGN columns Δ.
    delta = r
    m = sp.zeros(sizes[-1], sizes[-1])
    columns = sp.eye(sizes[-1])  # Δ^{L,c} = e_c
    ms, cols = {depth: m}, {depth: columns}
    for l in range(depth - 1, 0, -1):
        w = weights[l]  # W^{l+1}
        d, p = d_sym[l - 1], p_sym[l - 1]
        g = w.T * delta
        dd = sp.diag(*d)
        carried = w.T * m * w
        if per_neuron:
            carried = sp.diag(*[sum(w[k, i] ** 2 * m[k, k] for k in range(w.shape[0]))
                                for i in range(w.shape[1])])
        m = dd * carried * dd + sp.diag(*[p[i] * g[i] for i in range(len(g))])
        delta = dd * g
        columns = dd * (w.T * columns)
        ms[l], cols[l] = m, columns
    matches, gauss = {}, {}
    exact = _EXACT_CACHE.setdefault((sizes, loss), {})  # symbols rebuild identically per call
    for name, symbol, l, i, j in params:
        c = 1 if j is None else a_sym[l - 1][j]
        row = cols[l][i, :]
        ggn = c**2 * (row * lam * row.T)[0, 0]
        predicted = ggn + c**2 * ms[l][i, i]
        if name not in exact:
            entry = value.diff(symbol).diff(symbol).xreplace(replace)  # diff(·, s, 2): 10× slower
            exact[name] = sp.expand(entry.subs(dict(zip(f, f_sym))) if loss == "squared" else entry)
        entry = exact[name]
        gauss[name] = sp.expand(ggn)
        matches[name] = sp.expand(entry - predicted) == 0
    phi2 = tuple(s for pv in p_sym for s in pv)
    return NetworkCheck(sizes, loss, per_neuron, matches, exact, phi2, gauss)


def check_affine_in_phi2(check: NetworkCheck) -> dict[str, tuple[int, bool]]:
    """Per entry: (total degree in the φ'' symbols, φ''-free part == the Gauss–Newton term)."""
    out = {}
    zero = {s: 0 for s in check.phi2_symbols}
    for name, entry in check.exact.items():
        degree = sp.Poly(entry, *check.phi2_symbols).total_degree() if check.phi2_symbols else 0
        free = sp.expand(entry.xreplace(zero) - check.gauss_newton[name]) == 0
        out[name] = (degree, free)
    return out


# --------------------------------------------------------------------------------------------
# The battery for `hessdiag check`
# --------------------------------------------------------------------------------------------


def _rct_numeric_agreement() -> float:
    """Max relative error of hessdiag.activations' float64 closed forms against the derived
    expressions evaluated at 30 digits, at sample points across the curved region."""
    import mpmath
    import torch

    from .activations import rct_af_derivative

    worst = 0.0
    points = [-3.0, -1.1, -0.37, -0.05, 0.0, 0.02, 0.3, 0.9, 2.5]
    with mpmath.workdps(30):
        for n, alpha in ((0, 28.0), (1, 14.0), (2, 7.0), (1, 1.0)):
            for order in range(3):
                fn = rct_numeric(n, order)
                xs = torch.tensor(points, dtype=torch.float64)
                got = rct_af_derivative(xs, n, alpha, order)
                for xv, gv in zip(points, got.tolist()):
                    ref = fn(mpmath.mpf(xv), mpmath.mpf(alpha))
                    scale = max(abs(float(ref)), alpha ** (order - 1) * 1e-3 if order else 1e-3)
                    worst = max(worst, abs(gv - float(ref)) / scale)
    return worst


def run_symbolic_checks() -> list[tuple[str, bool, str, float]]:
    """Every symbolic check: (name, passed, detail, seconds)."""
    results: list[tuple[str, bool, str, float]] = []

    def timed(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        start = time.perf_counter()
        ok, detail = fn()
        results.append((name, ok, detail, time.perf_counter() - start))

    def closed_forms() -> tuple[bool, str]:
        proven = check_rct_closed_forms()
        err = _rct_numeric_agreement()
        ok = all(proven.values()) and err < 1e-12
        return ok, (f"{sum(proven.values())}/9 closed forms = derived (difference cancels to 0); "
                    f"hessdiag.activations vs 30-digit values: max rel. error {err:.1e}")

    def psi() -> tuple[bool, str]:
        coeffs = psi_coefficients()
        proofs = prove_max_at_zero()
        n2 = numerical_max_n2()
        ok = (coeffs == {0: sp.Rational(1, 4), 1: sp.Rational(1, 2), 2: sp.Integer(1)}
              and all(proofs.values()) and n2["argmax"] == 0.0 and abs(n2["max"] - 1.0) < 1e-15)
        others = ", ".join(f"{v:+.7f} at u={u:.6f}" for u, v in n2["critical_points"][1:])
        return ok, (f"g_n''(0) = {coeffs[0]}, {coeffs[1]}, {coeffs[2]}; max at 0 proved for n=0,1: "
                    f"{proofs[0] and proofs[1]}; n=2 (numerical, u in [0,40]): max at 0, other "
                    f"extrema {others}")

    def shallow() -> tuple[bool, str]:
        c = check_network((2, 2, 1), "squared")
        exact = len(c.matches) - len(c.failures)
        return not c.failures, f"exact − (GN + recursion) = 0 for {exact}/{len(c.matches)} entries"

    def deep() -> tuple[bool, str]:
        full = check_network((1, 2, 2, 2, 1), "squared")
        diag = check_network((1, 2, 2, 2, 1), "squared", per_neuron=True)
        ok = not full.failures and sorted(diag.failures) == ["W1_11", "W1_21", "b1_1", "b1_2"]
        return ok, (f"full M: {len(full.matches) - len(full.failures)}/{len(full.matches)} exact; "
                    f"diagonal-only M fails on {len(diag.failures)} ({', '.join(diag.failures)}), "
                    "as docs/appendix.md says")

    def generic() -> tuple[bool, str]:
        c = check_network((2, 2, 2), "generic")
        return not c.failures, (f"J^T l'' J + sum_c l_c d2f_c = recursion from delta^L = grad l for "
                                f"{len(c.matches) - len(c.failures)}/{len(c.matches)} entries")

    def affine() -> tuple[bool, str]:
        c = check_network((1, 2, 2, 2, 1), "squared")
        props = check_affine_in_phi2(c)
        degrees = sorted({d for d, _ in props.values()})
        ok = all(d <= 1 and free for d, free in props.values()) and degrees == [0, 1]
        return ok, (f"degree in the phi'' values: {degrees} over {len(props)} entries (0 = output layer); "
                    f"phi''-free part = (d f/d theta)^2 for all: {all(f for _, f in props.values())}")

    timed("RCT-AF f, f', f'' from f0 = log(1+e^(ax))/a, f_(n+1) = x f_n'", closed_forms)
    timed("psi_max = c_n alpha, c_n = 1/4, 1/2, 1", psi)
    timed("2-2-1, squared loss", shallow)
    timed("1-2-2-2-1, squared loss: full vs diagonal-only recursion", deep)
    timed("2-2-2, generic loss l(f1, f2)", generic)
    timed("affine in phi'' (1-2-2-2-1)", affine)
    return results
