"""Inputs: checkpoints (formats, safe loading) and data specs."""

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATA_SPECS, DataSpecError, load_data
from .files import atomic_write_bytes, atomic_write_text

__all__ = [
    "DATA_SPECS",
    "CheckpointError",
    "DataSpecError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "load_data",
    "save_checkpoint",
]
