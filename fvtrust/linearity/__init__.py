"""Path linearity (paper §5, App. C.4): are units whose visualization paths are straighter easier to interpret?

`top_activating_many` finds each unit's M most activating natural images,
`path_metrics` runs the visualization from each of them and measures gradient
angles (AGPA, AGA; eqs. 12-14) and distances to the start-end segment (ALDP,
ALD; eqs. 15-18), and `correlate` relates both to interpretability scores
(Spearman, and against the number of steps n as in Figure 12).
"""
from .correlate import PAPER_REFERENCE, correlate, load_scores_csv, spearman_rows
from .paths import LINE_MODES, PathMetrics, angle_degrees, line_distances, path_metrics, running_mean
from .paths import segment_distances
from .top_activating import TopActivating, top_activating, top_activating_many, unit_activations

__all__ = ["LINE_MODES", "PAPER_REFERENCE", "PathMetrics", "TopActivating", "angle_degrees", "correlate",
           "line_distances", "load_scores_csv", "path_metrics", "running_mean", "segment_distances",
           "spearman_rows", "top_activating", "top_activating_many", "unit_activations"]
