"""The fooling circuit (paper §2.1, App. B.1): units that answer like F but visualize as D.

Per manipulated unit i of a layer, Lemma 1's three ReLU layers compute

    A_i = ReLU(D_i − k·E) + ReLU(F_i + k·(E − 1))

with F_i = the original unit i, D_i = the original unit mapping[i] (a
permutation) or a new unit D′ whose single conv filter, with kernel = the
input size, is a picture, and E = the detector (1 natural, 0 visualization).
For k ≥ max(D, F) on every input that matters, A = F when E = 1 and A = D
when E = 0: natural images see the original network, the optimizer only
ever sees (and follows the gradient of) D.

Lemma 1 needs D, F ≥ 0, but logits are signed. Two ways (`mode`):

* ``"split"`` (default): run the circuit on the positive and the negative
  parts, A = N(D⁺, F⁺, E) − N(D⁻, F⁻, E) with x⁺ = ReLU(x), x⁻ = ReLU(−x).
  With a hard gate every term is either copied or exactly zero, so A == F
  bit for bit on natural input (and A == D under E = 0), with no bound on
  how negative a unit can get.
* ``"shift"``: the authors' version, N(D + s, F + s, E) − s with s a
  measured lower bound; exact up to float round-off of the ±s.

k (and s) come from bounds measured on natural images and on visualizations
of the manipulated units (made with E forced to 0, which is what a perfect
detector gives), times a safety `margin`; they are recorded in
`model.circuit_info`.

E is a hard gate by default: 1[logit > threshold], computed without
gradient, as in the authors' code. `gate="soft"` (sigmoid) lets gradient
flow into E, so the visualization learns to fool the detector (the ablation
the paper warns about).

Structure: `CircuitModel` is an FvModel whose `.net` is a copy of the
original with the chosen layer replaced by `CircuitLayer` (holding the
original module as `.inner`), so the layer keeps its name and everything
after it computes from A. The detector and the picture unit act on the raw
[0, 1] image, before the model's normalization; the model sets the gate for
the current batch before running `.net`.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import FvtrustError
from ...models.wrappers import FvModel
from ..detector.model import Detector

PROVISIONAL_K = 1e30  # while measuring bounds under E = 0: switches F off for any finite value


def lemma1(x: torch.Tensor, y: torch.Tensor, e: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """N(x, y, e) = ReLU(x − k·e) + ReLU(y + k·(e − 1)): x when e = 0, y when e = 1 (if k ≥ x, y ≥ 0).

    Written with k·(e − 1) rather than k·e − k so that e = 1 adds an exact
    zero to y.
    """
    return torch.relu(x - k * e) + torch.relu(y + k * (e - 1))


class CircuitLayer(nn.Module):
    """Replaces a layer: A for the manipulated units, the original output for all others.

    `sources[j]` is the unit whose response D the j-th manipulated unit
    `units[j]` shows under E = 0, or -1 for the picture unit D′. The gate
    and picture responses for the current batch are set by `CircuitModel`.
    """

    def __init__(self, inner: nn.Module, units, sources, mode: str = "split"):
        super().__init__()
        if mode not in ("split", "shift"):
            raise FvtrustError(f"unknown circuit mode {mode!r}; choose split or shift")
        self.inner = inner
        self.mode = mode
        self.register_buffer("units", torch.as_tensor(list(units), dtype=torch.long))
        self.register_buffer("sources", torch.as_tensor(list(sources), dtype=torch.long))
        self.register_buffer("k", torch.tensor(PROVISIONAL_K))
        self.register_buffer("shift", torch.zeros(()))
        self.gate = None      # (B,) E for the current batch
        self.picture = None   # (B,) D′ for the current batch

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        if self.gate is None:
            raise FvtrustError("the circuit layer ran without a gate: call the fooled model on [0, 1] images, "
                               "not its .net directly")
        shape = (y.shape[0], 1) + (1,) * (y.dim() - 2)
        e = self.gate.to(y.dtype).view(shape)
        f = y.index_select(1, self.units)
        src = self.sources.clamp(min=0)
        d = y.index_select(1, src)
        if self.picture is not None and bool((self.sources < 0).any()):
            pic = self.picture.to(y.dtype).view(shape).expand_as(d)
            d = torch.where((self.sources < 0).view(1, -1, *(1,) * (y.dim() - 2)), pic, d)
        k = self.k.to(y.dtype)
        if self.mode == "split":
            a = lemma1(torch.relu(d), torch.relu(f), e, k) - lemma1(torch.relu(-d), torch.relu(-f), e, k)
        else:
            s = self.shift.to(y.dtype)
            a = lemma1(d + s, f + s, e, k) - s
        return y.index_copy(1, self.units, a)

    def extra_repr(self):
        return f"mode={self.mode!r}, units={len(self.units)}"


class CircuitModel(FvModel):
    """An FvModel whose `layer` is a fooling circuit gated by `detector` (see module doc).

    `force_gate` (None, 0.0 or 1.0; not saved) overrides E: 0 gives the
    visualization path (a perfect detector on visualizations), 1 the natural
    path. Used to measure bounds and in tests.
    """

    def __init__(self, base: FvModel, layer: str, detector: Detector, units, sources, *, mode: str = "split",
                 gate: str = "hard", picture: bool = False):
        super().__init__(copy.deepcopy(base.net), mean=base.normalize.mean.flatten().tolist(),
                         std=base.normalize.std.flatten().tolist(), input_shape=base.input_shape, spec=base.spec,
                         num_classes=base.num_classes, class_names=base.class_names,
                         default_data=getattr(base, "default_data", None))
        if gate not in ("hard", "soft"):
            raise FvtrustError(f"unknown gate {gate!r}; choose hard or soft")
        self.base_spec = getattr(base, "base_spec", base.spec)
        self.circuit_layer = layer
        self.gate_kind = gate
        self.force_gate = None
        self.last_gate = None  # E of the last batch (detached), for diagnostics
        self.detector = detector
        c, h, w = self.input_shape
        self.picture_unit = nn.Conv2d(c, 1, (h, w), stride=1, padding=0, bias=True) if picture else None
        parent, _, leaf = self.circuit_layer.rpartition(".")
        holder = self.net.get_submodule(parent) if parent else self.net
        setattr(holder, leaf, CircuitLayer(getattr(holder, leaf), units, sources, mode))
        self._circuit_info: dict = {}
        self.circuit_args: dict = {}
        self.eval()

    @property
    def circuit_info(self) -> dict:
        """k, bounds, mapping/picture, units: set by `fooling_circuit`, or the saved recipe's after a reload."""
        return self._circuit_info or getattr(self, "recipe", {}).get("extra", {})

    @circuit_info.setter
    def circuit_info(self, value: dict):
        self._circuit_info = dict(value)

    @property
    def circuit(self) -> CircuitLayer:
        return self.net.get_submodule(self.circuit_layer)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        if self.force_gate is not None:
            return torch.full((x.shape[0],), float(self.force_gate), dtype=x.dtype, device=x.device)
        return self.detector.gate(x, self.gate_kind)

    def forward(self, x):
        layer = self.circuit
        layer.gate = self.gate_values(x)
        self.last_gate = layer.gate.detach()
        layer.picture = self.picture_unit(x).flatten(1)[:, 0] if self.picture_unit is not None else None
        try:
            return self.net(self.normalize(x))
        finally:
            layer.gate = layer.picture = None


def rebuild(base_model, *, layer: str, units, sources, mode: str = "split", gate: str = "hard",
            detector: dict, picture: bool = False, **_ignored) -> CircuitModel:
    """The fooled model's structure from the base model and the saved args (weights loaded afterwards)."""
    return CircuitModel(base_model, layer, Detector(**detector), units, sources, mode=mode, gate=gate,
                        picture=picture)


# -- construction --------------------------------------------------------------------------------------------

def _resolve_layer(model, layer: str) -> tuple[str, int]:
    from ...models.layers import list_layers

    model.get_layer(layer)  # unknown names raise with the nearest ones
    key = layer
    info = next((i for i in list_layers(model) if i.name == key), None)
    if info is None or not info.shape:
        raise FvtrustError(f"layer {layer!r} of {model.spec} produces no tensor output to manipulate")
    return key, info.units


def _resolve_mapping(mapping, units, n: int) -> tuple[list[int], list[int]]:
    """(units, sources) from an offset, a full permutation list, or a {unit: source} dict."""
    if isinstance(mapping, bool):
        raise FvtrustError("mapping must be an offset, a permutation list or a {unit: source} dict")
    if isinstance(mapping, (int, np.integer)):
        off = int(mapping) % n
        if off == 0:
            raise FvtrustError(f"offset {mapping} maps every unit to itself (layer has {n} units); "
                               f"choose an offset in 1..{n - 1}")
        full = [(i + off) % n for i in range(n)]
    elif isinstance(mapping, dict):
        full = None
        pairs = {int(a): int(b) for a, b in mapping.items()}
        for a, b in pairs.items():
            for v in (a, b):
                if not 0 <= v < n:
                    raise FvtrustError(f"mapping entry {a}->{b} out of range: valid units are 0..{n - 1}")
        if len(set(pairs.values())) != len(pairs):
            raise FvtrustError("mapping sends two units to the same source; it must be a permutation")
        if units is None:
            units = sorted(pairs)
        missing = [u for u in units if u not in pairs]
        if missing:
            raise FvtrustError(f"unit {missing[0]} has no entry in the mapping")
        return list(units), [pairs[u] for u in units]
    else:
        try:
            full = [int(v) for v in mapping]
        except (TypeError, ValueError):
            raise FvtrustError("mapping must be an offset, a permutation list or a {unit: source} dict") from None
        if len(full) != n or sorted(full) != list(range(n)):
            raise FvtrustError(f"mapping list must be a permutation of 0..{n - 1} (length {n}), "
                               f"got length {len(full)}")
    units = list(range(n)) if units is None else units
    return list(units), [full[u] for u in units]


def _resolve_picture(picture, shape) -> tuple[torch.Tensor, str]:
    from ...data import load_picture

    if isinstance(picture, torch.Tensor):
        if tuple(picture.shape) != tuple(shape):
            raise FvtrustError(f"picture has shape {tuple(picture.shape)} but the model's input is {tuple(shape)}; "
                               "give a CHW tensor of the input size, or a name / path (resized automatically)")
        if picture.min() < 0 or picture.max() > 1:
            raise FvtrustError("picture values must lie in [0, 1]")
        return picture.float(), "tensor"
    return load_picture(picture, shape=tuple(shape)), str(picture)


def default_natural(model, n: int = 10000) -> torch.Tensor:
    """Natural images for the bounds: the first n of the fit part of the model's own data source."""
    from ...data import natural

    return natural(None, model=model).fit.images(n)


@torch.no_grad()
def _responses(fooled: CircuitModel, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, D) of the manipulated units on images x: the original layer's output and the D sources."""
    from ...models.hooks import forward_to

    layer = fooled.circuit
    fs, ds = [], []
    saved = fooled.force_gate
    fooled.force_gate = 1.0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(fooled.device)
            y = forward_to(fooled, xb, [f"{fooled.circuit_layer}.inner"])[f"{fooled.circuit_layer}.inner"]
            f = y.index_select(1, layer.units)
            d = y.index_select(1, layer.sources.clamp(min=0))
            if fooled.picture_unit is not None:
                pic = fooled.picture_unit(xb).flatten(1)[:, 0].view(-1, 1, *(1,) * (y.dim() - 2)).expand_as(d)
                d = torch.where((layer.sources < 0).view(1, -1, *(1,) * (y.dim() - 2)), pic, d)
            fs.append(f.flatten(1).cpu())
            ds.append(d.flatten(1).cpu())
    finally:
        fooled.force_gate = saved
    return torch.cat(fs), torch.cat(ds)


def _stats(t: torch.Tensor) -> dict:
    return {"min": float(t.min()), "max": float(t.max()), "max_abs": float(t.abs().max())}


def measure_bounds(fooled: CircuitModel, natural: torch.Tensor, visual: torch.Tensor) -> dict:
    """min / max / max |.| of F and D on natural images and on visualizations."""
    out = {}
    for name, x in (("natural", natural), ("visualization", visual)):
        f, d = _responses(fooled, x)
        out[name] = {"F": _stats(f), "D": _stats(d), "n": len(x)}
    return out


def fooling_circuit(model, layer: str, detector, *, mapping=None, picture=None, units=None, k=None,
                    mode: str = "split", gate: str = "hard", margin: float = 2.0, picture_center: bool = True,
                    natural=None, visualizations: torch.Tensor | None = None,
                    bound_steps: int = 256, bound_units: int = 64, seed: int = 0) -> CircuitModel:
    """A new model (`model` untouched) whose `layer` units answer like themselves but visualize as a target.

    `mapping`: an int offset (unit i shows unit (i + offset) mod N), a full
    permutation list, or a {unit: source} dict. `picture`: a scikit-image
    name, an image path, or a CHW tensor of the input size; the picture
    unit's filter is picture / (H·W), mean-centred by default
    (`picture_center`: a non-negative filter is maximized by a white image,
    so long visualizations drift to white; centred, the maximizer is the
    binarized picture). `units`: which units to manipulate (default: all,
    or the mapping's keys). `detector`: a `Detector` or a directory saved
    by `save_detector`.

    `k=None` measures D and F on `natural` images (default: training data)
    and on visualizations — the given ones plus short runs (`bound_steps`)
    of up to `bound_units` manipulated units with E forced to 0 — and sets
    k = margin × the largest |D|, |F| (split mode) or, in shift mode,
    s = margin × the most negative value and k = margin × max(D, F) + s.
    Everything measured lands in `fooled.circuit_info`.
    """
    from ...models.layers import parse_units
    from ...visualize import visualize
    from ..detector.train import load_detector
    from ..detector.data import snapshot_steps

    from ...models import as_model

    if (mapping is None) == (picture is None):
        raise FvtrustError("give exactly one of mapping (a permutation / offset) or picture")
    model = as_model(model, example=natural)
    if isinstance(model, CircuitModel):
        raise FvtrustError(f"{model.spec} already contains a fooling circuit (on {model.circuit_layer}); "
                           "start from the original model")
    if mode not in ("split", "shift"):
        raise FvtrustError(f"unknown circuit mode {mode!r}; choose split or shift")
    if gate not in ("hard", "soft"):
        raise FvtrustError(f"unknown gate {gate!r}; choose hard or soft")
    if not (isinstance(margin, (int, float)) and margin >= 1):
        raise FvtrustError(f"margin must be a number >= 1, got {margin!r}")
    if isinstance(detector, (str, Path)):
        detector, _ = load_detector(detector)
    if not isinstance(detector, Detector):
        raise FvtrustError(f"detector must be a Detector or a saved detector directory, not {type(detector).__name__}")
    if tuple(detector.input_shape) != tuple(model.input_shape):
        raise FvtrustError(f"the detector was built for inputs {detector.input_shape}, the model takes "
                           f"{tuple(model.input_shape)}")
    key, n = _resolve_layer(model, layer)
    if units is not None:
        units = parse_units(units, n, key)
        if len(set(units)) != len(units):
            raise FvtrustError("units are listed twice")
    info: dict = {"layer": key, "mode": mode, "gate": gate, "margin": margin}
    if mapping is not None:
        units, sources = _resolve_mapping(mapping, units, n)
        info.update(kind="permutation", mapping={int(u): int(s) for u, s in zip(units, sources)})
        if isinstance(mapping, (int, np.integer)):
            info["offset"] = int(mapping)
        pic = None
    else:
        pic, pic_name = _resolve_picture(picture, model.input_shape)
        units = list(range(n)) if units is None else units
        sources = [-1] * len(units)
        info.update(kind="picture", picture=pic_name, picture_center=picture_center)

    fooled = CircuitModel(model, key, copy.deepcopy(detector).to(model.device), units, sources, mode=mode,
                          gate=gate, picture=pic is not None)
    fooled.to(model.device)
    if pic is not None:
        _c, h, w = model.input_shape
        weight = (pic - pic.mean()) if picture_center else pic
        with torch.no_grad():
            fooled.picture_unit.weight.copy_((weight / (h * w))[None].to(model.device))
            fooled.picture_unit.bias.zero_()

    layer_mod = fooled.circuit
    if k is not None:
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise FvtrustError(f"k must be a positive finite number, got {k!r}")
        layer_mod.k.fill_(float(k))
        info.update(k=float(k), k_source="given")
    else:
        if natural is None:
            nat = default_natural(model)
        elif isinstance(natural, torch.Tensor):
            nat = natural
        else:
            from ...data import natural as resolve_natural

            nat = resolve_natural(natural, model=model).fit.images(10000)
        pick = units if len(units) <= bound_units else sorted(
            np.random.default_rng(seed).choice(units, size=bound_units, replace=False).tolist())
        fooled.force_gate = 0.0  # visualize the manipulated units as a perfect detector would let them
        try:
            res = visualize(fooled, key, pick, steps=bound_steps, thresholds=snapshot_steps(bound_steps), seed=seed,
                            progress_desc="circuit bounds")
        finally:
            fooled.force_gate = None
        vis = res.images.flatten(0, 1)
        if visualizations is not None:
            vis = torch.cat([vis, visualizations.float().cpu()])
        bounds = measure_bounds(fooled, nat, vis)
        if mode == "split":
            kval = margin * max(b[u]["max_abs"] for b in (bounds["natural"], bounds["visualization"]) for u in "FD")
        else:
            low = min(b[u]["min"] for b in (bounds["natural"], bounds["visualization"]) for u in "FD")
            high = max(b[u]["max"] for b in (bounds["natural"], bounds["visualization"]) for u in "FD")
            s = margin * max(0.0, -low)
            kval = margin * (high + s)
            layer_mod.shift.fill_(s)
            info["shift"] = s
        layer_mod.k.fill_(max(kval, 1e-6))
        info.update(k=float(layer_mod.k), k_source="measured", bounds=bounds, bound_steps=bound_steps,
                    bound_units=len(pick))
    info["units"] = [int(u) for u in units]
    fooled.circuit_info = info
    fooled.circuit_args = {"layer": key, "units": [int(u) for u in units], "sources": [int(s) for s in sources],
                           "mode": mode, "gate": gate, "detector": detector.config(), "picture": pic is not None}
    return fooled


def save_circuit(fooled: CircuitModel, directory, *, base_spec: str | None = None, extra: dict | None = None) -> Path:
    """Save so that `fvtrust.load_model(directory)` rebuilds the fooled model exactly (detector included)."""
    from ...models.saved import save_model

    return save_model(fooled, directory, manipulation="fooling_circuit", args=fooled.circuit_args,
                      base_spec=base_spec or fooled.base_spec, extra=dict(fooled.circuit_info, **(extra or {})))


__all__ = [
    "CircuitLayer",
    "CircuitModel",
    "fooling_circuit",
    "lemma1",
    "measure_bounds",
    "rebuild",
    "save_circuit",
]
