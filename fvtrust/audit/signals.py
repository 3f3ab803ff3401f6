"""Per-unit signals from probes, batched over units (see fvtrust/audit/__init__.py for the why).

Each function takes stacked tensors with the unit as the first dimension and
returns one value per unit. None of them looks at the model's modules.
"""
from __future__ import annotations

import torch


MIN_PROFILE_CHANNELS = 2  # a mechanism is a direction among input channels: with one channel there is none


def _no_direction(profile_width: int) -> bool:
    """True where a layer input has fewer than MIN_PROFILE_CHANNELS channels, so the mechanism signals are undefined.

    Why: with one input channel (fashion-cnn's first block reads the grey image) a profile is a single number
    and the cosine between two of them is only a sign, +-1. For a conv unit that sign is the sign of the sum
    of its kernel weights over the positions where it is active; an edge detector's weights sum to about 0,
    so the sign is set by which border positions are active and flips between natural images (black
    borders) and visualizations (texture up to the border). Measured on clean fashion-cnn block1: 9 of 32
    trained and 6 of 32 random-init units flagged this way, at agreement -1.
    """
    return profile_width < MIN_PROFILE_CHANNELS


def _unit_vectors(v: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(v / ||v||, nonzero mask) along the last dimension, in float64 (gradients can be tiny)."""
    v = v.double()
    n = v.norm(dim=-1, keepdim=True)
    ok = n[..., 0] > eps * max(1.0, float(n.max()) if n.numel() else 1.0)
    return torch.where(ok[..., None], v / n.clamp_min(1e-300), torch.zeros_like(v)), ok


def gradient_agreement(natural_grads: torch.Tensor, vis_grads: torch.Tensor) -> dict:
    """Do the unit's top natural images and its visualization use the same mechanism?

    natural_grads (U, k, D), vis_grads (U, r, D): gradients of the unit w.r.t.
    the layer's input. Returns per unit `agreement` = cos(mean natural
    direction, mean visualization direction) — NaN where the unit has no
    gradient on its own top natural images (nothing to compare with), 0 where
    the visualization's gradient vanishes but the natural one does not — and
    `natural_coherence`, the same cosine between the natural directions
    themselves (how much a unit's mechanism varies over natural images: the
    reference a low agreement should be read against).
    """
    nat, nat_ok = _unit_vectors(natural_grads)
    vis, vis_ok = _unit_vectors(vis_grads)
    mean_nat, mn_ok = _unit_vectors(nat.sum(1))
    mean_vis, mv_ok = _unit_vectors(vis.sum(1))
    agree = (mean_nat * mean_vis).sum(-1)
    agree = torch.where(mn_ok, agree, torch.full_like(agree, float("nan")))
    if _no_direction(natural_grads.shape[-1]):
        agree = torch.full_like(agree, float("nan"))
    k = nat.shape[1]
    if k > 1:
        gram = nat @ nat.transpose(1, 2)
        pairs = nat_ok.double()[:, :, None] * nat_ok.double()[:, None, :]
        pairs = pairs - torch.diag_embed(torch.diagonal(pairs, dim1=1, dim2=2))
        coherence = (gram * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)
        coherence = torch.where(pairs.sum((1, 2)) > 0, coherence, torch.full_like(coherence, float("nan")))
    else:
        coherence = torch.full((nat.shape[0],), float("nan"), dtype=torch.float64)
    return {"agreement": agree.float(), "natural_coherence": coherence.float(),
            "vis_gradient_zero": (~mv_ok) & mn_ok}


def path_jump(values: torch.Tensor, image_grads: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Largest part of the unit's change along a straight path that its gradient cannot account for.

    values (U, P, T+1): the unit at x_t = x_n + t·(x_v − x_n), t = 0, 1/T, …, 1,
    from P natural starts x_n to the visualization x_v; image_grads
    (U, P, T+1, D) the gradients there; direction (U, P, D) = x_v − x_n.
    For a function that is continuous along the path the trapezoid rule
    predicts each step's change, Δpred_i = ½(g_i + g_{i+1})·d / T, up to the
    curvature inside a step; a hard gate (a switch the gradient never sees)
    adds its whole jump to one step. Per start: max_i |Δa_i − Δpred_i| /
    Σ_i |Δa_i| (in [0, 1]: 1 = the whole change is one unexplained jump);
    per unit the median over starts. NaN where the unit does not change.
    """
    t = values.shape[-1] - 1
    slope = (image_grads.double() * direction.double()[:, :, None, :]).sum(-1)  # (U, P, T+1)
    pred = 0.5 * (slope[..., 1:] + slope[..., :-1]) / t
    delta = values.double()[..., 1:] - values.double()[..., :-1]
    resid = (delta - pred).abs()
    total = delta.abs().sum(-1)
    scale = values.double().abs().amax(-1).clamp_min(1e-30)
    ratio = resid.amax(-1) / total.clamp_min(1e-30)
    ratio = torch.where(total > 1e-6 * scale, ratio.clamp(max=1.0), torch.full_like(ratio, float("nan")))
    return ratio.nanmedian(dim=1).values.float()


def evidence(value: torch.Tensor, threshold: float, width: float, higher_is_suspicious: bool) -> torch.Tensor:
    """Map a signal to [0, 1]: 0.5 exactly at its threshold, linear over ±width, clipped; NaN -> 0."""
    z = (value - threshold) if higher_is_suspicious else (threshold - value)
    e = (0.5 + z / (2 * width)).clamp(0, 1)
    return torch.nan_to_num(e, nan=0.0)


def probe_agreement(natural_grads: torch.Tensor, probe_grads: torch.Tensor, probe_image_grads: torch.Tensor) -> dict:
    """The worst mechanism agreement over a unit's strongest probe images (see `strongest_images`).

    natural_grads (U, k, D): layer-input gradient profiles on the unit's top
    natural images; probe_grads (U, r, D): the same on the r probe images
    that drive the unit hardest (its own and the other units'
    visualizations, under every probe setting); probe_image_grads (U, r, Dx):
    the gradient w.r.t. the image there. Per probe j: c_j = cos(n̄, p_j) with
    n̄ the normalized sum of the normalized natural profiles (as in
    `gradient_agreement`); c_j = 0 where p_j vanishes but the image gradient
    does not (the unit is driven around the layer input); undefined (NaN)
    where the image gradient vanishes too (the unit is dead there: no
    mechanism at all). Returns `agreement` = min_j c_j over defined probes
    (NaN if none, or if the unit has no natural gradient) and `worst` = the
    index j of that probe.

    Why the minimum: for a linear or conv unit the profile does not depend on
    the input wherever the unit is active, so *every* c_j of a clean unit
    sits near 1, and one probe image that reaches a hidden branch (a silent
    unit's ΔΘ⊥ switched on, a circuit's gate closed) is enough evidence.
    """
    nat, _ = _unit_vectors(natural_grads)
    mean_nat, mn_ok = _unit_vectors(nat.sum(1))
    prb, p_ok = _unit_vectors(probe_grads)
    img_ok = probe_image_grads.abs().amax(-1) > 0
    cos = (prb * mean_nat[:, None, :]).sum(-1)                       # (U, r); 0 where p_j vanished
    defined = img_ok & mn_ok[:, None]
    cos = torch.where(defined, cos, torch.full_like(cos, float("inf")))
    worst_val, worst = cos.min(1)
    agree = torch.where(torch.isfinite(worst_val), worst_val, torch.full_like(worst_val, float("nan")))
    if _no_direction(natural_grads.shape[-1]):
        agree = torch.full_like(agree, float("nan"))
    return {"agreement": agree.float(), "worst": worst, "bypass": (~p_ok) & img_ok}


def start_gap(std_values: torch.Tensor, wide_values: torch.Tensor, distances: torch.Tensor,
              natural_grad_norm: torch.Tensor) -> dict:
    """How far apart the unit is at the visualization's own start images and at slightly wider starts.

    std_values (U, S): the unit at S standard start images x_s (the
    visualization's start distribution); wide_values (U, W, S): at S start
    images x'_{w,s} of each of W wider noise scales; distances (W, S) =
    ‖x'_{w,s} − x_s‖ (pixels, the same images for every unit);
    natural_grad_norm (U,): G = the median over the unit's top natural
    images of ‖∇ₓ a‖. Per scale w: the median over s of

        |a(x'_{w,s}) − a(x_s)| / (G · ‖x'_{w,s} − x_s‖),

    the change between the two starts as a fraction of what a unit as steep
    as on its natural images could change over that distance at most (by
    the mean value theorem, ≤ 1 when the landscape between them is no
    steeper than on natural images). `gap` is the largest over the scales,
    `worst_scale` its index; NaN where G = 0 (no gradient on natural images:
    nothing to scale with).

    Why: the two starts differ only by faint random noise on grey, a
    direction nearly orthogonal to any gradient, so a clean unit changes by a
    small fraction of G·distance (fashion-cnn clean: at most ~0.5, on
    block3, where noise excites edge filters). A gradient slingshot builds
    its tunnel from exactly the visualization's start distribution: to sling
    the image to its target with a climb that ends at natural-looking
    heights, the fine-tune sinks the start into a trench far below the
    landscape around it, which starts drawn with a little more noise do not
    share.
    """
    d = distances.double()[None]                                   # (1, W, S)
    g = natural_grad_norm.double()[:, None, None]                  # (U, 1, 1)
    ratio = (wide_values.double() - std_values.double()[:, None, :]).abs() / (g * d).clamp_min(1e-30)
    per_scale = ratio.median(dim=2).values                         # (U, W)
    gap, worst = per_scale.max(dim=1)
    gap = torch.where(natural_grad_norm.double() > 0, gap, torch.full_like(gap, float("nan")))
    return {"gap": gap.float(), "worst_scale": worst, "per_scale": per_scale.float()}
