"""Objectives: what each image in the batch maximizes.

An objective maps the captured layer activations and the batch's unit
indices to one value per image (shape B). Because every image has its own
term, visualizing U units is one optimization over U images rather than U
runs. Objectives compose: `a + b`, `0.5 * a`, `-a` (minimize, for argmin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FvtrustError

REFERENCE = "<reference>"  # key of the reference images' activations (render's `reference=`), never a layer name


def _select(acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """acts[b, units[b], ...] for every image b."""
    idx = units.view(-1, *([1] * (acts.dim() - 1))).expand(-1, 1, *acts.shape[2:])
    return acts.gather(1, idx).squeeze(1)


class Objective:
    """Base: per-image values from {layer: activations}. Subclasses set `layers`."""

    layers: tuple = ()
    name = "objective"

    def __call__(self, acts: dict, units: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __add__(self, other):
        return Sum([self, other], [1.0, 1.0])

    def __sub__(self, other):
        return Sum([self, other], [1.0, -1.0])

    def __mul__(self, k):
        return Sum([self], [float(k)])

    __rmul__ = __mul__

    def __neg__(self):
        return Sum([self], [-1.0])

    def __repr__(self):
        return self.name


class Sum(Objective):
    def __init__(self, parts, weights):
        self.parts, self.weights = list(parts), list(weights)
        self.layers = tuple(dict.fromkeys(layer for p in self.parts for layer in p.layers))
        self.name = " + ".join(f"{w:g}*{p.name}" for p, w in zip(self.parts, self.weights))

    def __call__(self, acts, units, groups=None):
        return sum(w * p(acts, units, groups) for p, w in zip(self.parts, self.weights))


class Neuron(Objective):
    """The unit's activation at the spatial centre (H // 2, W // 2), as lucent."""

    def __init__(self, layer):
        self.layers, self.name = (layer,), f"neuron({layer})"

    def __call__(self, acts, units, groups=None):
        a = _select(acts[self.layers[0]], units)
        if a.dim() == 3:
            a = a[:, a.shape[1] // 2, a.shape[2] // 2]
        return a.reshape(a.shape[0], -1).mean(1)


class Channel(Objective):
    """The unit's mean activation over all positions."""

    def __init__(self, layer):
        self.layers, self.name = (layer,), f"channel({layer})"

    def __call__(self, acts, units, groups=None):
        a = _select(acts[self.layers[0]], units)
        return a.reshape(a.shape[0], -1).mean(1)


class Direction(Objective):
    """Cosine similarity of the activation vector with a direction, averaged over positions (lucent)."""

    def __init__(self, layer, directions: torch.Tensor):
        self.layers, self.name = (layer,), f"direction({layer})"
        self.directions = torch.as_tensor(directions, dtype=torch.float32)  # (U, C): one per unit index

    def __call__(self, acts, units, groups=None):
        a = acts[self.layers[0]]
        d = self.directions.to(a.device)[units]  # (B, C)
        d = d.view(*d.shape, *([1] * (a.dim() - 2)))
        cos = F.cosine_similarity(a, d, dim=1)
        return cos.reshape(cos.shape[0], -1).mean(1)


class Diversity(Objective):
    """Penalize similar Gram matrices among images of the same group (lucent's diversity).

    Images visualizing the same unit share a group; each image's value is minus
    its mean cosine similarity to the others in its group.
    """

    def __init__(self, layer):
        self.layers, self.name = (layer,), f"diversity({layer})"

    def __call__(self, acts, units, groups=None):
        a = acts[self.layers[0]]
        b, c = a.shape[:2]
        flat = a.reshape(b, c, -1)
        gram = torch.bmm(flat, flat.transpose(1, 2)).reshape(b, -1)
        gram = F.normalize(gram, dim=1)
        sim = gram @ gram.T
        groups = units if groups is None else groups
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(b, dtype=torch.bool, device=a.device)
        count = same.sum(1).clamp(min=1)
        return -(sim * same).sum(1) / count


class Proximity(Objective):
    """Distance of each image's activations at `layer` to its reference image's (feature accentuation).

    Hamblin et al. (2024): ||z_l(x) - z_l(x0)||_2, the L2 norm over channels at
    each position, averaged over positions, with x and its seed x0 seen under the
    same transform. Needs render's `reference=`; maximize `-Proximity` to stay close.
    """

    def __init__(self, layer):
        self.layers, self.name = (layer,), f"proximity({layer})"

    def __call__(self, acts, units, groups=None):
        if REFERENCE not in acts:
            raise FvtrustError("the proximity objective needs reference images (visualize(..., reference=...))")
        a, r = acts[self.layers[0]], acts[REFERENCE][self.layers[0]]
        if a.dim() == 2:
            return (a - r).norm(dim=1)
        d = (a - r).norm(dim=1)
        return d.reshape(d.shape[0], -1).mean(1)


OBJECTIVES = ("neuron", "channel", "direction", "diversity")


def make_objective(objective, layer: str, *, directions=None) -> Objective:
    """'neuron' | 'channel' | 'direction' | 'diversity' (prefix '-' to minimize) or an Objective."""
    if isinstance(objective, Objective):
        return objective
    if not isinstance(objective, str):
        raise FvtrustError(f"objective must be a name or an Objective, not {type(objective).__name__}")
    text = objective.strip()
    sign = 1.0
    for prefix in ("-", "min:", "minimize:"):
        if text.startswith(prefix):
            sign, text = -1.0, text[len(prefix):]
    if text == "neuron":
        obj = Neuron(layer)
    elif text == "channel":
        obj = Channel(layer)
    elif text == "direction":
        if directions is None:
            raise FvtrustError("the direction objective needs `directions` (one vector per unit)")
        obj = Direction(layer, directions)
    elif text == "diversity":
        obj = Diversity(layer)
    else:
        raise FvtrustError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)} "
                           "(prefix - to minimize)")
    return -obj if sign < 0 else obj
