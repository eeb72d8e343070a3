"""Progress reporting: a callback per processed batch, and a tqdm bar for the terminal.

Estimators pass over the data many times (the exact estimator ⌈P/128⌉ times, Hutchinson
once per probe chunk), so progress is counted in examples processed over all passes.
:class:`ProgressBatches` wraps an objective's batch source and calls
``callback(num_examples)`` after each batch; :func:`progress_bar` makes such a callback
that drives a tqdm bar on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

Progress = Callable[[int], None]

PROGRESS_DELAY = 1.0
"""Seconds before the bar appears: short runs print nothing."""


class ProgressBatches:
    """Re-iterable view of ``batches`` that reports each batch once it has been used."""

    def __init__(self, batches: Iterable[Any], callback: Progress) -> None:
        self._batches = batches
        self._callback = callback

    def __iter__(self) -> Iterator[Any]:
        for batch in self._batches:
            yield batch
            # Reached when the consumer asks for the next batch: this one is done.
            self._callback(int(batch[0].shape[0]))

    def __len__(self) -> int:
        return len(self._batches)  # type: ignore[arg-type]


@contextlib.contextmanager
def progress_bar(enabled: bool, stream: TextIO | None = None) -> Iterator[Progress | None]:
    """A tqdm bar on ``stream`` (default stderr) counting examples; ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(file=stream or sys.stderr, unit="ex", unit_scale=True, delay=PROGRESS_DELAY,
               desc="hessdiag: examples processed", leave=False, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()
