"""Feature accentuation (Hamblin, Fel, Saha, Konkle & Alvarez, 2024): start from a natural image, stay near it.

For a seed image x0 and a unit's objective f, accentuation solves

    x* = argmax_x  f(x) - λ · || z_l(x) - z_l(x0) ||_2

from x = x0, where z_l is an intermediate layer's activation (the L2 norm
over channels, averaged over positions) and x and x0 are seen under the same
random transform at each step (faccent passes the seed through the model
beside the image). The result shows *what in this image* drives the unit,
rather than an image from scratch. The image is lucid's FFT
parameterization started at x0 (its inverse); λ is the paper's
regularization weight. faccent additionally rescales λ by the ratio of the
two terms' gradient norms at the start; we keep λ as given, so runs are
comparable across units.

Batched like every visualization: one seed per unit (by default each unit's
most activating natural image of the data's fit part), one optimization.
"""
from __future__ import annotations

import torch

from ..errors import FvtrustError
from .objectives import Proximity, make_objective
from .render import visualize

DEFAULT_WEIGHT = 1.0


def default_proximity_layer(model, layer: str) -> str:
    """The layer the penalty lives in when none is given: the unit's own layer (always exists, always runs)."""
    return layer


def top_seeds(model, layer: str, units, images: torch.Tensor, *, objective="neuron", k: int = 1, rows: int = 4096):
    """Each unit's `k` most activating images of `images` (unit-major: units x k rows) and their values.

    These are accentuation's seeds (replicate r starts from the unit's r-th
    best image) and the natural maximum the activation ratio is measured against.
    """
    from ..models.hooks import forward_to

    obj = make_objective(objective, layer)
    units_t = torch.as_tensor(list(units))
    if not 1 <= k <= len(images):
        raise FvtrustError(f"need 1 <= k <= {len(images)} natural images, got k={k}")
    batch = max(1, rows // max(1, len(units_t)))  # B x U rows of activations per pass
    vals = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            acts = forward_to(model, images[s:s + batch].to(model.device), list(obj.layers), detach=True)
            vals.append(_all_units(obj, acts, units_t, min(batch, len(images) - s)).cpu())
    v, i = torch.cat(vals).topk(k, dim=0)  # k x U
    idx = i.T.reshape(-1)
    return images[idx], v.T.reshape(-1)


def _all_units(obj, acts, units_t, b):
    """B x U values of `obj` for every image and unit."""
    u = units_t.to(next(iter(acts.values())).device)
    rep = {k: v.repeat_interleave(len(u), 0) for k, v in acts.items()}
    return obj(rep, u.repeat(b)).view(b, len(u))


def accentuate(model, layer: str, units="all", *, seeds: torch.Tensor | None = None, data=None, data_dir=None,
               limit: int = 2000, proximity_layer: str | None = None, weight: float = DEFAULT_WEIGHT,
               objective="neuron", **kwargs):
    """Feature accentuation of `units`: start at `seeds` (units x C x H x W) or at each unit's top natural image.

    Keyword arguments go to :func:`fvtrust.visualize`. `result.settings`
    records the proximity layer, weight and the seeds' origin.
    """
    from ..models.layers import layer_units, parse_units

    if weight < 0:
        raise FvtrustError(f"accentuation weight must be >= 0, got {weight}")
    units = parse_units(units, layer_units(model, layer), layer)
    origin = "given"
    if seeds is None:
        from ..data import natural

        nat = natural(data, model=model, data_dir=data_dir).fit.nonempty(limit)[0]
        seeds, _ = top_seeds(model, layer, units, nat, objective=objective)  # repeated units: their 1st seed
        origin = f"top-activating of {limit} fit images of {data or getattr(model, 'default_data', None)}"
    seeds = seeds.float().clamp(0, 1)
    if seeds.shape[0] != len(units):
        raise FvtrustError(f"need one seed per unit ({len(units)}), got {seeds.shape[0]}")
    player = proximity_layer or default_proximity_layer(model, layer)
    obj = make_objective(objective, layer) - weight * Proximity(player)
    res = visualize(model, layer, units, objective=obj, start=seeds, reference=seeds, **kwargs)
    res.settings.update(accentuation={"proximity_layer": player, "weight": weight, "seeds": origin})
    return res


__all__ = ["accentuate", "top_seeds"]
