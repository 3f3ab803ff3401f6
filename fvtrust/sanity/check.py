"""The sanity check end to end: pick classes, get natural images and visualizations, run, write.

Output folder::

    similarity.json               the result of fvtrust.sanity.run plus command and inputs
    absolute_<metric>.png         Figures 7, 9, 11
    normalized_<metric>.png       Figures 6, 8, 10
    visualizations.png            the compared visualizations, one row per class
    visualizations/               generated visualizations (the `fvtrust visualize` format;
                                  reused on rerun if model and settings match)
    .cache/                       finished layers (a rerun skips them)
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import FvtrustError
from ..io import atomic_write_json, staged_dir
from .analysis import random_classes, resolve_classes, run, weights_digest
from .inputs import (
    final_layer,
    generate_visualizations,
    load_visualizations,
)
from .plots import save_plots
from .similarity import METRICS


def _natural(model, data, data_dir, classes, per_class_natural, class_index=None, natural_limit=None):
    """(images, labels): the first `per_class_natural` evaluation images of each class (nothing else is read)."""
    from ..data import natural

    source = natural(data, model=model, data_dir=data_dir, class_index=class_index, limit=natural_limit)
    part = source.evaluation
    part.require_labels("the sanity check")
    from .inputs import class_indices

    idx = class_indices(part.targets(), classes, per_class_natural)
    if len(idx) == 0:
        raise FvtrustError(f"natural data {part.source} has no images of the chosen classes")
    x, y = part.select(idx.tolist()).tensors(desc="read natural images")
    return x, y, source.describe()


def _png_digests(vdir: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(vdir.glob("*.png"))}


def _visualizations(model, out: Path | None, classes, per_class, steps, vis_seed, unit_layer, spec, visualize_options):
    """Generate (or reuse from out/visualizations) per_class visualizations per class.

    The folder's ``sanity-key.json`` is a verified cache entry (`fvtrust.cache`)
    keyed by weights and settings, holding a checksum of every PNG: a folder
    from other settings, or with a damaged image, is regenerated.
    """
    from ..cache import fingerprint, read_entry, warn, write_entry

    key = {"weights": weights_digest(model)[:20], "layer": unit_layer, "classes": classes, "per_class": per_class,
           "steps": steps, "seed": vis_seed, "options": {k: repr(v) for k, v in sorted(visualize_options.items())}}
    vdir = None if out is None else out / "visualizations"
    entry = None if vdir is None else read_entry(vdir / "sanity-key.json", "json", fingerprint(key))
    if entry is not None:
        if entry.get("png_sha256") != _png_digests(vdir):
            warn(f"cached visualizations in {vdir} do not match their checksums; regenerating them")
        else:
            try:
                images, _ = load_visualizations(vdir, classes, per_class, input_shape=model.input_shape,
                                                layer=unit_layer)
                return images, {"source": "cached", "dir": str(vdir), **key,
                                "objective_mean": entry.get("objective_mean")}
            except FvtrustError as e:  # a damaged cached folder is regenerated, not fatal
                warn(f"cached visualizations in {vdir} are unusable ({e}); regenerating them")
    images, res = generate_visualizations(model, classes, per_class, layer=unit_layer, steps=steps, seed=vis_seed,
                                          **visualize_options)
    objective_mean = float(res.objective[-1].mean())
    if vdir is not None:
        from ..visualize.output import save_visualization

        res.images = images.view(len(classes) * per_class, *images.shape[2:]).unsqueeze(0)
        save_visualization(res, vdir, spec=spec)
        write_entry(vdir / "sanity-key.json", "json", {"objective_mean": objective_mean,
                                                       "png_sha256": _png_digests(vdir)}, fingerprint(key))
    return images, {"source": "generated", "dir": None if vdir is None else str(vdir), **key,
                    "objective_mean": objective_mean}


def sanity_check(model, *, out=None, natural=None, data=None, data_dir=None, classes=None,
                 n_random_classes: int | None = None, class_seed: int = 42, per_class: int = 10,
                 per_class_natural: int | None = 50, visualizations=None, unit_layer: str | None = None,
                 steps: int = 512, vis_seed: int = 0, visualize_options: dict | None = None, metrics=METRICS,
                 all_pairs: bool = False, pair_stride=None, layers="all", batch_size: int = 128, dtype="float32",
                 command: str | None = None, class_index=None, natural_limit: int | None = None,
                 **run_options) -> dict:
    """Run the sanity check on a loaded model and (with ``out``) write similarity.json and the figures.

    ``classes`` (indices or names) or ``n_random_classes`` drawn like the
    paper with ``class_seed``; default all classes. ``natural`` = (images,
    labels), or a data source for :func:`fvtrust.data.natural` (also as
    ``data``; its evaluation part is read: the Fashion-MNIST test split for the
    embedded default, every image of a folder), default the model's own. ``visualizations``: a
    folder written by ``fvtrust visualize`` or a tensor (classes x k x C x H
    x W); default: generated with ``steps`` steps. ``all_pairs`` disables the
    paper's sub-sampling. Returns the result dict.
    """
    from ..models import as_model

    t0 = time.time()
    model = as_model(model, example=natural)
    if classes is not None and n_random_classes is not None:
        raise FvtrustError("give either classes or n_random_classes, not both")
    if not model.num_classes:
        raise FvtrustError(f"{model.spec} does not say how many classes it has; the sanity check needs class units")
    if n_random_classes is not None:
        classes = random_classes(model.num_classes, n_random_classes, class_seed)
    classes = resolve_classes(classes, model.num_classes, model.class_names)
    unit_layer = unit_layer or final_layer(model)
    from ..models.layers import layer_units

    if layer_units(model, unit_layer) != model.num_classes:
        raise FvtrustError(f"layer {unit_layer!r} has {layer_units(model, unit_layer)} units, not one per class "
                           f"({model.num_classes}); pick the logits layer")
    out = None if out is None else Path(out)
    natural_info = {"source": "given"}
    if natural is None or not isinstance(natural, tuple):
        *natural, natural_info = _natural(model, natural if data is None else data, data_dir, classes,
                                          per_class_natural, class_index, natural_limit)
        natural = tuple(natural)
    if visualizations is None:
        vis, vis_info = _visualizations(model, out, classes, per_class, steps, vis_seed, unit_layer, model.spec,
                                        visualize_options or {})
    elif isinstance(visualizations, (str, Path)):
        vis, meta = load_visualizations(visualizations, classes, per_class, input_shape=model.input_shape,
                                        layer=unit_layer)
        vis_info = {"source": "dir", "dir": str(visualizations), "layer": meta.get("layer"),
                    "spec": meta.get("spec"), "thresholds": meta.get("thresholds"), "settings": meta.get("settings")}
    else:
        vis, vis_info = visualizations, {"source": "given"}
    stride = pair_stride if pair_stride is not None else ("all" if all_pairs else "paper")
    result = run(model, natural, vis, classes, per_class, per_class_natural=per_class_natural, layers=layers,
                 metrics=metrics, pair_stride=stride, dtype=dtype, batch_size=batch_size,
                 cache_dir=None if out is None else out / ".cache", **run_options)
    result["visualizations"].update(unit_layer=unit_layer, **vis_info)
    result["natural_data"] = natural_info
    result["command"] = command
    result["total_runtime_s"] = time.time() - t0
    if out is not None:
        with staged_dir(out) as stage:
            result["figures"] = save_plots(result, stage)
            if isinstance(vis, torch.Tensor) and vis.ndim == 5:  # (a dict of per-class tensors is not drawn)
                result["figures"].append(_save_visualization_grid(vis[:, :per_class], result, stage))
            atomic_write_json(stage / "similarity.json", result)
    return result


def _save_visualization_grid(vis, result: dict, stage: Path) -> str:
    """classes x replicates grid of the visualizations that were compared."""
    import matplotlib.pyplot as plt

    from ..io import atomic_save_figure
    from ..visualize.output import grid_figure

    fig = grid_figure(vis, result["class_names"], [f"#{i}" for i in range(vis.shape[1])],
                      title=f"{result.get('spec') or ''}: visualizations of {result['visualizations']['unit_layer']} "
                            "units, one row per class")
    atomic_save_figure(fig, stage / "visualizations.png", dpi=90)
    plt.close(fig)
    return "visualizations.png"
