"""Re-testing the ψ_max claims: training, attacks, and coordinate-free curvature.

One concept per module:

- :mod:`~hessdiag.experiments.training`: :func:`train` with ``"standard"``, ``"pgd-at"``
  (Madry PGD adversarial training) or ``"trades"``; seeded and deterministic on CPU.
- :mod:`~hessdiag.experiments.attacks`: clean, PGD-20 and AutoAttack accuracy at an L∞
  radius ε (torchattacks), :func:`evaluate` for all three.
- :mod:`~hessdiag.experiments.reparametrize`: :func:`reparametrize`, the same network with
  RCT-AF at another α and rescaled parameters; :func:`parameter_scales`.
- :mod:`~hessdiag.experiments.invariant`: :func:`invariant_normalized_norm`, the curvature
  measure ‖θ² ⊙ diag H‖₂/√P that such rescalings cannot change.
- :mod:`~hessdiag.experiments.sweep`: :func:`~hessdiag.experiments.sweep.run_sweep`, a TOML
  grid of models × activations × methods × seeds, resumable and shardable
  (``hessdiag sweep``); :mod:`~hessdiag.experiments.plot`:
  :func:`~hessdiag.experiments.plot.plot_sweep`, its figures against ψ_max (``hessdiag plot``).

Guide and measured numbers: ``docs/experiments.md``. Adversarial training and evaluation
need ``torchattacks`` (``pip install 'hessdiag[experiments]'``).
"""

from ._common import ExperimentError
from .attacks import ATTACKS, RobustnessResult, autoattack_accuracy, clean_accuracy, evaluate, pgd_accuracy
from .invariant import invariant_normalized_norm, relative_diagonal
from .reparametrize import ReparametrizationError, parameter_scales, reparametrize
from .training import METHODS, TrainingConfig, TrainingHistory, train

__all__ = [
    "ATTACKS",
    "METHODS",
    "ExperimentError",
    "ReparametrizationError",
    "RobustnessResult",
    "TrainingConfig",
    "TrainingHistory",
    "autoattack_accuracy",
    "clean_accuracy",
    "evaluate",
    "invariant_normalized_norm",
    "parameter_scales",
    "pgd_accuracy",
    "relative_diagonal",
    "reparametrize",
    "train",
]
