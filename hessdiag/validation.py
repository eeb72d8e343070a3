"""Input validation before measuring: bad input fails fast, in one line, naming the problem.

:func:`validate_objective` runs once before an estimator spends any Hessian-vector
products. It checks what would otherwise surface as a stack trace deep inside
``torch.func`` (or, worse, as a silently wrong number):

- every parameter and floating buffer is finite (naming the first that is not);
- the data are non-empty, ``x`` and ``y`` agree in length and hold finite numbers;
- the model accepts the inputs: one forward pass on the first batch, in eval mode and the
  compute dtype, whose failure is reported as bad input with the input shape;
- the model's output fits the loss: ``ce`` wants (batch, classes) logits and integer
  labels in ``0 … classes−1`` (or class probabilities shaped like the logits); ``mse``
  wants one target value per output (or integer labels, one-hot encoded). Labels are
  checked in every batch, the forward pass only in the first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import HessdiagError, first_line
from .losses import Loss, LossSpec
from .objective import Objective, evaluation_mode


class InputError(HessdiagError):
    """Model, data and loss that cannot be measured together."""


def check_device(device: torch.device | str | None) -> None:
    """Refuse a device this torch build cannot use, before any tensor is moved."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r}: {first_line(err, with_type=True)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")


def check_finite_parameters(named: dict[str, Tensor]) -> None:
    """Every floating tensor finite; the error names the first offender."""
    for name, tensor in named.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"non-finite values (NaN or Inf) in the model's {name}")


def _check_targets(loss: Loss, y: Tensor, output: Tensor, batch: int) -> None:
    """Labels/targets of one batch against the first batch's output shape."""
    where = f"batch {batch}: " if batch > 1 else ""
    classes = output.shape[1] if output.dim() == 2 else None
    if not isinstance(y, Tensor):
        raise InputError(f"{where}labels must be a tensor, got {type(y).__name__}")
    if y.is_complex():
        raise InputError(f"{where}labels have unsupported dtype {y.dtype}")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()):
            raise InputError(f"{where}the targets contain NaN or Inf")
        reason = loss.float_target_reason(output, y)
        if reason is not None:
            raise InputError(f"{where}{reason}")
        return
    if not loss.indexes_classes(output):
        return
    # integer (or bool) class labels
    if y.dtype != torch.int64:
        raise InputError(f"{where}integer class labels must be int64 (torch.long), got {y.dtype}; "
                         "convert them with y.long()")
    if classes is None:
        raise InputError(
            f"{where}integer labels need a model output of shape (batch, classes); "
            f"the model returns {tuple(output.shape)}"
        )
    if y.dim() != 1:
        raise InputError(f"{where}integer labels must have shape (batch,), got {tuple(y.shape)}")
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            bad = high if high >= classes else low
            raise InputError(
                f"{where}label {bad} is outside the model's output range: the model has {classes} "
                f"outputs, so labels must lie in 0..{classes - 1}"
            )


def validate_objective(objective: Objective) -> None:
    """Check model, data and loss of ``objective`` (see the module docstring).

    One pass over the data (labels only) plus one forward pass on the first batch. Sets
    ``objective.num_examples``. Raises :class:`InputError` (a :class:`HessdiagError`).
    """
    check_finite_parameters({**objective.params, **objective.constants})
    output = None
    for index, (x, y, n) in enumerate(objective.batches(), start=1):
        if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise InputError(f"batch {index}: {n} inputs but labels of shape {shape}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise InputError(f"batch {index}: the input data contain NaN or Inf")
        if output is None:
            output = _first_forward(objective, x, y)
        _check_targets(objective.loss, y, output, index)


def _first_forward(objective: Objective, x: Tensor, y: Tensor) -> Tensor:
    """One forward pass and loss on the first batch; failures are bad input."""
    described = f"inputs of shape {tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')})"
    try:
        with evaluation_mode(objective.model), torch.no_grad():
            output = objective.forward(objective.params, x)
    except Exception as err:  # noqa: BLE001 - whatever the model raises on wrong input
        raise InputError(f"the model rejects {described}: {first_line(err, with_type=True)}") from None
    if not isinstance(output, Tensor):
        raise InputError(f"the model returns a {type(output).__name__}, not a tensor")
    if output.dim() == 0 or output.shape[0] != x.shape[0]:
        raise InputError(f"the model maps {described} to an output of shape {tuple(output.shape)}, "
                         "not one row per example")
    if objective.loss.name in ("ce", "nll") and output.dim() != 2:
        raise InputError(f"{objective.loss.name} needs (batch, classes) outputs; "
                         f"the model returns shape {tuple(output.shape)}")
    if not bool(torch.isfinite(output).all()):
        raise InputError("the model's output on the first batch contains NaN or Inf")
    _check_targets(objective.loss, y, output, 1)
    try:
        with torch.no_grad():
            value = objective.loss.batch_mean(output, y)
        reason = objective.loss.check(output, y)
    except Exception as err:  # noqa: BLE001 - a loss/target mismatch is bad input
        raise InputError(f"the {objective.loss.describe()} loss cannot use these targets: "
                         f"{first_line(err, with_type=True)}") from None
    if reason is not None:
        raise InputError(reason)
    if not bool(torch.isfinite(value)):
        raise InputError(f"the {objective.loss.describe()} loss on the first batch is not finite")
    return output


def validate_inputs(
    model: nn.Module,
    data: object,
    loss: LossSpec = "ce",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = 512,
) -> None:
    """Check that ``model`` can be measured on ``data`` with ``loss`` (raises :class:`InputError`).

    What :func:`hessdiag.measure` runs first; callable on its own to check inputs cheaply.
    """
    check_device(device)
    validate_objective(Objective(model, data, loss, dtype=dtype, device=device, batch_size=batch_size))
