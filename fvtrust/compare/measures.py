"""The four measures of compare-methods: (a) sanity check, (b) faithfulness and activation, (c) diversity, (d) time.

(a) **§3 sanity check** (:mod:`fvtrust.sanity`), Spearman on flattened
activations of every distinct layer, all pairs, normalized per layer as
(natural-vs-visualization − different) / (same − different) and averaged over
the kept layers. For class units (a layer with one unit per class) it is the
paper's check itself (``fvtrust.sanity.run``: natural images of the class,
misclassified ones excluded, held-out part). For hidden units there are no
classes, so each unit's *group* is its `m` most activating held-out natural
images and the same three conditions are computed over those groups with the
same engine (``enumerate_pairs`` / ``layer_conditions`` / ``normalized_curve``).
An image may top several units; it then sits in several groups.

(b) **class faithfulness**: the fraction of a class unit's visualizations the
model classifies as that class (class layers only); **activation ratio**: the
unit's objective on the visualization divided by its largest value on the
held-out natural images (1 = as strong as the best natural image).

(c) **diversity across seeds**: per unit, 1 − the mean pairwise Pearson
correlation of its replicates' pixels, averaged over units (0 = every seed
gives the same image).

(d) **time per image-step**: wall seconds of the method's call divided by
images x steps (what one unit-step costs when methods run batched).
"""
from __future__ import annotations

import numpy as np
import torch

from ..sanity.activations import collect, discover_layers
from ..sanity.analysis import enumerate_pairs, layer_conditions, normalized_curve, resolve_strides, run
from ..sanity.similarity import similarity

METRIC = "spearman"


def is_class_layer(model, layer: str) -> bool:
    from ..models.layers import layer_units
    from ..sanity.inputs import final_layer

    return bool(model.num_classes) and layer == final_layer(model) and layer_units(model, layer) == model.num_classes


def class_sanity(model, units, vis: torch.Tensor, natural, per_class_natural: int = 50, layers="all") -> dict:
    """The paper's sanity check with these class units' visualizations (units x k x C x H x W).

    Up to `per_class_natural` held-out images per class (fewer when a class has fewer).
    """
    labels = torch.as_tensor(natural[1])
    per_class_natural = min([per_class_natural] + [int((labels == u).sum()) for u in units])
    res = run(model, natural, vis, classes=list(units), per_class=vis.shape[1], per_class_natural=per_class_natural,
              metrics=(METRIC,), pair_stride="all", layers=layers)
    curve = res["metrics"][METRIC]["normalized"]
    return {"kind": "class", "layers": curve["layers"], "values": curve["values"],
            "mean": curve["summary"].get("mean", float("nan")), "dropped": curve["dropped"],
            "n_natural": res["natural"]["correct_per_class"],
            "classified_as_their_class": res["visualizations"]["classified_as_their_class"]}


def grouped_sanity(model, natural_groups: list[torch.Tensor], vis: torch.Tensor, batch_size: int = 128,
                   layers="all") -> dict:
    """The sanity check's three conditions with each hidden unit's top natural images as its class."""
    nat_counts = [len(g) for g in natural_groups]
    vis_counts = [vis.shape[1]] * vis.shape[0]
    images = torch.cat([*natural_groups, vis.reshape(-1, *vis.shape[2:])]).float()
    offsets, a = {}, 0
    for kind, counts in (("nat", nat_counts), ("vis", vis_counts)):
        for k, m in enumerate(counts):
            offsets[(kind, k)] = (a, a + m)
            a += m
    n_nat = sum(nat_counts)
    probe = images[torch.tensor(sorted({0, n_nat // 2, n_nat, len(images) - 1}))]
    found = discover_layers(model, probe, layers)
    pairs = enumerate_pairs(nat_counts, vis_counts, resolve_strides("all", [METRIC])[METRIC])
    stats = {}
    for rows in collect(model, images, found, [METRIC], batch_size=batch_size, desc="sanity (units)"):
        stats[rows.layer.name] = layer_conditions(rows.prepared[METRIC], offsets, pairs, blockwise=rows.spilled)
        del rows
    names = [lay.name for lay in found]

    def mean(c):
        return [float(stats[n][c]["mean"]) if stats[n][c]["mean"] is not None else float("nan") for n in names]

    curve = normalized_curve(mean("same_class"), mean("different_class"), mean("natural_vs_visualization"), names)
    return {"kind": "top-activating groups", "layers": curve["layers"], "values": curve["values"],
            "mean": curve["summary"].get("mean", float("nan")), "dropped": curve["dropped"], "n_natural": nat_counts}


def diversity(vis: torch.Tensor) -> float:
    """Mean over units of 1 - mean pairwise Pearson correlation of the replicates (needs >= 2 replicates)."""
    if vis.shape[1] < 2:
        return float("nan")
    out = []
    for u in range(vis.shape[0]):
        s = similarity(vis[u].reshape(vis.shape[1], -1).double(), metric="pearson").numpy()
        iu = np.triu_indices(len(s), 1)
        v = s[iu]
        v = v[np.isfinite(v)]
        out.append(1.0 - float(v.mean()) if len(v) else float("nan"))
    return float(np.nanmean(out)) if np.isfinite(out).any() else float("nan")


def faithfulness(model, units, vis: torch.Tensor) -> float:
    """Fraction of class-unit visualizations classified as their unit's class."""
    from ..evaluate import predict

    pred = predict(model, vis.reshape(-1, *vis.shape[2:])).argmax(1).view(vis.shape[0], vis.shape[1])
    return float((pred == torch.as_tensor(list(units)).view(-1, 1)).float().mean())


__all__ = ["class_sanity", "grouped_sanity", "diversity", "faithfulness", "is_class_layer"]
