"""Inputs: checkpoints (formats, safe loading), model specs and data specs."""

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATA_SPECS, DataSpecError, load_data
from .files import atomic_write_bytes, atomic_write_text
from .models_spec import ModelSpecError, build_model

__all__ = [
    "DATA_SPECS",
    "CheckpointError",
    "DataSpecError",
    "ModelSpecError",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_model",
    "load_checkpoint",
    "load_data",
    "save_checkpoint",
]
