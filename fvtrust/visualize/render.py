"""The optimization loop: many units at once, one forward/backward per step.

Speed comes from four choices lucent does not make: the forward pass stops
at the deepest layer the objective needs; gradients are taken with
`torch.autograd.grad` w.r.t. the image parameters only (no weight gradients);
the random transforms are one fused resampling; and all units of a layer are
optimized as one batch, chunked automatically to fit memory.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FvtrustError
from ..models.hooks import LayerTap
from ..models.layers import layer_units, parse_units
from ..progress import progress
from . import transforms as T
from .fastpath import fast_inference
from .objectives import REFERENCE, make_objective
from .param import make_param, seed_generators
from .relu import REDIRECT_STEPS, redirect_relus


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
    alpha: torch.Tensor | None = None  # units x C x H x W: accumulated |d objective / d image| (maco.py)

    @property
    def final(self) -> torch.Tensor:
        return self.images[-1]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "units": list(self.units), "thresholds": list(self.thresholds),
                "objective": self.objective.tolist(), "settings": self.settings}


def check_learning_rate(lr) -> float:
    """A finite learning rate >= 0 (NaN or inf would silently wreck every image; torch raises a traceback).
    0 is allowed: the result is then the start image itself (how tests and defenses read the start)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise FvtrustError(f"the learning rate must be a finite number >= 0, got {lr!r}")
    return float(lr)


def _check_thresholds(thresholds, steps) -> tuple:
    th = tuple(sorted({int(t) for t in thresholds}))
    if steps < 1:
        raise FvtrustError(f"steps must be >= 1, got {steps}")
    if not th or th[0] < 1 or th[-1] > steps:
        raise FvtrustError(f"thresholds {list(thresholds)} must lie in 1..steps ({steps})")
    return th


def _auto_chunk(model, n_images: int, shape, record: bool, views: int = 1) -> int:
    """Images per chunk: bounded by free GPU memory, or a CPU budget of ~4 GB (`views` model inputs per image)."""
    c, h, w = shape
    per_image = 4 * c * h * w * 200 * views  # rough: activations saved for backward, dominated by early layers
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


PRECISIONS = ("fp32", "bf16")
# nadam: Fel et al.'s MACO recipe (Horama, xplique) optimizes the phase with NAdam at lr 1.0
OPTIMIZERS = {"adam": torch.optim.Adam, "nadam": torch.optim.NAdam, "sgd": torch.optim.SGD}


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise FvtrustError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def _as_float(acts):
    """Layer outputs (and a reference's, nested) in float32: objectives always compute in fp32."""
    return {k: _as_float(v) if isinstance(v, dict) else v.float() for k, v in acts.items()}


def _forward_precision(precision: str, device: torch.device):
    """The model's forward during optimization: fp32, or bf16 autocast (convolutions and matrix
    products in bfloat16, reductions in float32; parameterization, transforms, objective and
    optimizer stay float32). Snapshots' objective values are always measured in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _nhwc_pays(device, hw) -> bool:
    """NHWC convolutions: measured faster on CPU at 224 px (~1.4x), slower at 28 px; unmeasured on GPU."""
    return device.type == "cpu" and min(hw) >= 64


LUCENT_RECIPE = {"optimizer": "adam", "lr": 0.05, "transforms": "standard"}


def recipe_for(param) -> dict:
    """The optimizer, learning rate and transforms a parameterization is published with.

    A parameterization object may declare its own as a ``recipe`` attribute
    (:class:`~fvtrust.visualize.maco.Maco` has MACO's,
    :data:`~fvtrust.visualize.maco.MACO_RECIPE`; `visualize` turns ``"maco"``
    into a `Maco` before asking); fft, pixel, raw and other parameterizations
    get lucent's ``render_vis`` settings.
    """
    return dict(getattr(param, "recipe", None) or LUCENT_RECIPE)


def visualize(model, layer: str, units="all", *, steps: int = 512, thresholds=None, size=None,
              param: str = "fft", decorrelate: bool = True, transforms="auto", objective="neuron",
              lr: float | None = None, optimizer: str | None = None, seed: int = 0, start: torch.Tensor | None = None,
              record_gradients: bool = False, record_images: bool | None = None, chunk_size: int | None = None,
              directions=None, groups=None, on_step=None, progress_desc: str | None = None,
              shared_start: bool = False, fast: bool = True, grad_clip: float | None = None, relu: str = "standard",
              redirect_steps: int = REDIRECT_STEPS, reference: torch.Tensor | None = None,
              precision: str = "fp32") -> VisualizationResult:
    """Feature visualization by activation maximization, batched over units.

    `units` may repeat a unit (e.g. several starts per unit); each entry gets its
    own image. `start` (units x C x H x W in [0, 1]) begins from given images
    instead of noise. `on_step(step, images, grads, chunk_slice)` lets callers
    stream per-step data without storing it. `shared_start` gives every unit the
    same starting noise (what lucent's one-unit-at-a-time `render_vis` under one
    fixed seed does), so differences between units' images come from the units,
    not from their starts — the controlled way to compare units' visualizations.
    `fast` runs the model with verified Conv-BN folding (and NHWC on CPU at
    >= 64 px) for the length of the call (see fastpath.py) and hands it back
    exactly as it was. `grad_clip` clips each image's parameter gradient to
    that L2 norm before the optimizer step (a defense against manipulated
    gradient landscapes, e.g. gradient slingshots). `relu="redirect"` gives the model's ReLU modules lucid's
    redirected gradient for steps 1..`redirect_steps` (see relu.py).
    `reference` (units x C x H x W in [0, 1]) runs each image's reference
    alongside it under the same transform draw; objectives read the
    reference's activations as `acts[REFERENCE]` (feature accentuation's
    proximity term, accentuate.py). `precision="bf16"` runs the optimization's forward and backward
    under bfloat16 autocast (see benchmarks/bench_visualize.py for its speed and quality
    against fp32, the default).

    `transforms="auto"` and `lr` / `optimizer` left at None take the parameterization's
    published recipe (:func:`recipe_for`): Fel et al.'s for MACO (6 crops + noise,
    NAdam at lr 1.0), lucent's for everything else (standard transforms, Adam at
    lr 0.05). A MACO image optimized with lucent's recipe is a different method,
    and it scores worse on the sanity check (README, methods), so `param="maco"`
    alone has to mean MACO; any of the three given explicitly overrides its part
    (`transforms=None` or `"none"` is no transforms).
    """
    if grad_clip is not None and not grad_clip > 0:
        raise FvtrustError(f"grad_clip must be > 0, got {grad_clip}")
    from ..models import as_model

    precision = _check_precision(precision)
    model = as_model(model, example=start)
    if relu not in ("standard", "redirect"):
        raise FvtrustError(f"unknown relu {relu!r}; choose standard or redirect")
    if isinstance(param, str) and param == "maco":
        from .maco import maco_for

        param = maco_for(getattr(model, "default_data", None))  # the spectrum of the model's own natural data
    recipe = recipe_for(param)
    transforms = recipe["transforms"] if isinstance(transforms, str) and transforms == "auto" else transforms
    lr = recipe["lr"] if lr is None else lr
    optimizer = recipe["optimizer"] if optimizer is None else optimizer
    n_units = layer_units(model, layer)
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
    crop = model_hw if tspec is not None else None  # without transforms the image goes in as it is
    obj = make_objective(objective, layer, directions=directions)
    if optimizer not in OPTIMIZERS:
        raise FvtrustError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    check_learning_rate(lr)
    n = len(units)
    if start is not None and tuple(start.shape) != (n, c, *hw):
        raise FvtrustError(f"start must have shape {(n, c, *hw)} (units x C x H x W), got {tuple(start.shape)}")
    if reference is not None and tuple(reference.shape) != (n, c, *hw):
        raise FvtrustError(f"reference must have shape {(n, c, *hw)}, got {tuple(reference.shape)}")
    record_images = record_gradients if record_images is None else record_images
    chunk = chunk_size or _auto_chunk(model, n, (c, *hw), record_gradients or record_images,
                                      getattr(tspec, "views", 1))

    device = model.device
    keys = []
    seen: dict[int, int] = {}
    for u in units:  # (unit, replicate): the same unit twice gets two different starts
        keys.append((-1 if shared_start else u, seen.get(u, 0)))  # ints only: str hashes vary per process
        seen[u] = seen.get(u, 0) + 1
    groups_t = torch.as_tensor(groups if groups is not None else units, device=device)

    run = _Run(model=model, obj=obj, steps=steps, thresholds=thresholds, chw=(c, *hw), param=param,
               decorrelate=decorrelate, tspec=tspec, crop=crop, lr=lr, optimizer=optimizer, seed=seed,
               images=torch.empty(len(thresholds), n, c, *hw), values=torch.empty(len(thresholds), n),
               grads=torch.empty(steps, n, c, *hw) if record_gradients else None,
               traj=torch.empty(steps + 1, n, c, *hw) if record_images else None, on_step=on_step,
               channels_last=fast and _nhwc_pays(device, crop or hw), grad_clip=grad_clip,
               redirect_steps=redirect_steps if relu == "redirect" else 0, precision=precision)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # no weight gradients, ever
    run.bar = progress(total=steps * n, desc=progress_desc or f"visualize {layer}", unit="img-step")
    if fast:
        probe = torch.rand(1, c, *(crop or hw), generator=torch.Generator().manual_seed(0)).to(device)
        speedup = fast_inference(model, obj.layers, probe, channels_last=run.channels_last)
    else:
        speedup = contextlib.nullcontext()
    try:
        with speedup, (redirect_relus(model) if relu == "redirect" else contextlib.nullcontext()) as run.redirect:
            c0 = 0
            while c0 < n:
                sl = slice(c0, min(n, c0 + chunk))
                try:
                    run.chunk(sl, units[sl], keys[sl], groups_t[sl], start[sl] if start is not None else None,
                              reference[sl] if reference is not None else None)
                except torch.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)  # retry this chunk smaller; finished chunks are kept
                    if model.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                c0 = sl.stop
    finally:
        run.bar.close()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    settings = {"steps": steps, "param": param if isinstance(param, str) else repr(param), "decorrelate": decorrelate, "lr": lr, "optimizer": optimizer,
                "seed": seed, "objective": repr(obj), "size": list(hw),
                "transforms": tspec.to_dict() if tspec else None, "start": start is not None,
                "shared_start": shared_start, "fast": fast, "grad_clip": grad_clip, "relu": relu,
                "redirect_steps": redirect_steps if relu == "redirect" else None, "reference": reference is not None,
                "precision": precision}
    return VisualizationResult(run.images, run.values, thresholds, list(units), layer, settings, run.grads, run.traj)


@dataclass
class _Run:
    """One visualization call's plan and output buffers; `chunk` optimizes a slice of the images."""

    model: torch.nn.Module
    obj: object
    steps: int
    thresholds: tuple
    chw: tuple
    param: str
    decorrelate: bool
    tspec: object
    crop: tuple | None
    lr: float
    optimizer: str
    seed: int
    images: torch.Tensor
    values: torch.Tensor
    grads: torch.Tensor | None
    traj: torch.Tensor | None
    on_step: object
    channels_last: bool = False
    grad_clip: float | None = None
    redirect_steps: int = 0
    precision: str = "fp32"
    bar: object = None
    redirect: object = None  # relu.RedirectSwitch while relu="redirect"

    def _acts(self, tap, x, ref):
        """Layer outputs for x; with a reference batch, both in one forward, the reference under acts[REFERENCE]."""
        if ref is None:
            return tap(x)
        both = tap(torch.cat([x, ref]))
        n = x.shape[0]
        acts = {k: v[:n] for k, v in both.items()}
        acts[REFERENCE] = {k: v[n:] for k, v in both.items()}
        return acts

    def chunk(self, sl: slice, units, keys, groups, start, reference=None):
        n, device = len(units), self.model.device
        prm = make_param(self.param, (n, *self.chw), decorrelate=self.decorrelate,
                         generators=seed_generators(self.seed, keys), start=start, device=device)
        opt = OPTIMIZERS[self.optimizer]([prm.tensor], lr=self.lr)
        rng = np.random.default_rng(self.seed)  # transform draws: shared by the batch and by every chunk
        u_t = torch.as_tensor(units, device=device)
        views = getattr(self.tspec, "views", 1)  # model inputs per image and step (MACO's crops: several)
        u_views, g_views = u_t.repeat_interleave(views), groups.repeat_interleave(views)
        want_img_grad = self.grads is not None or self.on_step is not None
        t_index = {t: i for i, t in enumerate(self.thresholds)}
        with LayerTap(self.model, list(self.obj.layers)) as tap:
            ref = None if reference is None else reference.to(device)
            for step in range(1, self.steps + 1):
                if self.redirect is not None:
                    self.redirect.active = step <= self.redirect_steps
                img = prm.image()
                d = T.draw(self.tspec, rng) if self.tspec else None
                x = T.apply(img, self.tspec, d, out_hw=self.crop)
                x_ref = None if ref is None else T.apply(ref, self.tspec, d, out_hw=self.crop)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                    x_ref = None if x_ref is None else x_ref.contiguous(memory_format=torch.channels_last)
                with _forward_precision(self.precision, device):
                    acts = self._acts(tap, x, x_ref)
                value = self.obj(_as_float(acts), u_views, g_views)
                if views > 1:
                    value = value.view(n, views).mean(1)  # the objective of an image: the mean over its views
                grads = torch.autograd.grad(-value.sum(), [prm.tensor, img] if want_img_grad else [prm.tensor])
                if self.traj is not None:
                    self.traj[step - 1, sl] = img.detach().cpu()
                if want_img_grad:
                    g_img = -grads[1].detach()  # d objective / d image
                    if self.grads is not None:
                        self.grads[step - 1, sl] = g_img.cpu()
                    if self.on_step is not None:
                        self.on_step(step, img.detach(), g_img, sl)
                g = grads[0]
                if self.grad_clip is not None:
                    norm = g.reshape(n, -1).norm(dim=1).clamp_min(1e-30)
                    g = g * (self.grad_clip / norm).clamp(max=1.0).view(n, *([1] * (g.dim() - 1)))
                prm.tensor.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step in t_index:
                    with torch.no_grad():
                        clean = prm.image()
                        i = t_index[step]
                        self.images[i, sl] = clean.cpu()
                        clean_ref = None if ref is None else _fit(ref, self.crop)
                        self.values[i, sl] = self.obj(self._acts(tap, _fit(clean, self.crop), clean_ref), u_t,
                                                      groups).cpu()
                self.bar.update(n)
        if self.traj is not None:
            with torch.no_grad():
                self.traj[self.steps, sl] = prm.image().cpu()


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
