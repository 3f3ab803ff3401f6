"""Measure what the silent-units construction promises, on held-out natural images."""
from __future__ import annotations

import torch

from ..evaluate import evaluate, predict
from ..models.hooks import LayerTap


def mean_pairwise_correlation(images: torch.Tensor) -> float:
    """Mean off-diagonal Pearson correlation between flattened images (NaN pairs ignored)."""
    from ..sanity.similarity import similarity

    n = len(images)
    s = similarity(images.reshape(n, -1), metric="pearson")
    off = s[~torch.eye(n, dtype=torch.bool)]
    return float(off[~off.isnan()].mean())


@torch.no_grad()
def leaks(manipulated, heldout: torch.Tensor, batch_size: int = 500) -> dict:
    """How often and how strongly the silent term Δy fires on held-out natural images."""
    info = manipulated.silent_info
    sconv = manipulated.net.get_submodule(info["conv"])
    captured = {}
    h = sconv.register_forward_pre_hook(lambda m, inp: captured.__setitem__("x", inp[0]))
    fired_images = torch.zeros(len(heldout), dtype=torch.bool)
    unit_max = torch.zeros(len(info["units"]))
    try:
        with LayerTap(manipulated, [info["conv"]]) as tap:
            for i in range(0, len(heldout), batch_size):
                tap(heldout[i:i + batch_size].to(manipulated.device))
                pre = sconv.raw_silent(captured["x"]) + sconv.bias_bar.view(1, -1, 1, 1)
                dy = torch.relu(pre).amax((2, 3)).cpu()
                fired_images[i:i + batch_size] = (dy > 0).any(1)
                unit_max = torch.maximum(unit_max, dy.amax(0))
    finally:
        h.remove()
    return {"images_with_leak": int(fired_images.sum()), "fraction_images_with_leak": float(fired_images.float().mean()),
            "units_leaking": int((unit_max > 0).sum()), "max_leak": float(unit_max.max())}


def silent_report(original, manipulated, heldout, *, vis_units=None, steps: int = 256, seed: int = 0,
                  margins=(0.0, 0.1, 0.25, 0.5)) -> tuple[dict, dict]:
    """Numbers for report.json, and the before/after visualizations for the figure."""
    from ..visualize import visualize

    x, y = heldout
    info = manipulated.silent_info
    a, b = predict(original, x, 1000), predict(manipulated, x, 1000)
    identical = (a == b).all(1)
    before, after = evaluate(original, (x, y)), evaluate(manipulated, (x, y))
    units = vis_units if vis_units is not None else info["units"][:16]
    v0 = visualize(original, info["layer"], units, steps=steps, objective="channel", seed=seed)
    v1 = visualize(manipulated, info["layer"], units, steps=steps, objective="channel", seed=seed)
    corr0, corr1 = mean_pairwise_correlation(v0.final), mean_pairwise_correlation(v1.final)
    sconv = manipulated.net.get_submodule(info["conv"])
    base_bias = sconv.bias_bar.clone()
    ymax = torch.tensor(info["natural_max"])
    tradeoff = []
    try:
        for m in margins:
            sconv.bias_bar.copy_(-(1.0 + m) * ymax)
            lk = leaks(manipulated, x)
            vm = visualize(manipulated, info["layer"], units, steps=steps, objective="channel", seed=seed)
            tradeoff.append({"margin": m, **lk, "mean_pairwise_correlation": mean_pairwise_correlation(vm.final),
                             "mean_objective": float(vm.objective[-1].mean())})
    finally:
        sconv.bias_bar.copy_(base_bias)
    report = {
        "construction": info, "heldout_images": len(x),
        "fraction_outputs_bit_identical": float(identical.float().mean()),
        "max_output_difference": float((a - b).abs().max()),
        "leaks": leaks(manipulated, x),
        "top1_before": before["top1"], "top1_after": after["top1"],
        "top5_before": before["top5"], "top5_after": after["top5"],
        "visualized_units": list(units), "visualization_steps": steps,
        "mean_pairwise_correlation_before": corr0, "mean_pairwise_correlation_after": corr1,
        "margin_tradeoff": tradeoff,
    }
    return report, {"before": v0.final, "after": v1.final, "units": list(units)}
