"""One progress helper for every long loop, so bars look and behave the same.

Set FVTRUST_PROGRESS=0 (tests, CI logs) to silence them.
"""
import os

from tqdm.auto import tqdm


def enabled() -> bool:
    return os.environ.get("FVTRUST_PROGRESS", "1") not in ("0", "false", "no")


def progress(iterable=None, *, total=None, desc=None, leave=False, unit="it", disable=None):
    """A tqdm bar on stderr; `disable=None` follows FVTRUST_PROGRESS."""
    if disable is None:
        disable = not enabled()
    return tqdm(iterable, total=total, desc=desc, leave=leave, unit=unit, disable=disable, dynamic_ncols=True)
