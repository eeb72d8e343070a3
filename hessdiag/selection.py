"""Which parameters θ are measured: ``params=`` of :func:`hessdiag.measure` (``--params``).

By default θ is every parameter with ``requires_grad=True``. A selection names a subset
instead, by

- a dotted name as ``model.named_parameters()`` lists it (``"layer4.1.conv2.weight"``),
- a glob pattern on those names (``"layer4.*"``, ``"*.bias"``; :func:`fnmatch.fnmatchcase`,
  so ``*`` also crosses dots and matching is case-sensitive),
- or a ``Parameter`` object of the model,

alone or mixed in a list (a single string is one pattern). The selection, not
``requires_grad``, then defines θ: a selected parameter is measured even if it is frozen,
and the others are held fixed at their values. The Hessian of L with respect to the subset
is therefore the principal sub-block of the full Hessian, and its diagonal equals the
corresponding entries of the full diagonal. The model itself is never modified.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Union

from torch import Tensor, nn

from .errors import HessdiagError

ParamSpec = Union[str, Tensor, Iterable[Union[str, Tensor]]]
"""What ``params=`` accepts: a name or pattern, a Parameter, or an iterable of both."""


class ParameterSelectionError(HessdiagError):
    """A selection that matches nothing, names a tensor outside the model, or is empty."""


def _examples(names: list[str], count: int = 3) -> str:
    shown = ", ".join(names[:count])
    return shown + (", ..." if len(names) > count else "")


def select_parameters(model: nn.Module, params: ParamSpec | None) -> tuple[list[str], list[str] | None]:
    """θ's parameter names in ``named_parameters()`` order, and the selection as recorded.

    Args:
        model: the network.
        params: ``None`` (every parameter with ``requires_grad=True``) or a selection (module
            docstring).

    Returns:
        ``(names, recorded)``: the selected names, each once, in the model's order; and the
        selection as the result records it (patterns as given, a ``Parameter`` object by its
        name), ``None`` for the default.

    Raises:
        ParameterSelectionError: a pattern that matches no parameter, a tensor that is not a
            parameter of the model, an item that is neither, or an empty selection (one line).
    """
    canonical = list(dict(model.named_parameters()))
    if params is None:
        return [n for n, p in model.named_parameters() if p.requires_grad], None
    by_id = {id(p): n for n, p in model.named_parameters()}
    # Tied tensors are listed once by named_parameters(); a pattern may still name an alias
    # (decoder.weight for a weight shared with the embedding) and selects the one tensor.
    aliases = [(n, by_id[id(p)]) for n, p in model.named_parameters(remove_duplicate=False)]
    items: list[str | Tensor] = [params] if isinstance(params, (str, Tensor)) else list(params)
    if not items:
        raise ParameterSelectionError("params: the selection is empty; name at least one parameter "
                                      f"(e.g. {_examples(canonical)})")
    chosen: set[str] = set()
    recorded: list[str] = []
    for item in items:
        if isinstance(item, Tensor):
            name = by_id.get(id(item))
            if name is None:
                raise ParameterSelectionError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model")
            chosen.add(name)
            recorded.append(name)
        elif isinstance(item, str):
            found = {target for alias, target in aliases if fnmatch.fnmatchcase(alias, item)}
            if not found:
                raise ParameterSelectionError(
                    f"params: {item!r} matches no parameter of the model (names look like "
                    f"{_examples(canonical)})")
            chosen |= found
            recorded.append(item)
        else:
            raise ParameterSelectionError(
                f"params: expected parameter names, glob patterns or Parameter objects, "
                f"got {type(item).__name__}")
    return [n for n in canonical if n in chosen], recorded
