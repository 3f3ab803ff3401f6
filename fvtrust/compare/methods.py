"""The five visualization methods compared, each one batched call over units x replicates.

* ``lucent-standard``: lucid/lucent's FFT parameterization, colour
  decorrelation, standard transforms (fvtrust's default).
* ``pixel``: the same transforms on a sigmoid-pixel parameterization (no
  frequency preconditioning): the baseline every FV paper improves on.
* ``maco``: phase-only optimization with the natural magnitude spectrum of
  the data's fit part (Fel et al. 2023), with its transparency mask, run
  with the method's own published recipe (``maco.MACO_RECIPE``: NAdam at lr
  1.0, 6 random crops plus noise per step), not the shared lr and lucent
  transforms: the recipe is part of the method, as it is for Horama's anchor.
* ``accentuation``: from each unit's r-th most activating natural image (fit
  part) with the layer-proximity penalty (Hamblin et al. 2024).
* ``redirect``: lucent-standard with lucid's redirected ReLU gradient for the
  first 16 steps.

Every method gets the same units, steps, objective and replicate seeds, and
(all but maco) the same learning rate; `objective` in a :class:`MethodRun` is the unit's own
objective on the final clean image (accentuation's penalty excluded), so the
numbers compare.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import FvtrustError
from ..visualize import visualize
from ..visualize.accentuate import accentuate, top_seeds
from ..visualize.alpha import visualize_transparent
from ..visualize.maco import MACO_RECIPE, Maco
from ..visualize.objectives import make_objective

METHODS = ("lucent-standard", "pixel", "maco", "accentuation", "redirect")


@dataclass
class MethodRun:
    name: str
    images: torch.Tensor  # units x replicates x C x H x W
    objective: torch.Tensor  # units x replicates
    seconds: float
    image_steps: int
    alpha: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)

    @property
    def seconds_per_image_step(self) -> float:
        return self.seconds / max(1, self.image_steps)


def check_methods(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise FvtrustError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from: {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def unit_values(model, layer, units, images, objective="neuron", batch: int = 256) -> torch.Tensor:
    """Each image's value of its own unit's objective (images[i] belongs to units[i])."""
    from ..models.hooks import forward_to

    obj = make_objective(objective, layer)
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            acts = forward_to(model, images[s:s + batch].to(model.device), list(obj.layers), detach=True)
            out.append(obj(acts, torch.as_tensor(units[s:s + batch], device=model.device)).cpu())
    return torch.cat(out)


def run_method(name: str, model, layer: str, units, *, replicates: int, steps: int, fit_images: torch.Tensor,
               spectrum: Maco, objective="neuron", lr: float = 0.05, seed: int = 0, accent_weight: float = 1.0,
               accent_layer: str | None = None, redirect_steps: int = 16, size=None) -> MethodRun:
    units = [int(u) for u in units]
    rep = [u for u in units for _ in range(replicates)]  # unit-major; (unit, replicate) seeds each start
    kw = dict(steps=steps, objective=objective, lr=lr, seed=seed, size=size)
    alpha = None
    extra: dict = {}
    t0 = time.perf_counter()
    if name == "lucent-standard":
        res = visualize(model, layer, rep, param="fft", **kw)
    elif name == "pixel":
        res = visualize(model, layer, rep, param="pixel", **kw)
    elif name == "redirect":
        res = visualize(model, layer, rep, param="fft", relu="redirect", redirect_steps=redirect_steps, **kw)
    elif name == "maco":
        res = visualize_transparent(model, layer, rep, param=spectrum, **{**kw, **MACO_RECIPE})
        alpha = res.alpha.view(len(units), replicates, *res.alpha.shape[1:])
        extra["spectrum"] = spectrum.provenance
    elif name == "accentuation":
        t_seed = time.perf_counter()
        seeds, _ = top_seeds(model, layer, units, fit_images, objective=objective, k=replicates)
        extra["seed_seconds"] = time.perf_counter() - t_seed
        res = accentuate(model, layer, rep, seeds=seeds, weight=accent_weight, proximity_layer=accent_layer, **kw)
        extra["accentuation"] = res.settings["accentuation"]
    else:
        raise FvtrustError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    seconds = time.perf_counter() - t0
    final = res.final
    values = unit_values(model, layer, rep, final, objective)
    shape = (len(units), replicates)
    return MethodRun(name, final.view(*shape, *final.shape[1:]), values.view(shape), seconds, len(rep) * steps,
                     alpha, {**res.settings, **extra})


__all__ = ["METHODS", "MethodRun", "run_method", "check_methods", "unit_values"]
