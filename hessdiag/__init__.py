"""hessdiag: the diagonal of the loss Hessian of PyTorch models, and its normalized norm.

Public API (docs/index.md)::

    import hessdiag
    res = hessdiag.measure(model, (x, y), loss="ce", estimator="exact", dtype="float64")
    res.normalized_norm, res.ci95, res.per_layer, res.to_json(), res.plot()
    res.resolved                                           # False: interval too wide (and a warning)
    diag = hessdiag.hessian_diagonal(model, (x, y))        # {name: Tensor}
    hessdiag.measure(model, (x, y), params="2.*",          # a parameter subset, an estimator object
                     estimator=hessdiag.HutchinsonEstimator(samples=64, seed=1), keep_diagonal=True)
    hessdiag.measure(model, (x, y), loss=torch.nn.CrossEntropyLoss(label_smoothing=0.1))  # any loss
    hessdiag.register_estimator("mine", MyEstimator)       # then estimator="mine", --estimator mine
    hessdiag.RCTAF(n=1, alpha=14.0).psi_max                 # 7.0
    hessdiag.psi_max(torch.nn.GELU())                       # 0.7979
"""

from ._version import __version__
from .activations import RCTAF, get_activation, psi_max
from .api import hessian_diagonal, measure
from .compat import twice_differentiable
from .errors import HessdiagError
from .estimators import (
    ESTIMATORS,
    AutoEstimator,
    BackpackEstimator,
    CurvpropEstimator,
    Estimator,
    EstimatorOptions,
    ExactEstimator,
    GGNHutchinsonEstimator,
    HutchinsonEstimator,
    PlainHutchinsonEstimator,
    get_estimator,
    register_estimator,
)
from .losses import LOSSES, Loss, resolve_loss
from .objective import Objective
from .result import LayerResult, Result, UnresolvedEstimateWarning, normalized_norm
from .validation import validate_inputs

__all__ = [
    "ESTIMATORS",
    "LOSSES",
    "RCTAF",
    "AutoEstimator",
    "BackpackEstimator",
    "CurvpropEstimator",
    "Estimator",
    "EstimatorOptions",
    "ExactEstimator",
    "GGNHutchinsonEstimator",
    "HutchinsonEstimator",
    "PlainHutchinsonEstimator",
    "HessdiagError",
    "LayerResult",
    "Loss",
    "Objective",
    "Result",
    "UnresolvedEstimateWarning",
    "__version__",
    "get_activation",
    "get_estimator",
    "hessian_diagonal",
    "measure",
    "normalized_norm",
    "psi_max",
    "register_estimator",
    "resolve_loss",
    "twice_differentiable",
    "validate_inputs",
]
