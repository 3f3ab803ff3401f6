"""Measure what the silent-units construction promises, on held-out natural images."""
from __future__ import annotations

import torch

from ...models.hooks import LayerTap
from .build import silent_bias


def mean_pairwise_correlation(images: torch.Tensor) -> float:
    """Mean off-diagonal Pearson correlation between flattened images (NaN pairs ignored)."""
    from ...sanity.similarity import similarity

    n = len(images)
    s = similarity(images.reshape(n, -1), metric="pearson")
    off = s[~torch.eye(n, dtype=torch.bool)]
    return float(off[~off.isnan()].mean())


@torch.no_grad()
def leaks(manipulated, heldout, batch_size: int = 500) -> dict:
    """How often and how strongly the silent term Δy fires on held-out natural images (streamed)."""
    from ...data.natural import batches_of

    info = manipulated.silent_info
    sconv = manipulated.net.get_submodule(info["conv"])
    captured = {}
    h = sconv.register_forward_pre_hook(lambda m, inp: captured.__setitem__("x", inp[0]))
    fired, n = 0, 0
    unit_max = torch.zeros(len(info["units"]))
    try:
        with LayerTap(manipulated, [info["conv"]]) as tap:
            for xb, _ in batches_of(heldout, batch_size):
                tap(xb.to(manipulated.device))
                pre = sconv.raw_silent(captured["x"]) + sconv.bias_bar.view(1, -1, 1, 1)
                dy = torch.relu(pre).amax((2, 3)).cpu()
                fired += int((dy > 0).any(1).sum())
                n += len(xb)
                unit_max = torch.maximum(unit_max, dy.amax(0))
    finally:
        h.remove()
    return {"images_with_leak": fired, "fraction_images_with_leak": fired / max(n, 1),
            "units_leaking": int((unit_max > 0).sum()), "max_leak": float(unit_max.max())}


@torch.no_grad()
def heldout_outputs(original, manipulated, heldout, batch_size: int = 250) -> dict:
    """Bit-identical outputs and top-1/top-5 before/after, streamed over held-out images.

    Unlabelled images (pictures) are scored against the original model's own
    predictions, so "top-1" there is agreement with the original.
    """
    from ...data.natural import batches_of
    from ...progress import progress

    n = same = 0
    max_diff = 0.0
    hits = {"top1_before": 0, "top5_before": 0, "top1_after": 0, "top5_after": 0}
    labelled = True
    for xb, yb in progress(batches_of(heldout, batch_size), desc="held-out check", unit="batch"):
        xb = xb.to(original.device)
        a, b = original(xb).float(), manipulated(xb).float()
        if (yb < 0).any():
            labelled = False
            yb = a.argmax(1).cpu()
        same += int((a == b).all(1).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
        for tag, logits in (("before", a), ("after", b)):
            top = logits.topk(min(5, logits.shape[1]), 1).indices.cpu()
            hits[f"top1_{tag}"] += int((top[:, 0] == yb).sum())
            hits[f"top5_{tag}"] += int((top == yb[:, None]).any(1).sum())
        n += len(xb)
    if n == 0:
        from ...errors import FvtrustError

        raise FvtrustError("no held-out images to check the manipulation on")
    return {"n": n, "fraction_outputs_bit_identical": same / n, "max_output_difference": max_diff,
            "labels": "dataset labels" if labelled else "the original model's predictions (unlabelled images)",
            **{k: v / n for k, v in hits.items()}}


def silent_report(original, manipulated, heldout, *, vis_units=None, steps: int = 256, seed: int = 0,
                  margins=(0.0, 0.1, 0.25, 0.5)) -> tuple[dict, dict]:
    """Numbers for report.json, and the before/after visualizations for the figure.

    heldout: a NaturalData part, an (images, labels) pair or an images tensor;
    it is streamed in batches, never held whole. Visualization similarity is measured two ways. Shared start (the headline):
    every unit starts from the same noise, so any difference between two units'
    images is the units' doing. Independent starts: each unit its own noise; on
    small grey images the phase of fine stripes then differs from start to start
    even for one and the same unit, so we also report that ceiling (one unit,
    as many starts as units) to show how close the manipulated units get to it.
    """
    from ...visualize import visualize

    info = manipulated.silent_info
    outputs = heldout_outputs(original, manipulated, heldout)
    x = heldout
    units = vis_units if vis_units is not None else info["units"][:16]

    def vis(m, us, shared):
        return visualize(m, info["layer"], us, steps=steps, objective="channel", seed=seed, shared_start=shared)

    v0, v1 = vis(original, units, True), vis(manipulated, units, True)
    w0, w1 = vis(original, units, False), vis(manipulated, units, False)
    ceiling = vis(manipulated, [units[0]] * len(units), False)
    sconv = manipulated.net.get_submodule(info["conv"])
    base_bias = sconv.bias_bar.clone()
    ymax = torch.tensor(info["natural_max"])
    base_leaks = leaks(manipulated, x)
    tradeoff = []
    try:
        for m in margins:
            if m == info["margin"]:  # the construction itself: already measured
                lk, vm = base_leaks, v1
            else:
                sconv.bias_bar.copy_(silent_bias(ymax, m))
                lk, vm = leaks(manipulated, x), vis(manipulated, units, True)
            tradeoff.append({"margin": m, **lk, "mean_pairwise_correlation": mean_pairwise_correlation(vm.final),
                             "mean_objective": float(vm.objective[-1].mean())})
    finally:
        sconv.bias_bar.copy_(base_bias)
    report = {
        "construction": info, "heldout_images": outputs["n"],
        "fraction_outputs_bit_identical": outputs["fraction_outputs_bit_identical"],
        "max_output_difference": outputs["max_output_difference"],
        "leaks": base_leaks, "accuracy_labels": outputs["labels"],
        "top1_before": outputs["top1_before"], "top1_after": outputs["top1_after"],
        "top5_before": outputs["top5_before"], "top5_after": outputs["top5_after"],
        "visualized_units": list(units), "visualization_steps": steps,
        "mean_pairwise_correlation_before": mean_pairwise_correlation(v0.final),
        "mean_pairwise_correlation_after": mean_pairwise_correlation(v1.final),
        "independent_starts": {
            "mean_pairwise_correlation_before": mean_pairwise_correlation(w0.final),
            "mean_pairwise_correlation_after": mean_pairwise_correlation(w1.final),
            "same_unit_ceiling": mean_pairwise_correlation(ceiling.final)},
        "mean_objective_before": float(v0.objective[-1].mean()),
        "mean_objective_after": float(v1.objective[-1].mean()),
        "margin_tradeoff": tradeoff,
    }
    return report, {"before": v0.final, "after": v1.final, "after_independent": w1.final, "units": list(units)}


def figure5(report: dict, vis: dict, title: str):
    """Before/after grid: original and silent units from a shared start, and silent units from their own starts."""
    from ...visualize.output import grid_figure

    ind = report["independent_starts"]
    rows = [list(vis["before"]), list(vis["after"]), list(vis["after_independent"])]
    labels = [f"original\n(r={report['mean_pairwise_correlation_before']:.2f})",
              f"silent units\n(r={report['mean_pairwise_correlation_after']:.2f})",
              f"silent, own starts\n(r={ind['mean_pairwise_correlation_after']:.2f})"]
    return grid_figure(rows, labels, [f"unit {u}" for u in vis["units"]], title=title)
