"""User-facing errors: anything raised as a :class:`HessdiagError` is bad input.

The CLI turns these into a one-line message and exit code 2; anything else is an
internal error (exit 1).
"""


class HessdiagError(ValueError):
    """Bad input or an impossible request, explained in one line."""
