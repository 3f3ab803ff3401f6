"""Sanity check of §3: are feature visualizations processed like natural images?

``similarity`` (the rank-once engine), ``run`` (the analysis on given natural
images and visualizations), ``sanity_check`` (end to end: classes, data,
visualizations, JSON and figures). See analysis.py for the exact definitions.
"""
from .activations import collect, discover_layers
from .analysis import (
    CONDITIONS,
    PAPER_STRIDES,
    count_pairs,
    enumerate_pairs,
    moving_std,
    normalize,
    normalized_curve,
    random_classes,
    run,
    smooth,
)
from .check import sanity_check
from .inputs import final_layer, generate_visualizations, load_visualizations
from .plots import plot_absolute, plot_normalized, save_plots
from .similarity import METRICS, paired_similarity, prepare, similarity, similarity_at

__all__ = [
    "CONDITIONS", "METRICS", "PAPER_STRIDES", "collect", "count_pairs", "discover_layers", "enumerate_pairs",
    "final_layer", "generate_visualizations", "load_visualizations", "moving_std", "normalize", "normalized_curve",
    "paired_similarity", "plot_absolute", "plot_normalized", "prepare", "random_classes", "run", "sanity_check",
    "save_plots", "similarity", "similarity_at", "smooth",
]
