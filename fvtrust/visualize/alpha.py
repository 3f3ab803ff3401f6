"""Transparency (alpha) for visualizations: where the objective cares, per pixel.

Fel et al. (MACO, 2023) show each visualization with an alpha mask: the sum
over the run of |d objective / d image|, the pixels the optimization kept
pushing on. We accumulate it from `visualize`'s per-step image gradients (one
extra output of the same backward pass) and scale each image's mask to a
maximum of 1; an image whose gradient was always zero gets alpha 0.
"""
from __future__ import annotations

import torch

from .render import VisualizationResult, visualize


def visualize_transparent(model, layer, units="all", *, on_step=None, **kwargs) -> VisualizationResult:
    """`visualize(...)` plus `result.alpha` (units x C x H x W in [0, 1]); any param, typically `maco`."""
    acc: dict = {}

    def accumulate(step, images, grads, sl):
        a = grads.abs()
        key = (sl.start, sl.stop)
        acc[key] = acc[key] + a if key in acc else a.clone()
        if on_step is not None:
            on_step(step, images, grads, sl)

    res = visualize(model, layer, units, on_step=accumulate, **kwargs)
    n = len(res.units)
    alpha = torch.zeros(n, *res.images.shape[2:])
    for (a, b), v in acc.items():
        alpha[a:b] = v.cpu()
    peak = alpha.flatten(1).amax(1).view(-1, 1, 1, 1)
    res.alpha = torch.where(peak > 0, alpha / peak.clamp(min=1e-30), torch.zeros_like(alpha))
    res.settings["alpha"] = "sum |d objective / d image|, per-image max 1"
    return res


def composite(images: torch.Tensor, alpha: torch.Tensor, background: float = 1.0) -> torch.Tensor:
    """Images over a flat background through their (channel-mean) alpha, for display."""
    a = alpha.mean(1, keepdim=True)
    return images * a + background * (1 - a)


__all__ = ["visualize_transparent", "composite"]
