"""Before/after grids for the fooling circuit, like the paper's Figures 1 and 2."""
from __future__ import annotations

from ...visualize.output import grid_figure


def circuit_figure(images: dict, *, kind: str = "permutation", title: str | None = None, max_cols: int = 16):
    """Rows: original visualization of unit i, the target (visualization of unit mapping[i], or the
    picture), the fooled model's visualization of unit i. Columns: units."""
    units = images["units"][:max_cols]
    n = len(units)
    target_label = "target: picture" if kind == "picture" else "target: original of mapping[i]"
    rows = [images["original"][:n], images["target"][:n], images["fooled"][:n]]
    labels = ["original", target_label, "fooled"]
    cols = [f"unit {u}" for u in units]
    if images.get("target_labels"):
        cols = [f"unit {u}\n(shows {t.split()[-1]})" for u, t in zip(units, images["target_labels"][:n])]
    return grid_figure(rows, labels, cols, title=title)
