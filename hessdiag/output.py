"""Result files: the JSON document and the per-layer figure, both written atomically.

Output paths are checked *before* measuring (an unknown plot format or an unwritable
folder fails in one line without wasting a run); files are written only after success,
through a temporary file and a rename, so an existing file is either left intact or
replaced by a complete new one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

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


def check_outputs(json_path: str | None = None, plot_path: str | None = None) -> None:
    """All output checks that can run before measuring."""
    if json_path:
        check_output_path(json_path, "--json")
    if plot_path:
        plot_format(plot_path)
        check_output_path(plot_path, "--plot")


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
