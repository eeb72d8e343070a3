"""hessdiag: the diagonal of the loss Hessian of PyTorch models, and its normalized norm.

Public API (docs/index.md)::

    import hessdiag
    res = hessdiag.measure(model, (x, y), loss="ce", estimator="exact", dtype="float64")
    res.normalized_norm, res.ci95, res.per_layer, res.to_json(), res.plot()
    res.resolved                                           # False: interval too wide (and a warning)
    diag = hessdiag.hessian_diagonal(model, (x, y))        # {name: Tensor}
    hessdiag.RCTAF(n=1, alpha=14.0).psi_max                 # 7.0
    hessdiag.psi_max(torch.nn.GELU())                       # 0.7979
"""

import warnings

# torch emits this once, from its own internals, on the first forward-mode HVP.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

from ._version import __version__  # noqa: E402
from .activations import RCTAF, get_activation, psi_max  # noqa: E402
from .api import hessian_diagonal, measure  # noqa: E402
from .compat import twice_differentiable  # noqa: E402
from .errors import HessdiagError  # noqa: E402
from .estimators import ESTIMATORS, EstimatorOptions, get_estimator  # noqa: E402
from .objective import Objective  # noqa: E402
from .result import LayerResult, Result, UnresolvedEstimateWarning, normalized_norm  # noqa: E402
from .validation import validate_inputs  # noqa: E402

__all__ = [
    "ESTIMATORS",
    "RCTAF",
    "EstimatorOptions",
    "HessdiagError",
    "LayerResult",
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
    "twice_differentiable",
    "validate_inputs",
]
