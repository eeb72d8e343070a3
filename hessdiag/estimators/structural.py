"""The structure of an objective's network (:mod:`hessdiag.structure`), found once per objective.

Estimators and ``auto`` ask for it; the recording runs one functional forward pass on the
first :data:`STRUCTURE_EXAMPLES` examples of the first batch.
"""

from __future__ import annotations

import weakref

from ..errors import first_line
from ..objective import Objective, evaluation_mode
from ..structure import NetworkStructure, network_structure

STRUCTURE_EXAMPLES = 2

_CACHE: "weakref.WeakKeyDictionary[Objective, NetworkStructure]" = weakref.WeakKeyDictionary()


def objective_structure(objective: Objective) -> NetworkStructure:
    """The :class:`NetworkStructure` of ``objective``'s model (cached per objective)."""
    found = _CACHE.get(objective)
    if found is None:
        x, _, _ = next(objective.batches())
        try:
            with evaluation_mode(objective.model):
                found = network_structure(objective.model_forward, objective.params,
                                          x[:STRUCTURE_EXAMPLES])
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
            # Not recordable: the general estimators run the model their own way and
            # report any real problem with it.
            found = NetworkStructure("general", f"the forward pass could not be recorded "
                                                f"({first_line(err, 80)})")
        _CACHE[objective] = found
    return found
