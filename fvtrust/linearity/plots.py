"""Figures for path linearity: Figure 12 (r against n) and per-unit AGPA / ALDP curves."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import (
    Figure,  # no pyplot: no global figure state, nothing to close
)


def figure12(corr: dict, title: str = "") -> Figure:
    """Spearman r of AGA_n (a) and ALD_n (b) with the scores against n (log x); p < .05 marked."""
    n = np.asarray(corr["n"])
    ref = corr.get("reference", {})
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    panels = [("aga", "(a) average gradient path angle, AGA$_n$", ref.get("agpa_n2")),
              ("ald", "(b) average line distance path, ALD$_n$", ref.get("ald"))]
    for ax, (name, label, paper) in zip(axes, panels):
        r = np.asarray(corr[f"{name}_curve"]["r"], dtype=float)
        p = np.asarray(corr[f"{name}_curve"]["p"], dtype=float)
        ax.plot(n, r, color="C0", lw=1.5, label=f"this model ({corr[name]['n_units']} units)")
        sig = p < 0.05
        ax.scatter(n[sig], r[sig], s=10, color="C0", zorder=3, label="p < .05")
        if paper:
            ax.scatter([paper["n"]], [paper["r"]], marker="*", s=120, color="C3", zorder=4,
                       label=f"paper ({ref.get('model', '')}, {ref.get('units', '')} units): n={paper['n']}, "
                             f"r={paper['r']:+.2f}, p={paper['p']:g}")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("steps considered, n")
        ax.set_title(f"{label}\nwhole path: r={corr[name]['r']:+.3f}, p={corr[name]['p']:.3g}", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("Spearman r with interpretability score")
    axes[0].set_ylim(-1.05, 1.05)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def path_curves(metrics, title: str = "", max_legend: int = 16) -> Figure:
    """AGPA_j and ALDP_j per unit against step j (log x): what the correlations are built from."""
    j = np.arange(1, metrics.steps)
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    for k, u in enumerate(metrics.units):
        color = cmap(k / max(1, len(metrics.units) - 1))
        axes[0].plot(j, metrics.agpa[k], color=color, lw=1, label=f"unit {u}: AGA {metrics.aga[k]:.1f}°")
        axes[1].plot(j, metrics.aldp[k], color=color, lw=1, label=f"unit {u}: ALD {metrics.ald[k]:.3f}")
    axes[0].set_ylabel("AGPA$_j$ (degrees)")
    axes[1].set_ylabel("ALDP$_j$ (distance / ||x$^s$ - x$^f$||)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("step j")
        if len(metrics.units) <= max_legend:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title or f"path linearity, {metrics.layer} (M={metrics.m}, N={metrics.steps})")
    fig.tight_layout()
    return fig


__all__ = ["figure12", "path_curves"]
