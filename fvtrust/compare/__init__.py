"""Compare feature visualization methods by how naturally the network processes their images (issue 16).

``compare_methods`` renders lucent-standard, pixel, MACO, feature accentuation
and redirected-ReLU visualizations of the same units with the same budget, and
measures each: (a) the §3 sanity check, (b) class faithfulness and activation
relative to the natural maximum, (c) diversity across seeds, (d) time per
image-step; optionally beside the Horama / faccent anchors (anchors.py).
"""
from .methods import METHODS, MethodRun, run_method
from .run import compare_methods

__all__ = ["METHODS", "MethodRun", "compare_methods", "run_method"]
