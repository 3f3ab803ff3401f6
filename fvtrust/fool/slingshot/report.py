"""What a gradient slingshot promises, measured: natural behaviour kept, visualization replaced.

The paper's measures, on held-out natural images:
- top-1 / top-5 of the model before and after;
- the unit's own-class AUROC (how well its activation separates its class
  from the rest; its class = the one it responds to most in the original);
- Jaccard overlap of the unit's top-100 natural images before and after;
- Pearson and SSIM (scikit-image) of the unit's visualization to the target;
- the visualization regenerated under simple defenses, each with its
  similarity to the target.

The "standard" visualization is fvtrust.visualize's defaults, what an
auditor runs without thinking: the tunnel's parameterization (FFT by
default, decorrelated colour where the model has RGB), the standard
(lucent) transforms, Adam at lr 0.05, from fvtrust's seeded start noise for
the unit, with the unit's channel objective (the a_k the slingshot shapes;
for a linear layer the same as the default `neuron`). Variants change one
thing each: gradient clipping, stronger transforms (every magnitude of the
standard chain doubled), no transforms at all, SGD instead of Adam, pixel
instead of FFT (or the reverse).

One start is one sample: the same fine-tuned model, visualized from other
seeds, lands at Pearson values that differ by up to 0.6 (README, slingshot).
So the standard visualization is run from `spread_starts` starts (the
seed's own and further ones; batched, one call per model), and
`visualization.across_starts` gives every start's Pearson and their median.
The headline `pearson_after` stays the first start's, the visualization a
user running `fvtrust visualize` with the same seed would see.
"""
from __future__ import annotations

import numpy as np
import torch

from ...evaluate import evaluate
from ...models.hooks import LayerTap
from ...visualize import transforms as T
from .loss import unit_activation

UNDONE_BELOW = 0.6  # a defense "undoes" the slingshot when Pearson to the target falls below the success bar


@torch.no_grad()
def unit_scores(model, layer: str, unit: int, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The unit's objective value (spatial mean / feature) on every image."""
    out = []
    with LayerTap(model, [layer]) as tap:
        for i in range(0, len(images), batch_size):
            out.append(unit_activation(tap(images[i:i + batch_size].to(model.device))[layer], unit).float().cpu())
    return torch.cat(out)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` for `positive` (Mann–Whitney U / n₊n₋, ties counted half)."""
    from scipy.stats import mannwhitneyu

    pos, neg = scores[positive].numpy(), scores[~positive].numpy()
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


def top_jaccard(before: torch.Tensor, after: torch.Tensor, k: int = 100) -> float:
    """|A ∩ B| / |A ∪ B| of the indices of the k highest scores before and after (stable ties)."""
    k = min(k, len(before))
    a = set(torch.sort(before, descending=True, stable=True).indices[:k].tolist())
    b = set(torch.sort(after, descending=True, stable=True).indices[:k].tolist())
    return len(a & b) / len(a | b)


def similarity_to_target(image: torch.Tensor, target: torch.Tensor) -> dict:
    """Pearson (scipy) and SSIM (scikit-image, data range 1) between a CHW image and the CHW target."""
    from scipy.stats import pearsonr
    from skimage.metrics import structural_similarity

    a, b = image.detach().double().cpu().numpy(), target.detach().double().cpu().numpy()
    if a.std() == 0 or b.std() == 0:
        r = float("nan")
    else:
        r = float(pearsonr(a.ravel(), b.ravel()).statistic)
    if a.shape[0] == 1:
        s = structural_similarity(a[0], b[0], data_range=1.0)
    else:
        s = structural_similarity(a, b, data_range=1.0, channel_axis=0)
    return {"pearson": r, "ssim": float(s), "image_std": float(a.std())}


def _start_gradient(model, layer, unit, param, seed):
    """∇ of the unit at the visualization's start (fvtrust's seeded noise), in `param` space."""
    from ...visualize.param import make_param, seed_generators

    prm = make_param(param, (1, *model.input_shape), generators=seed_generators(seed, [(unit, 0)]),
                     device=model.device)
    with LayerTap(model, [layer]) as tap:
        a = unit_activation(tap(prm.image())[layer], unit)
    (g,) = torch.autograd.grad(a.sum(), prm.tensor)
    return g


def stronger_transforms(size: int) -> T.TransformSpec:
    """The standard chain at `size` with every magnitude doubled: pad and jitters x2, scales 0.8..1.2,
    rotations -20..20 degrees (0 with 5 extra draws, as the standard chain)."""
    std = T.TransformSpec.standard(size)
    return T.TransformSpec(pad=2 * std.pad, jitter1=2 * std.jitter1, jitter2=2 * std.jitter2,
                           scales=tuple(1 + (i - 5) / 25.0 for i in range(11)),
                           angles=tuple(list(range(-20, 21, 2)) + 5 * [0]))


def defense_settings(original, layer, unit, param: str = "fft", seed: int = 0) -> list[dict]:
    """The standard visualization and one change per defense; thresholds calibrated on the *original*.

    The auditor does not know the model was manipulated, so SGD's lr and the
    clipping norm come from the original model: SGD's lr makes its first step
    as large (RMS) as Adam's (lr 0.05), and gradients are clipped to the norm
    the original model's gradient has at the start.
    """
    g = _start_gradient(original, layer, unit, param, seed)
    rms, norm = float(g.pow(2).mean().sqrt()), float(g.norm())
    other = "pixel" if param == "fft" else "fft"
    base = {"param": param, "optimizer": "adam", "lr": 0.05, "transforms": "standard"}
    return [
        {"name": "standard", **base},
        {"name": "gradient clipping", **base, "grad_clip": norm},
        {"name": "stronger transforms", **base, "transforms": stronger_transforms(int(original.input_shape[1]))},
        {"name": "no transforms", **base, "transforms": "none"},
        {"name": "SGD", **base, "optimizer": "sgd", "lr": 0.05 / max(rms, 1e-12)},
        {"name": f"{other} parameterization", **base, "param": other},
    ]


def visualize_starts(model, layer, unit, settings: dict, steps: int, seed: int, n: int = 1):
    """(final images (n, C, H, W), final objectives (n,)) of the unit's visualization from n starts, one batched call.

    The unit repeated n times gives n starts (visualize's replicates); start 0
    is the seed's own: the same start noise and transforms as a single
    visualization with the same settings and seed (one generator per image).
    Only up to rounding, though: a batch of n runs other float kernels than a
    batch of 1, and the optimization amplifies that chaotically. Measured on
    the fc:0 slingshot: 2e-7 apart after 32 steps, up to 0.24 per pixel
    after 512, Pearson to the target 0.601 here against 0.630 alone. One
    start's Pearson is one sample; read the median over starts.
    """
    from ...visualize import visualize

    kw = {k: v for k, v in settings.items() if k != "name"}
    res = visualize(model, layer, [unit] * n, steps=steps, objective="channel", seed=seed,
                    progress_desc=f"visualize {settings['name']}" + (f", {n} starts" if n > 1 else ""), **kw)
    return res.final, res.objective[-1]


def standard_across_starts(model, layer, unit, settings: dict, steps: int, seed: int, n: int,
                           target_image: torch.Tensor) -> list[float]:
    """Pearson to the target of the unit's visualization from n starts (`visualize_starts`)."""
    finals, _ = visualize_starts(model, layer, unit, settings, steps, seed, n)
    return [similarity_to_target(v, target_image)["pearson"] for v in finals]


def slingshot_report(original, manipulated, target_image: torch.Tensor, heldout, *, layer: str, unit: int,
                     steps: int = 512, seed: int = 0, param: str = "fft", top_k: int = 100,
                     spread_starts: int = 4) -> tuple[dict, dict]:
    """report.json's measures and the images for the figure (see the module docstring)."""
    x, y = heldout
    acc0, acc1 = evaluate(original, (x, y)), evaluate(manipulated, (x, y))
    s0, s1 = unit_scores(original, layer, unit, x), unit_scores(manipulated, layer, unit, x)
    labelled = bool((y >= 0).all()) and len(torch.unique(y)) > 1
    natural = {"heldout_images": len(x),
               "top1_before": acc0["top1"], "top1_after": acc1["top1"],
               "top1_drop_pp": 100.0 * (acc0["top1"] - acc1["top1"]),
               "top5_before": acc0["top5"], "top5_after": acc1["top5"],
               "predictions_changed": int((acc0["predictions"] != acc1["predictions"]).sum()),
               f"top{top_k}_jaccard": top_jaccard(s0, s1, top_k),
               "activation_pearson": float(np.corrcoef(s0.numpy(), s1.numpy())[0, 1])}
    if labelled:
        classes = torch.unique(y)
        means = torch.stack([s0[y == c].mean() for c in classes])
        own = int(classes[int(means.argmax())])
        a0, a1 = auroc(s0, y == own), auroc(s1, y == own)
        names = original.class_names
        natural.update({"own_class": own, "own_class_name": names[own] if names and 0 <= own < len(names) else str(own),
                        "own_class_auroc_before": a0, "own_class_auroc_after": a1,
                        "own_class_auroc_change": a1 - a0})
    else:
        natural.update({"own_class": None, "own_class_auroc_before": None, "own_class_auroc_after": None,
                        "own_class_auroc_change": None, "own_class_note": "held-out data has no labels"})
    defenses, images = [], {"target": target_image, "before": [], "after": [], "names": []}
    spread = None
    for i, st in enumerate(defense_settings(original, layer, unit, param, seed)):
        n = max(1, spread_starts) if i == 0 else 1  # the standard one from several starts; its start 0 is the headline
        (f0, o0), (f1, o1) = (visualize_starts(m, layer, unit, st, steps, seed, n) for m in (original, manipulated))
        if n > 1:
            r0, r1 = ([similarity_to_target(v, target_image)["pearson"] for v in f] for f in (f0, f1))
            spread = {"starts": n, "pearson_before": r0, "pearson_after": r1,
                      "median_pearson_before": float(np.median(r0)), "median_pearson_after": float(np.median(r1)),
                      "min_pearson_after": float(min(r1)), "max_pearson_after": float(max(r1))}
        v0, v1, o0, o1 = f0[0], f1[0], float(o0[0]), float(o1[0])
        b, a = similarity_to_target(v0, target_image), similarity_to_target(v1, target_image)
        settings = {k: (v.to_dict() if isinstance(v, T.TransformSpec) else v) for k, v in st.items() if k != "name"}
        defenses.append({"name": st["name"], "settings": settings,
                         "pearson_before": b["pearson"], "pearson_after": a["pearson"],
                         "ssim_before": b["ssim"], "ssim_after": a["ssim"],
                         # a near-constant image (a visualization that never left its start) has a meaningless r
                         "image_std_before": b["image_std"], "image_std_after": a["image_std"],
                         "objective_before": o0, "objective_after": o1,
                         "undoes_slingshot": bool(not a["pearson"] >= UNDONE_BELOW)})
        images["before"].append(v0)
        images["after"].append(v1)
        images["names"].append(st["name"])
    std = defenses[0]
    manipulated_ok = std["pearson_after"] >= UNDONE_BELOW
    if not manipulated_ok:  # nothing to undo: the standard visualization does not show the target
        for d in defenses:
            d["undoes_slingshot"] = None
    report = {"natural": natural,
              "visualization": {"steps": steps, "seed": seed, "objective": "channel",
                                "pearson_before": std["pearson_before"], "pearson_after": std["pearson_after"],
                                "ssim_before": std["ssim_before"], "ssim_after": std["ssim_after"],
                                "image_std_before": std["image_std_before"],
                                "image_std_after": std["image_std_after"], "across_starts": spread},
              "slingshot_succeeded": bool(manipulated_ok),
              "defenses": defenses[1:],
              "undone_by": [d["name"] for d in defenses[1:] if d["undoes_slingshot"]] if manipulated_ok else None,
              "undone_threshold_pearson": UNDONE_BELOW}
    return report, images


def slingshot_figure(report: dict, images: dict, title: str):
    """Rows: original, slingshot model. Columns: the target, then the standard visualization and each defense."""
    from ...visualize.output import grid_figure

    t = images["target"]
    rows = [[t] + list(images["before"]), [t] + list(images["after"])]
    std = report["visualization"]
    ds = report["defenses"]
    cols = ["target"] + [f"{n}\nr={p0:.2f} → {p1:.2f}" for n, p0, p1 in
                         zip(images["names"], [std["pearson_before"]] + [d["pearson_before"] for d in ds],
                             [std["pearson_after"]] + [d["pearson_after"] for d in ds])]
    return grid_figure(rows, ["original", "slingshot"], cols, title=title)
