"""User-facing errors: anything raised as a :class:`HessdiagError` is bad input.

The CLI turns these into a one-line message and exit code 2; anything else is an
internal error (exit 1).
"""


class HessdiagError(ValueError):
    """Bad input or an impossible request, explained in one line."""


class ObjectiveError(HessdiagError):
    """The model, data or loss cannot form the objective, or cannot be differentiated as a
    curvature product needs (bad user input)."""


def first_line(err: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """The first line of an exception's message (at most ``limit`` characters), for the
    one-line reports of bad input; the exception's type name when the message is empty."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(err).__name__}: {line}" if with_type else line
