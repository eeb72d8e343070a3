"""Result files: the JSON document, the per-layer figure and the diagonal, written atomically.

Output paths are checked *before* measuring (an unknown plot format or an unwritable
folder fails in one line without wasting a run); files are written only after success,
through a temporary file and a rename, so an existing file is either left intact or
replaced by a complete new one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from ._version import __version__
from .errors import HessdiagError
from .io.files import atomic_write_bytes, atomic_write_text
from .result import Result

PLOT_FORMATS = ("png", "svg", "pdf")


class OutputError(HessdiagError):
    """An output path that cannot be written, or a plot format that is not supported."""


def plot_format(path: str | os.PathLike[str]) -> str:
    """The figure format from the file extension (png, svg or pdf)."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise OutputError(f"--plot {path}: unknown figure format {fmt or '(no extension)'!r}; "
                          f"use one of .{', .'.join(PLOT_FORMATS)}")
    return fmt


def check_output_path(path: str | os.PathLike[str], flag: str) -> None:
    """``path`` names a file (not a folder) whose nearest existing ancestor is a writable folder."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{flag} {path} is a directory")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {parent} (permission denied)")


DIAGONAL_SUFFIX = ".safetensors"


def check_outputs(json_path: str | None = None, plot_path: str | None = None,
                  diagonal_path: str | None = None) -> None:
    """All output checks that can run before measuring."""
    if json_path:
        check_output_path(json_path, "--json")
    if plot_path:
        plot_format(plot_path)
        check_output_path(plot_path, "--plot")
    if diagonal_path:
        if Path(diagonal_path).suffix.lower() != DIAGONAL_SUFFIX:
            raise OutputError(f"--save-diagonal {diagonal_path}: the file must end in {DIAGONAL_SUFFIX}")
        check_output_path(diagonal_path, "--save-diagonal")


def write_json(result: Result, path: str | os.PathLike[str]) -> None:
    """The result document (docs/index.md, "Result document"), atomically."""
    try:
        atomic_write_text(path, result.to_json() + "\n")
    except OSError as err:
        raise OutputError(f"cannot write --json {path}: {err.strerror or err}") from None


def write_plot(result: Result, path: str | os.PathLike[str]) -> None:
    """The per-layer figure (format from the extension), rendered with Agg, atomically.

    The figure has its own Agg canvas (:meth:`Result.figure`): matplotlib's backend and
    pyplot's open figures are left as they were.
    """
    fmt = plot_format(path)
    buffer = io.BytesIO()
    result.figure().savefig(buffer, format=fmt)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:
        raise OutputError(f"cannot write --plot {path}: {err.strerror or err}") from None


def diagonal_metadata(result: Result) -> dict[str, str]:
    """What a saved diagonal records besides its tensors (safetensors metadata: strings).

    ``format`` (``hessdiag.diagonal``), ``hessdiag_version``, ``estimator``, ``method``,
    ``loss``, ``dtype``, ``num_params``, ``num_examples``, ``normalized_norm`` and ``ci95``,
    ``resolved``, ``seed``, ``params`` (the selection, ``null`` for the default),
    ``checkpoint`` and ``names``, the tensors in ``named_parameters()`` order (a
    safetensors file keeps them sorted by name); numbers, lists and ``null`` are JSON text
    (``json.loads`` reads each).
    """
    values: dict[str, object] = {
        "format": "hessdiag.diagonal",
        "hessdiag_version": __version__,
        "estimator": result.estimator,
        "method": result.method,
        "loss": result.loss,
        "dtype": result.dtype,
        "num_params": result.num_params,
        "num_examples": result.num_examples,
        "normalized_norm": result.normalized_norm,
        "ci95": list(result.ci95),
        "resolved": result.resolved,
        "seed": result.seed,
        "params": result.params,
        "checkpoint": result.checkpoint,
        "names": None if result.diagonal is None else list(result.diagonal),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def diagonal_bytes(result: Result) -> bytes:
    """The diagonal as a safetensors file: one tensor per parameter name, ``[*shape]``, in
    the compute dtype (the precision the estimate has), on the CPU, with
    :func:`diagonal_metadata`.

    Raises:
        OutputError: the result holds no diagonal (measured without ``keep_diagonal=True``).
    """
    from safetensors.torch import save

    if result.diagonal is None:
        raise OutputError("the result holds no diagonal: measure with keep_diagonal=True")
    # One contiguous CPU copy per tensor: safetensors refuses tensors that share storage,
    # and an estimator's blocks are often views of one flat vector.
    tensors = {name: block.detach().to("cpu", copy=True).contiguous()
               for name, block in result.diagonal.items()}
    return save(tensors, metadata=diagonal_metadata(result))


def write_diagonal(result: Result, path: str | os.PathLike[str]) -> None:
    """The diagonal as a ``.safetensors`` file (:func:`diagonal_bytes`), atomically; read it
    back with ``safetensors.torch.load_file(path)`` (``safe_open(path, "pt").metadata()``
    for the metadata)."""
    data = diagonal_bytes(result)
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise OutputError(f"cannot write --save-diagonal {path}: {err.strerror or err}") from None
