"""Write a VisualizationResult: one PNG per unit and threshold, a grid, JSON."""
from __future__ import annotations


import numpy as np

from ..io import atomic_save_figure, atomic_write_json, save_png, staged_dir


def grid_figure(images, row_labels, col_labels, title=None):
    """A matplotlib figure: rows = thresholds (or conditions), columns = units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), len(images[0])
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.8, 1.3 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = images[r][c]
            arr = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
            arr = np.clip(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)), 0, 1)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(str(col_labels[c]), fontsize=8)
            if c == 0:
                ax.set_ylabel(str(row_labels[r]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_visualization(res, out, spec: str | None = None) -> dict:
    """Write PNGs, grid.png and visualization.json under `out` (staged: all or nothing)."""
    import matplotlib.pyplot as plt

    files = {}
    with staged_dir(out) as stage:
        for ti, t in enumerate(res.thresholds):
            for ui, u in enumerate(res.units):
                name = f"unit{u:04d}_step{t:04d}.png"
                if (stage / name).exists():  # repeated unit: disambiguate
                    name = f"unit{u:04d}_{ui}_step{t:04d}.png"
                save_png(stage / name, res.images[ti, ui])
                files.setdefault(str(u), []).append(name)
        fig = grid_figure(res.images, [f"step {t}" for t in res.thresholds], [f"unit {u}" for u in res.units],
                          title=f"{spec or ''} {res.layer}".strip())
        atomic_save_figure(fig, stage / "grid.png", dpi=110)
        plt.close(fig)
        meta = dict(res.to_dict(), spec=spec, files=files, grid="grid.png")
        atomic_write_json(stage / "visualization.json", meta)
    return meta
