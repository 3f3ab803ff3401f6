"""Attack 2, silent units (paper §2.2): a parallel filter that natural images never switch on.

Modules: `build` (`silent_units`, the orthogonalized filter and its bias),
`report` (Figure 5 and the natural-behaviour measures), `cli`
(`fvtrust fool silent`).
"""
from .build import SilentBN, SilentConv, rebuild, resolve_block, silent_bias, silent_units

__all__ = ["SilentBN", "SilentConv", "rebuild", "resolve_block", "silent_bias", "silent_units"]
