"""One panel per class: the pair (f1, f2) that shares Phi_minmax but disagrees.

d = 1 pairs are drawn as curves; the d = 2 affine pair is drawn along the
boundary of the square, (0,0) -> (1,0) -> (1,1) -> (0,1) -> (0,0), where an
affine function attains its extremes. The shared argmin/argmax are marked.
"""
from __future__ import annotations

import numpy as np

from .classes import CLASS_INFO, CLASSES
from .counterexamples import counterexamples

# Example inputs for the figure (one Phi per class; any valid Phi works).
FIGURE_PHI = {
    "black_box": ((0.25, 0.75, 0.1, 0.9), {}),
    "nn": ((0.8, 0.2, 0.1, 0.9), {}),
    "erm": ((0.1, 0.6, 0.2, 0.8), {}),
    "lipschitz": ((0.3, 0.8, 0.2, 0.7), {"L": 4.0}),
    "piecewise_affine": ((0.35, 0.9, 0.05, 0.95), {}),
    "monotone": ((0.2, 0.7, 0.1, 0.9), {}),
    "convex": ((0.3, 1.0, 0.1, 0.9), {}),
    "affine": ((np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.1, 0.9), {}),
    "affine_1d": ((0.0, 1.0, 0.2, 0.8), {}),
    "constant": ((0.5, 0.5, 0.4, 0.4), {}),
}


def _perimeter(t):
    """t in [0, 4] -> the boundary of the unit square, counter-clockwise from (0, 0)."""
    t = np.asarray(t, float)
    side, s = np.minimum(np.floor(t), 3).astype(int), t - np.minimum(np.floor(t), 3)
    pts = np.zeros((len(t), 2))
    pts[side == 0] = np.column_stack([s[side == 0], np.zeros((side == 0).sum())])
    pts[side == 1] = np.column_stack([np.ones((side == 1).sum()), s[side == 1]])
    pts[side == 2] = np.column_stack([1 - s[side == 2], np.ones((side == 2).sum())])
    pts[side == 3] = np.column_stack([np.zeros((side == 3).sum()), 1 - s[side == 3]])
    return pts


def _corner_t(x):
    return {(0.0, 0.0): 0.0, (1.0, 0.0): 1.0, (1.0, 1.0): 2.0, (0.0, 1.0): 3.0}[tuple(float(v) for v in x)]


def plot_counterexamples(path=None, phis=None):
    """Draw the grid of f1/f2 pairs; save to `path` (PNG) if given; return the figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state to disturb

    phis = dict(FIGURE_PHI, **(phis or {}))
    fig = Figure(figsize=(17, 6.8), layout="constrained")
    axes = fig.subplots(2, 5)
    for ax, cls in zip(axes.ravel(), CLASSES):
        phi, params = phis[cls]
        f1, f2 = counterexamples(cls, phi, **params)
        x_min, x_max, f_min, f_max = phi
        if CLASS_INFO[cls].d == 1:
            x = np.linspace(0, 1, 1001)
            x = np.unique(np.concatenate([x, f1.candidate_points(), f2.candidate_points()]))
            ax.plot(x, f1(x), lw=2.2, label="f1")
            ax.plot(x, f2(x), lw=1.6, ls="--", label="f2")
            ax.plot([x_min], [f_min], "v", color="k", ms=8, label="argmin")
            ax.plot([x_max], [f_max], "^", color="crimson", ms=8, label="argmax")
            ax.set_xlabel("x")
        else:
            t = np.linspace(0, 4, 801)
            pts = _perimeter(t)
            ax.plot(t, f1(pts), lw=2.2, label="f1")
            ax.plot(t, f2(pts), lw=1.6, ls="--", label="f2")
            ax.plot([_corner_t(x_min)], [f_min], "v", color="k", ms=8, label="argmin")
            ax.plot([_corner_t(x_max)], [f_max], "^", color="crimson", ms=8, label="argmax")
            ax.set_xticks([0, 1, 2, 3, 4], ["(0,0)", "(1,0)", "(1,1)", "(0,1)", "(0,0)"], fontsize=7)
            ax.set_xlabel("boundary of [0,1]^2")
        ax.set_ylim(-0.05, 1.05)
        t1 = getattr(f1, "label", "")
        gap = float(np.max(np.abs(f1(_grid(cls)) - f2(_grid(cls)))))
        ax.set_title(f"{CLASS_INFO[cls].name}\n||f1-f2|| = {gap:.2f}, f_max-f_min = {f_max - f_min:.2f}",
                     fontsize=9)
        ax.text(0.02, 0.97, t1.split(",")[0], transform=ax.transAxes, fontsize=7, va="top")
    axes.ravel()[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Same feature visualization (argmin, argmax, min, max), different functions", fontsize=12)
    if path is not None:
        fig.savefig(path, dpi=110, format="png")
    return fig


def _grid(cls):
    from .phi import grid

    return grid(CLASS_INFO[cls].d, 401 if CLASS_INFO[cls].d == 1 else 41)
