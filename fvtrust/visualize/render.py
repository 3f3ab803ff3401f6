"""The optimization loop: many units at once, one forward/backward per step.

Speed comes from four choices lucent does not make: the forward pass stops
at the deepest layer the objective needs; gradients are taken with
`torch.autograd.grad` w.r.t. the image parameters only (no weight gradients);
the random transforms are one fused resampling; and all units of a layer are
optimized as one batch, chunked automatically to fit memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FvtrustError
from ..models.hooks import LayerTap
from ..models.layers import layer_units, parse_units
from ..progress import progress
from . import transforms as T
from .objectives import make_objective
from .param import make_param, seed_generators


@dataclass
class VisualizationResult:
    """images: thresholds x units x C x H x W in [0, 1]; objective: thresholds x units.

    `objective` is measured on the clean (untransformed) image at each
    threshold. With `record_gradients`, `gradients` (steps x units x C x H x W)
    holds d objective / d image at each step and `trajectory`
    (steps + 1 x units x C x H x W) the image before each step and at the end.
    """

    images: torch.Tensor
    objective: torch.Tensor
    thresholds: tuple
    units: list
    layer: str
    settings: dict = field(default_factory=dict)
    gradients: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        return self.images[-1]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "units": list(self.units), "thresholds": list(self.thresholds),
                "objective": self.objective.tolist(), "settings": self.settings}


def _check_thresholds(thresholds, steps) -> tuple:
    th = tuple(sorted({int(t) for t in thresholds}))
    if steps < 1:
        raise FvtrustError(f"steps must be >= 1, got {steps}")
    if not th or th[0] < 1 or th[-1] > steps:
        raise FvtrustError(f"thresholds {list(thresholds)} must lie in 1..steps ({steps})")
    return th


def _auto_chunk(model, n_images: int, shape, record: bool) -> int:
    """Images per chunk: bounded by free GPU memory, or a CPU budget of ~4 GB."""
    c, h, w = shape
    per_image = 4 * c * h * w * 200  # rough: activations saved for backward, dominated by early layers
    if hasattr(model, "input_shape") and model.input_shape[-1] >= 128:
        per_image *= 4
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = free * 0.5
    else:
        budget = 4e9
    if record:
        budget /= 2
    return int(max(1, min(n_images, budget // per_image)))


def visualize(model, layer: str, units="all", *, steps: int = 512, thresholds=None, size=None,
              param: str = "fft", decorrelate: bool = True, transforms="standard", objective="neuron",
              lr: float = 0.05, optimizer: str = "adam", seed: int = 0, start: torch.Tensor | None = None,
              record_gradients: bool = False, record_images: bool | None = None, chunk_size: int | None = None,
              directions=None, groups=None, on_step=None, progress_desc: str | None = None) -> VisualizationResult:
    """Feature visualization by activation maximization, batched over units.

    `units` may repeat a unit (e.g. several starts per unit); each entry gets its
    own image. `start` (units x C x H x W in [0, 1]) begins from given images
    instead of noise. `on_step(step, images, grads, chunk_slice)` lets callers
    stream per-step data without storing it.
    """
    n_units = layer_units(model, layer)
    if isinstance(units, (list, tuple)) and units and all(isinstance(u, (int, np.integer)) for u in units):
        bad = [u for u in units if not 0 <= int(u) < n_units]
        if bad:
            raise FvtrustError(f"unit {bad[0]} out of range for {layer}: valid units are 0..{n_units - 1}")
        units = [int(u) for u in units]
    else:
        units = parse_units(units, n_units, layer)
    thresholds = _check_thresholds(thresholds if thresholds is not None else (steps,), steps)
    c = model.input_shape[0]
    if size is None:
        hw = tuple(model.input_shape[1:])
    elif isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise FvtrustError(f"bad image size {size!r}")
    model_hw = tuple(model.input_shape[1:])
    tspec = T.resolve_transforms(transforms, hw[0])
    if tspec is None and hw != model_hw and model_hw[0] >= 1:
        # without transforms the image goes to the model as it is
        pass
    crop = model_hw if tspec is not None else None
    obj = make_objective(objective, layer, directions=directions)
    if optimizer not in ("adam", "sgd"):
        raise FvtrustError(f"unknown optimizer {optimizer!r}; choose adam or sgd")
    n = len(units)
    if start is not None and tuple(start.shape) != (n, c, *hw):
        raise FvtrustError(f"start must have shape {(n, c, *hw)} (units x C x H x W), got {tuple(start.shape)}")
    record_images = record_gradients if record_images is None else record_images
    chunk = chunk_size or _auto_chunk(model, n, (c, *hw), record_gradients or record_images)

    device = model.device
    keys = []
    seen: dict[int, int] = {}
    for u in units:  # (unit, replicate): the same unit twice gets two different starts
        keys.append((u, seen.get(u, 0)))
        seen[u] = seen.get(u, 0) + 1
    groups_t = torch.as_tensor(groups if groups is not None else units, device=device)

    images = torch.empty(len(thresholds), n, c, *hw)
    values = torch.empty(len(thresholds), n)
    grads_all = torch.empty(steps, n, c, *hw) if record_gradients else None
    traj_all = torch.empty(steps + 1, n, c, *hw) if record_images else None

    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # no weight gradients, ever
    bar = progress(total=steps * math.ceil(n / chunk), desc=progress_desc or f"visualize {layer}", unit="step")
    try:
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(n, c0 + chunk))
            _run_chunk(model, obj, units[sl], keys[sl], groups_t[sl], sl, steps, thresholds, (c, *hw), param,
                       decorrelate, tspec, crop, lr, optimizer, seed, start[sl] if start is not None else None,
                       images, values, grads_all, traj_all, on_step, bar, device)
    finally:
        bar.close()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    settings = {"steps": steps, "param": param, "decorrelate": decorrelate, "lr": lr, "optimizer": optimizer,
                "seed": seed, "objective": repr(obj), "size": list(hw),
                "transforms": tspec.to_dict() if tspec else None, "start": start is not None}
    return VisualizationResult(images, values, thresholds, list(units), layer, settings, grads_all, traj_all)


def _run_chunk(model, obj, units, keys, groups, sl, steps, thresholds, chw, param, decorrelate, tspec, crop, lr,
               optimizer, seed, start, images, values, grads_all, traj_all, on_step, bar, device):
    n = len(units)
    gens = seed_generators(seed, keys)
    prm = make_param(param, (n, *chw), decorrelate=decorrelate, generators=gens, start=start, device=device)
    opt = (torch.optim.Adam([prm.tensor], lr=lr) if optimizer == "adam"
           else torch.optim.SGD([prm.tensor], lr=lr))
    rng = np.random.default_rng(seed)  # transform draws: shared by the batch and by every chunk
    u_t = torch.as_tensor(units, device=device)
    layers = list(obj.layers)
    want_img_grad = grads_all is not None or on_step is not None
    t_index = {t: i for i, t in enumerate(thresholds)}
    with LayerTap(model, layers) as tap:
        _loop(tap, prm, opt, rng, obj, u_t, groups, sl, steps, tspec, crop, t_index, want_img_grad, images,
              values, grads_all, traj_all, on_step, bar)


def _loop(tap, prm, opt, rng, obj, u_t, groups, sl, steps, tspec, crop, t_index, want_img_grad, images, values,
          grads_all, traj_all, on_step, bar):
    for step in range(1, steps + 1):
        img = prm.image()
        x = T.apply(img, tspec, T.draw(tspec, rng) if tspec else None, out_hw=crop)
        value = obj(tap(x), u_t, groups)
        inputs = [prm.tensor, img] if want_img_grad else [prm.tensor]
        grads = torch.autograd.grad(-value.sum(), inputs)
        if traj_all is not None:
            traj_all[step - 1, sl] = img.detach().cpu()
        if want_img_grad:
            g_img = -grads[1].detach()  # d objective / d image
            if grads_all is not None:
                grads_all[step - 1, sl] = g_img.cpu()
            if on_step is not None:
                on_step(step, img.detach(), g_img, sl)
        prm.tensor.grad = grads[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in t_index:
            with torch.no_grad():
                clean = prm.image()
                i = t_index[step]
                images[i, sl] = clean.detach().cpu()
                clean_in = _fit(clean, crop)
                values[i, sl] = obj(tap(clean_in), u_t, groups).cpu()
        bar.update(1)
    if traj_all is not None:
        with torch.no_grad():
            traj_all[steps, sl] = prm.image().cpu()


def _fit(img: torch.Tensor, crop):
    """Centre-crop (or pad with 0.5) a clean image to the model's input size."""
    if crop is None or tuple(img.shape[-2:]) == tuple(crop):
        return img
    h, w = img.shape[-2:]
    ch, cw = crop
    if h >= ch and w >= cw:
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return img[..., y0:y0 + ch, x0:x0 + cw]
    py, px = max(0, ch - h), max(0, cw - w)
    return torch.nn.functional.pad(img, [px // 2, px - px // 2, py // 2, py - py // 2], value=0.5)[..., :ch, :cw]
