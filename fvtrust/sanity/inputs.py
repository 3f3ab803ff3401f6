"""What the sanity check compares: natural images per class and visualizations of class units.

Visualizations are of the **last layer's** unit for each class (its units have
known selectivity: one class each), ``per_class`` replicates per class, each
from its own random start (``fvtrust.visualize`` with a repeated unit). They
are quantized to 8 bits, exactly as the saved PNGs, so a run from freshly
generated images, from the cached ``visualizations/`` folder or from
``--visualizations DIR`` gives identical numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import FvtrustError, nearest
from .analysis import class_indices


def final_layer(model) -> str:
    """The last module to run whose output is one value per class (``fc`` for fashion-cnn)."""
    order: list[tuple[str, torch.Size]] = []
    handles = []
    for name, mod in model.net.named_modules():
        if name:
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, name=name: order.append((name, out.shape)) if isinstance(out, torch.Tensor)
                else None))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *model.input_shape), device=model.device))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise FvtrustError(f"{model.spec} has no named layers to visualize")
    per_class = [n for n, s in order if len(s) == 2 and s[1] == model.num_classes]
    return per_class[-1] if per_class else order[-1][0]


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to 8-bit levels the way ``fvtrust.io.save_png`` does."""
    return torch.floor(images.float().clamp(0, 1) * 255.0 + 0.5) / 255.0


def generate_visualizations(model, classes, per_class: int, *, layer: str | None = None, steps: int = 512,
                            seed: int = 0, **visualize_options):
    """``per_class`` visualizations of each class's unit in ``layer`` (default: :func:`final_layer`).

    One batched ``fvtrust.visualize`` call with every unit repeated
    ``per_class`` times. Returns (images: classes x per_class x C x H x W,
    quantized; the VisualizationResult, for saving).
    """
    from ..visualize import visualize

    if per_class < 1:
        raise FvtrustError(f"per_class must be >= 1, got {per_class}")
    layer = layer or final_layer(model)
    units = [int(c) for c in classes for _ in range(per_class)]
    res = visualize(model, layer, units, steps=steps, seed=seed, progress_desc="sanity visualizations",
                    **visualize_options)
    images = quantize(res.final).view(len(classes), per_class, *res.final.shape[1:])
    return images, res


def _read_png(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise FvtrustError(f"cannot read visualization image {path}: {e}") from None
    t = torch.from_numpy(arr.copy()).float() / 255.0
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def load_visualizations(path, classes, per_class: int | None, *, input_shape, layer: str | None = None):
    """Read a folder written by ``fvtrust visualize`` (visualization.json + PNGs).

    Uses each unit's images at the last threshold; the folder must hold at
    least ``per_class`` of them for every class (e.g. ``fvtrust visualize
    SPEC fc --units 0,0,0,1,1,1,...``). ``layer``, if given, must be the
    layer the folder visualized. Returns (images: classes x k x C x H x W,
    the folder's metadata).
    """
    path = Path(path)
    meta_path = path / "visualization.json"
    if not path.is_dir():
        raise FvtrustError(f"visualization folder not found: {path}")
    if not meta_path.is_file():
        raise FvtrustError(f"{path} has no visualization.json; write one with `fvtrust visualize SPEC LAYER "
                           "--units ... --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
        files, thresholds, vis_layer = meta["files"], meta["thresholds"], meta["layer"]
        last = int(max(thresholds))
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise FvtrustError(f"malformed {meta_path}: {e}") from None
    if layer is not None and vis_layer != layer:
        raise FvtrustError(f"{path} visualizes layer {vis_layer!r}, but the sanity check needs the class units "
                           f"of {layer!r}")
    c = int(input_shape[0])
    out = []
    for cls in classes:
        names = [n for n in files.get(str(cls), []) if str(n).endswith(f"_step{last:04d}.png")]
        if not names:
            have = sorted(files, key=lambda k: (len(k), k))
            raise FvtrustError(f"{path} has no visualization of unit {cls}; it has units "
                               f"{nearest(str(cls), have) if have else 'none'}")
        if per_class is not None and len(names) < per_class:
            raise FvtrustError(f"{path} has only {len(names)} visualization(s) of unit {cls}, fewer than "
                               f"per_class={per_class}; visualize the unit more times (repeat it in --units)")
        names = names[:per_class] if per_class is not None else names
        imgs = []
        for n in names:
            f = path / n
            if not f.is_file():
                raise FvtrustError(f"{meta_path} lists {n}, which is missing")
            img = _read_png(f, c)
            if tuple(img.shape) != tuple(input_shape):
                raise FvtrustError(f"{f} is {tuple(img.shape)}, the model needs {tuple(input_shape)}")
            imgs.append(img)
        out.append(torch.stack(imgs))
    counts = {len(v) for v in out}
    if len(counts) > 1:  # unequal replicate counts: keep the smallest, so classes weigh alike
        k = min(counts)
        out = [v[:k] for v in out]
    return torch.stack(out), meta
