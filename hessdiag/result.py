"""The result of a measurement: totals, per-layer norms, JSON (SPEC §5), table, plot.

For a diagonal d ∈ R^P the reported number is the normalized norm ‖d‖₂/√P, the
root-mean-square of the diagonal; per parameter tensor ("layer") ‖d_block‖₂/√P_block.
Stochastic estimators supply unbiased squared norms with intervals; exact ones report a
zero-width interval ``[x, x]``. The same holds for the residual d_res = d − d_GGN of the
GGN split (``residual_ci95``); d_GGN itself is always exact.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._version import __version__
from .estimators.base import DiagonalEstimate, NormStatistics
from .ggn import GGNSplit



def normalized_norm(diagonal: Tensor | dict[str, Tensor]) -> float:
    """‖d‖₂/√P of a diagonal given as one tensor or a dict of tensors."""
    parts = list(diagonal.values()) if isinstance(diagonal, dict) else [diagonal]
    sq = sum(float(p.double().pow(2).sum()) for p in parts)
    num = sum(p.numel() for p in parts)
    return math.sqrt(sq / num)


def _rms(sq_norm: float, num_params: int) -> float:
    """√(max(s, 0)/P): an unbiased estimate of ‖d‖² may be negative by chance."""
    return math.sqrt(max(sq_norm, 0.0) / num_params)


@dataclass
class LayerResult:
    """Normalized norm of one parameter tensor's block of the diagonal."""

    name: str
    num_params: int
    normalized_norm: float
    ci95: tuple[float, float]
    ggn_normalized_norm: float | None = None
    residual_normalized_norm: float | None = None
    residual_ci95: tuple[float, float] | None = None


def _exact_statistics(diagonal: dict[str, Tensor]) -> dict[str, NormStatistics]:
    """Squared norms per block and ``"total"`` of a known diagonal, zero-width intervals."""
    sq = {name: float(d.double().pow(2).sum()) for name, d in diagonal.items()}
    sq["total"] = sum(sq.values())
    return {k: NormStatistics(v, (v, v)) for k, v in sq.items()}


@dataclass
class Result:
    """A measurement: what the CLI prints and writes, and what the Python API returns."""

    estimator: str
    loss: str
    num_params: int
    num_examples: int
    dtype: str
    normalized_norm: float
    norm: float
    ci95: tuple[float, float]
    per_layer: list[LayerResult]
    hvps: int
    seconds: float
    samples: int | None = None
    seed: int | None = None
    naive_normalized_norm: float | None = None
    ggn_normalized_norm: float | None = None
    residual_normalized_norm: float | None = None
    residual_ci95: tuple[float, float] | None = None
    checkpoint: str | None = None
    ggn_method: str | None = None
    method: str | None = None
    selection: str | None = None
    hvp_route: str | None = None
    hvp_fallback: str | None = None
    extras: dict[str, Any] | None = None
    diagonal: dict[str, Tensor] = field(default_factory=dict, repr=False)
    ggn_diagonal: dict[str, Tensor] | None = field(default=None, repr=False)
    residual_diagonal: dict[str, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_estimate(
        cls,
        estimate: DiagonalEstimate,
        *,
        estimator: str,
        loss: str,
        num_examples: int,
        dtype: torch.dtype,
        seconds: float,
        seed: int | None = None,
        checkpoint: str | None = None,
        split: GGNSplit | None = None,
        extras: dict[str, Any] | None = None,
        selection: str | None = None,
        hvp_route: str | None = None,
        hvp_fallback: str | None = None,
    ) -> Result:
        """Assemble totals and per-layer norms from an estimator's output.

        With ``split`` (d = d_GGN + d_res, :func:`hessdiag.ggn.split_diagonal`) the GGN and
        residual normalized norms are filled in, in total and per layer. d_GGN is exact.
        The residual's norm and ``residual_ci95`` come from ``estimate.residual_statistics``
        when the estimator was stochastic (unbiased U-statistic, jackknife interval, same
        probes); for an exact estimator they are exact with a zero-width interval. A
        stochastic estimate without residual statistics (it was not given the GGN) falls
        back to the plug-in norm of d̂ − d_GGN, biased upward by the probe noise, and
        ``residual_ci95`` stays ``None``.

        ``hvp_route``: how the second-order products ran (``"func"`` or ``"autograd"``;
        ``None`` when none ran), ``hvp_fallback``: torch.func's refusal when the
        ``"auto"`` route fell back to double backward
        (:meth:`hessdiag.objective.Objective.batch_hvp`).
        """
        diag = estimate.diagonal
        stats = estimate.norm_statistics
        if stats is None:  # exact: squared norms straight from the diagonal
            stats = _exact_statistics(diag)
        sizes = {name: d.numel() for name, d in diag.items()}
        total_p = sum(sizes.values())

        def interval(s: NormStatistics, p: int) -> tuple[float, float]:
            return (_rms(s.ci95[0], p), _rms(s.ci95[1], p))

        layers = [
            LayerResult(name, sizes[name], _rms(stats[name].sq_norm, sizes[name]),
                        interval(stats[name], sizes[name]))
            for name in diag
        ]
        residual_stats = estimate.residual_statistics
        if split is not None and residual_stats is None and estimate.norm_statistics is None:
            residual_stats = _exact_statistics(split.residual)
        if split is not None:
            for layer in layers:
                layer.ggn_normalized_norm = normalized_norm(split.ggn[layer.name])
                if residual_stats is None:  # plug-in, see the docstring
                    layer.residual_normalized_norm = normalized_norm(split.residual[layer.name])
                else:
                    layer.residual_normalized_norm = _rms(residual_stats[layer.name].sq_norm,
                                                          layer.num_params)
                    layer.residual_ci95 = interval(residual_stats[layer.name], layer.num_params)
        residual_norm = residual_ci95 = None
        if split is not None and residual_stats is None:
            residual_norm = normalized_norm(split.residual)
        elif split is not None:
            residual_norm = _rms(residual_stats["total"].sq_norm, total_p)
            residual_ci95 = interval(residual_stats["total"], total_p)
        total = stats["total"]
        naive = None if total.naive_sq_norm is None else _rms(total.naive_sq_norm, total_p)
        return cls(
            estimator=estimator,
            loss=loss,
            num_params=total_p,
            num_examples=num_examples,
            dtype=str(dtype).removeprefix("torch."),
            normalized_norm=_rms(total.sq_norm, total_p),
            norm=math.sqrt(max(total.sq_norm, 0.0)),
            ci95=interval(total, total_p),
            per_layer=layers,
            hvps=estimate.hvps,
            seconds=seconds,
            samples=estimate.samples,
            seed=seed,
            naive_normalized_norm=naive,
            checkpoint=checkpoint,
            diagonal=diag,
            ggn_normalized_norm=None if split is None else normalized_norm(split.ggn),
            residual_normalized_norm=residual_norm,
            residual_ci95=residual_ci95,
            ggn_method=None if split is None else split.method,
            method=str(estimate.info["method"]) if "method" in estimate.info else None,
            selection=selection,
            hvp_route=hvp_route,
            hvp_fallback=hvp_fallback,
            ggn_diagonal=None if split is None else split.ggn,
            residual_diagonal=None if split is None else split.residual,
            extras=extras,
        )

    # -- serialization ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The result document of SPEC §5 (without the raw diagonal)."""
        doc: dict[str, Any] = {
            "hessdiag_version": __version__,
            "checkpoint": self.checkpoint,
            "estimator": self.estimator,
            "method": self.method,
            "selection": self.selection,
            "hvp_route": self.hvp_route,
            "hvp_fallback": self.hvp_fallback,
            "loss": self.loss,
            "num_params": self.num_params,
            "num_examples": self.num_examples,
            "dtype": self.dtype,
            "normalized_norm": self.normalized_norm,
            "norm": self.norm,
            "ci95": list(self.ci95),
            "naive_normalized_norm": self.naive_normalized_norm,
            "samples": self.samples,
            "hvps": self.hvps,
            "seconds": round(self.seconds, 4),
            "seed": self.seed,
            "ggn_normalized_norm": self.ggn_normalized_norm,
            "residual_normalized_norm": self.residual_normalized_norm,
            "residual_ci95": None if self.residual_ci95 is None else list(self.residual_ci95),
            "ggn_method": self.ggn_method,
            "extras": self.extras,
            "per_layer": [],
        }
        for layer in self.per_layer:
            entry = asdict(layer)
            entry["ci95"] = list(layer.ci95)
            if layer.residual_ci95 is not None:
                entry["residual_ci95"] = list(layer.residual_ci95)
            doc["per_layer"].append(entry)
        return doc

    def to_json(self, indent: int | None = 2) -> str:
        """SPEC §5 JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    # -- presentation -------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, ...]]:
        split = self.ggn_normalized_norm is not None
        # The residual's interval gets a column only where it has a width (stochastic).
        res_ci = split and self.samples is not None and self.residual_ci95 is not None
        head = ("tensor", "params", "‖d‖/√P", "95% interval") + (("GGN", "residual") if split else ())
        head += ("residual 95%",) if res_ci else ()
        rows = [head]
        entries = [(l.name, l.num_params, l.normalized_norm, l.ci95, l.ggn_normalized_norm,
                    l.residual_normalized_norm, l.residual_ci95) for l in self.per_layer]
        entries.append(("total", self.num_params, self.normalized_norm, self.ci95,
                        self.ggn_normalized_norm, self.residual_normalized_norm,
                        self.residual_ci95))
        for name, num, value, ci, ggn, res, rci in entries:
            row = (name, f"{num:,}", f"{value:.6g}", f"[{ci[0]:.6g}, {ci[1]:.6g}]")
            if split:
                row += (f"{ggn:.6g}" if ggn is not None else "-",
                        f"{res:.6g}" if res is not None else "-")
            if res_ci:
                row += (f"[{rci[0]:.6g}, {rci[1]:.6g}]" if rci is not None else "-",)
            rows.append(row)
        return rows

    def table(self) -> str:
        """Plain-text table: one row per parameter tensor, then the total."""
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for i, row in enumerate(rows):
            cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        how = f" ({self.method})" if self.method else ""
        extra = f"estimator={self.estimator}{how}  {self._route()}loss={self.loss}  " \
                f"N={self.num_examples:,}  dtype={self.dtype}  HVPs={self.hvps:,}  {self.seconds:.2f} s"
        if self.naive_normalized_norm is not None:
            extra += f"  naive={self.naive_normalized_norm:.6g}"
        chosen = [f"chosen by auto: {self.selection}"] if self.selection else []
        return "\n".join(lines + [extra] + chosen + self._extras_lines())

    def _route(self) -> str:
        """``hvp-route=func  `` (with ``(fallback)`` after a fall back), or nothing."""
        if self.hvp_route is None:
            return ""
        return f"hvp-route={self.hvp_route}{' (fallback)' if self.hvp_fallback else ''}  "

    def _extras_lines(self) -> list[str]:
        if not self.extras:
            return []
        parts = []
        if "trace" in self.extras:
            lo, hi = self.extras["trace_ci95"]
            parts.append(f"trace={self.extras['trace']:.6g} [{lo:.6g}, {hi:.6g}] "
                         f"({self.extras['trace_probes']} probes)")
            if "diagonal_sum" in self.extras:
                parts.append(f"sum(diag)={self.extras['diagonal_sum']:.6g}")
        if "top_eigenvalues" in self.extras:
            parts.append("top eigenvalues=" + ", ".join(f"{e:.6g}" for e in self.extras["top_eigenvalues"]))
        return ["  ".join(parts) + f"  ({self.extras['method']}, {self.extras['hvps']} HVPs)"]

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        rows = self._rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
        )
        return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"<p>estimator={html.escape(self.estimator)}, "
                f"{html.escape(self._route().strip())}{', ' if self.hvp_route else ''}"
                f"loss={html.escape(self.loss)}, "
                f"N={self.num_examples}, HVPs={self.hvps}</p>")

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """Per-layer bar chart of the normalized norm with 95 % intervals.

        Returns the matplotlib ``Axes``; with ``path`` also saves the figure (format from
        the extension: png, svg, pdf).
        """
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(self.per_layer) + 2), 3.5))
        names = [l.name for l in self.per_layer]
        values = [l.normalized_norm for l in self.per_layer]
        lower = [l.normalized_norm - l.ci95[0] for l in self.per_layer]
        upper = [l.ci95[1] - l.normalized_norm for l in self.per_layer]
        ax.bar(range(len(names)), values, yerr=[lower, upper], capsize=3, color="tab:blue")
        ax.axhline(self.normalized_norm, color="tab:red", ls="--",
                   label=f"total {self.normalized_norm:.4g}")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("‖diag H‖₂ / √P")
        ax.set_title(f"Hessian diagonal per tensor ({self.estimator}, {self.loss})")
        ax.legend(fontsize=8)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path)
                plt.close(fig)
        return ax
