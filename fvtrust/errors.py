"""One error type for everything a user can get wrong.

The CLI turns an FvtrustError into a single stderr line and exit code 2, so
bad input never ends in a traceback.
"""


class FvtrustError(Exception):
    """A problem with the user's input (spec, layer, unit, data, file)."""


def nearest(name: str, choices, n: int = 5) -> str:
    """Format the closest valid choices, for messages like "did you mean ...?"."""
    import difflib

    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=n, cutoff=0.3)
    if not close:
        close = choices[:n]
    more = "" if len(choices) <= len(close) else f" (and {len(choices) - len(close)} more)"
    return ", ".join(close) + more
