"""Figures 6-11 of the paper from a sanity-check result (the dict of :func:`fvtrust.sanity.run`).

Absolute (Figures 7, 9, 11): per layer, the mean similarity of the three
conditions with a +/- 1 std band over pairs. Normalized (Figures 6, 8, 10):
same class = 1, different class = 0; natural-vs-visualization per layer as
points, the smoothed curve, and the +/- moving-std band. Colours follow the
paper: green = same class, black = different class, orange = natural vs
visualization, blue = band. Layers run along the x-axis in forward order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_save_figure

METRIC_LABEL = {"spearman": "Spearman", "pearson": "Pearson", "cosine": "Cosine"}
COLORS = {"same_class": "tab:green", "different_class": "black", "natural_vs_visualization": "tab:orange"}
LABELS = {"same_class": "natural vs natural, same class",
          "different_class": "natural vs natural, different class",
          "natural_vs_visualization": "natural vs visualization, same class"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _axes(n_layers: int, title: str):
    plt = _plt()
    width = min(40.0, max(6.5, 0.22 * n_layers + 3.0))
    fig, ax = plt.subplots(figsize=(width, 4.8))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return fig, ax


def _layer_ticks(ax, names):
    ax.set_xticks(range(len(names)))
    size = 8 if len(names) <= 40 else 6 if len(names) <= 90 else 5
    ax.set_xticklabels(names, rotation=90, fontsize=size)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("layer (forward order)")


def _subtitle(result: dict, metric: str) -> str:
    m = result["metrics"][metric]
    s = m["pair_stride"]
    pairs = "all pairs" if all(v == 1 for v in s.values()) else \
        f"every {s['same_class']}/{s['different_class']}/{s['natural_vs_visualization']}th pair"
    spec = result.get("spec") or ""
    return f"{spec}, {len(result['classes'])} classes, {pairs}"


def plot_absolute(result: dict, metric: str):
    """Figure 7/9/11: the three conditions per layer, class-averaged mean +/- std over all pairs."""
    names = [lay["name"] for lay in result["layers"]]
    conds = result["metrics"][metric]["conditions"]
    fig, ax = _axes(len(names), f"Absolute similarity ({METRIC_LABEL[metric]})\n{_subtitle(result, metric)}")
    x = np.arange(len(names))
    for c in ("same_class", "different_class", "natural_vs_visualization"):
        mean, std = _arr(conds[c]["mean"]), _arr(conds[c]["std"])
        ax.plot(x, mean, "o-", color=COLORS[c], ms=3.5, lw=1.2, label=LABELS[c])
        ax.fill_between(x, mean - std, mean + std, color=COLORS[c], alpha=0.15, lw=0)
    ax.set_ylabel(f"{METRIC_LABEL[metric]} similarity (mean over classes, ± std over pairs)")
    _layer_ticks(ax, names)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_normalized(result: dict, metric: str):
    """Figure 6/8/10: natural vs visualization, normalized (same class = 1, different class = 0)."""
    curve = result["metrics"][metric]["normalized"]
    names = curve["layers"]
    s = result.get("settings", {})
    fig, ax = _axes(len(names), f"Normalized similarity ({METRIC_LABEL[metric]})\n{_subtitle(result, metric)}")
    x = np.arange(len(names))
    ax.axhline(1.0, color=COLORS["same_class"], ls="--", lw=1.2, label=LABELS["same_class"] + " (= 1)")
    ax.axhline(0.0, color=COLORS["different_class"], ls="--", lw=1.2, label=LABELS["different_class"] + " (= 0)")
    if names:
        raw, sm, band = _arr(curve["values"]), _arr(curve["smoothed"]), _arr(curve["band"])
        ax.fill_between(x, sm - band, sm + band, color="tab:blue", alpha=0.2, lw=0,
                        label=f"± std over a window of {s.get('std_window', 5)}")
        ax.plot(x, raw, "o", color=COLORS["natural_vs_visualization"], ms=3.5, alpha=0.6,
                label="natural vs visualization, per layer")
        ax.plot(x, sm, "-", color=COLORS["natural_vs_visualization"], lw=2.0,
                label=f"natural vs visualization, smoothed (window {s.get('smoothing_window', 7)})")
        _layer_ticks(ax, names)
    dropped = curve.get("dropped") or []
    if dropped:
        ax.text(0.99, 0.01, f"dropped (|same - different| < {s.get('drop_below', 0.01)}): {', '.join(dropped)}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.4")
    ax.set_ylabel(f"normalized {METRIC_LABEL[metric]} similarity")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def save_plots(result: dict, out, dpi: int = 120) -> list[str]:
    """Write ``absolute_<metric>.png`` and ``normalized_<metric>.png`` for every metric; returns the names."""
    plt = _plt()
    out = Path(out)
    files = []
    for metric in result["metrics"]:
        for kind, fn in (("absolute", plot_absolute), ("normalized", plot_normalized)):
            fig = fn(result, metric)
            name = f"{kind}_{metric}.png"
            atomic_save_figure(fig, out / name, dpi=dpi)
            plt.close(fig)
            files.append(name)
    return files
