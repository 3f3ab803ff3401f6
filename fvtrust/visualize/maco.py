"""MACO: optimize only the Fourier phase; the magnitude is a natural-image spectrum.

Fel et al., "Unlocking Feature Visualization for Deeper Networks with
MAgnitude Constrained Optimization" (NeurIPS 2023). With φ the optimized phase
(C x H x W//2+1 per image) and M a fixed magnitude spectrum,

    ψ = standardize(φ)                          (the authors' code, Horama and xplique, does this)
    s = irfft2(M · e^{iψ})                      (the real image whose spectrum has magnitude M)
    t = colour(standardize(s))                  (standardize: zero mean, unit std per image)
    x = sigmoid(a + k · t)                       (a, k per channel: the natural mean and contrast)

so the image's energy per frequency stays that of natural images and only
*where* structure sits is free; colour is lucid's recorrelation matrix for RGB
(none for grey models).

**The image's value statistics are natural too.** MACO's premise is that the
image keeps the natural data's statistics and only the phase is free. But M is
estimated from standardized images, so it carries the relative energy per
frequency and neither the image mean (its DC coefficient is ~0) nor the
contrast (its total energy is 1 by construction); the plain sigmoid then gives
every image mean 0.5 and pixel std ~0.21 whatever the data: a mid-grey texture,
where Fashion-MNIST has objects on black (mean 0.28, per-image std 0.32). We
take both from the same natural images M comes from: per channel, (a, k) make
sigmoid(a + b·z), z ~ N(0, 1), have the natural mean pixel μ and the natural
per-image std σ (Gauss-Hermite quadrature and two root brackets,
:func:`sigmoid_params`), with k = b / g for g the channel's std of t (its row
norm in the colour matrix; 1 for grey). `value_stats=None` is the plain
sigmoid (a = 0, k = 1: the paper's and Horama's map); a given `magnitude`
without data carries no statistics, so it gets the plain sigmoid too.

**The recipe is part of the method.** MACO was published with its own
optimization: NAdam at lr 1.0 on the (standardized) phase, and every step the
objective averaged over 6 random near-full crops of the image plus pixel noise
(`transforms="maco"`, transforms.CropSpec). :data:`MACO_RECIPE` holds these
settings; `fvtrust visualize --param maco` and compare-methods use them unless
told otherwise (the old setting was lucent's transforms at Adam lr 0.05).
Measured on fashion-cnn's last and a hidden layer (README): the crops bring
MACO's images closer to how the network processes natural images; NAdam with
the standardized phase is mixed (within noise); the natural value statistics
bring the largest gain, and unlike a lower contrast (part of what makes
Horama's grey images score higher) they do so while the images drive their
unit more. `visualize(param=Maco(...))` or `param="maco"` uses the recipe by
itself, as the CLI does (`render.recipe_for`); an explicit `optimizer`, `lr` or
`transforms` overrides its part.

Standardizing φ matters with that learning rate: an update changes ψ by
about lr / std(φ), and std(φ) grows as the run goes, so the effective step on
the image shrinks. A run that starts from given images (`start`) keeps their
phase unstandardized, since a real image's phase (spread over (-π, π]) is not
a standardized one and standardizing it would change the start image.

**The spectrum comes from the user's natural data, never a download.** M is
the mean over natural images (resized to the visualization size) of
|rfft2(standardize(decorrelate(x)))|, computed on the *fit* part of the data
(Fashion-MNIST's training split on the embedded default) and cached on disk
under ``$FVTRUST_CACHE`` (default ``~/.cache/fvtrust``)/maco, keyed by source,
size, channels, limit and colour handling. Horama instead fetches a fixed
ImageNet spectrum on first use, which neither works offline nor fits a
Fashion-MNIST model.

Transparency (alpha): Fel et al. accumulate |d objective / d image| over the
run; :func:`fvtrust.visualize.alpha.visualize_transparent` does so for any
parameterization (MACO's images are shown with it).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FvtrustError

DEFAULT_LIMIT = 2000  # natural images averaged for the spectrum (the estimate is stable long before)
CACHE_VERSION = 3  # 3: the natural mean pixel and per-image std are cached with the spectrum
# Fel et al.'s optimization recipe (as in the authors' Horama): NAdam, lr 1.0, 6 crops + noise per step
MACO_RECIPE = {"optimizer": "nadam", "lr": 1.0, "transforms": "maco"}


def standardize(t: torch.Tensor, dims=(1, 2, 3), eps: float = 1e-4) -> torch.Tensor:
    """Zero mean, unit std (ddof=1, as torch.std) over `dims`, per image."""
    t = t - t.mean(dims, keepdim=True)
    return t / (t.std(dims, keepdim=True) + eps)


def cache_dir() -> Path:
    return Path(os.environ.get("FVTRUST_CACHE") or Path.home() / ".cache" / "fvtrust") / "maco"


def magnitude_spectrum(images: torch.Tensor, hw, *, color: torch.Tensor | None = None,
                       batch: int = 512) -> torch.Tensor:
    """Mean |rfft2| (C x H x W//2+1) of standardized (and colour-decorrelated) natural images resized to `hw`."""
    if images.dim() != 4 or len(images) == 0:
        raise FvtrustError(f"need a non-empty N x C x H x W batch of natural images, got {tuple(images.shape)}")
    h, w = hw
    inv = None if color is None else torch.linalg.inv(color.cpu())
    total = torch.zeros(images.shape[1], h, w // 2 + 1, dtype=torch.float64)
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float()
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if inv is not None:
            x = torch.einsum("nchw,dc->ndhw", x, inv)
        total += torch.fft.rfft2(standardize(x)).abs().sum(0).double()
    return (total / len(images)).float()


class Maco:
    """`param=Maco(data=...)`: MACO with the magnitude spectrum of `data`'s fit part.

    `data`: a natural data source (anything `fvtrust.data.natural` takes:
    `fashion-mnist`, a folder, an N x C x H x W tensor of [0, 1] images);
    `param="maco"` in `visualize` uses the model's own default data.
    `magnitude`: a given spectrum (C x H x W//2+1 tensor or a .npy path)
    instead. Spectra are computed once per size and cached.
    `standardize_phase`: standardize φ before use (the authors' code; the
    paper's formula omits it). `value_stats`: "natural" (the data's mean pixel
    and per-image std per channel, cached with the spectrum), a (mean, std)
    pair, or None (the plain sigmoid). `visualize` optimizes it with
    :data:`MACO_RECIPE` (its `recipe`) unless told otherwise.
    """

    recipe = MACO_RECIPE  # read by visualize.render.recipe_for

    name = "maco"

    def __init__(self, data=None, *, magnitude=None, limit: int = DEFAULT_LIMIT, data_dir=None, cache: bool = True,
                 class_index=None, standardize_phase: bool = True, value_stats="natural"):
        self.data, self.limit, self.data_dir, self.cache = data, int(limit), data_dir, cache
        self.standardize_phase = bool(standardize_phase)
        if not (value_stats is None or (isinstance(value_stats, str) and value_stats == "natural")):
            try:
                v = np.asarray(value_stats, dtype=np.float64)
            except (TypeError, ValueError):
                v = np.zeros(0)
            if v.shape != (2,) or not (0 < v[0] < 1 and 0 < v[1] < np.sqrt(v[0] * (1 - v[0]))):
                raise FvtrustError(f"value_stats must be 'natural', None or a (mean, std) pair with 0 < mean < 1 "
                                   f"and 0 < std < sqrt(mean (1 - mean)), got {value_stats!r}")
        self.value_stats = value_stats
        self._stats: dict = {}
        self.class_index = class_index
        if isinstance(magnitude, (str, Path)):
            magnitude = torch.as_tensor(np.load(magnitude), dtype=torch.float32)
        self._given = None if magnitude is None else torch.as_tensor(magnitude, dtype=torch.float32)
        self._spectra: dict = {}
        self.provenance: dict = {}

    def __repr__(self):
        src = "given" if self._given is not None else ("tensor" if isinstance(self.data, torch.Tensor)
                                                       else (self.data or "default"))
        return (f"maco(spectrum={src}, standardize_phase={self.standardize_phase}, "
                f"value_stats={self.value_stats if isinstance(self.value_stats, (str, type(None))) else 'given'})")

    def _key(self, chw, decorrelate) -> dict:
        return {"source": str(self.data), "limit": self.limit, "chw": list(chw), "decorrelate": bool(decorrelate),
                "version": CACHE_VERSION}

    def natural_stats(self, chw, *, decorrelate: bool = True):
        """(mean pixel, mean per-image std) per channel of the natural images M comes from; None for a given M."""
        if self._given is not None:
            return None
        self.magnitude(chw, decorrelate=decorrelate)
        return self._stats[(tuple(chw), bool(decorrelate))]

    def value_map(self, chw, *, decorrelate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, k) per channel for x = sigmoid(a + k·t); (0, 1) where no statistics apply."""
        c = chw[0]
        plain = torch.zeros(c), torch.ones(c)
        if self.value_stats is None:
            return plain
        if isinstance(self.value_stats, str):
            stats = self.natural_stats(chw, decorrelate=decorrelate)
            if stats is None:
                return plain
            mu, sd = (v.double().numpy() for v in stats)
        else:
            mu, sd = (np.full(c, float(v)) for v in self.value_stats)
        from .param import _color_matrix

        color = _color_matrix(c, decorrelate, "cpu")
        g = np.ones(c) if color is None else np.linalg.norm(color.double().numpy(), axis=1)
        ab = [sigmoid_params(float(m), float(s_)) for m, s_ in zip(mu, sd)]
        return (torch.tensor([a for a, _ in ab], dtype=torch.float32),
                torch.tensor([b / gc for (_, b), gc in zip(ab, g)], dtype=torch.float32))

    def magnitude(self, chw, *, decorrelate: bool = True) -> torch.Tensor:
        c, h, w = chw
        if self._given is not None:
            m = self._given
            if m.dim() == 2:
                m = m.expand(c, -1, -1)
            if tuple(m.shape[-2:]) != (h, w // 2 + 1):  # Horama's resizing of a template spectrum
                m = F.interpolate(m[None], size=(h, w // 2 + 1), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            if m.shape[0] != c:
                raise FvtrustError(f"MACO magnitude has {m.shape[0]} channels, the images {c}")
            return m.contiguous()
        mem_key = (tuple(chw), bool(decorrelate))
        if mem_key in self._spectra:
            return self._spectra[mem_key]
        from .param import _color_matrix

        color = _color_matrix(c, decorrelate, "cpu")
        if isinstance(self.data, torch.Tensor):
            m = magnitude_spectrum(self.data[: self.limit], (h, w), color=color)
            stats = natural_value_stats(self.data[: self.limit])
            self.provenance = {"source": "tensor", "n": min(len(self.data), self.limit)}
        else:
            key = self._key(chw, decorrelate)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            path = cache_dir() / f"{digest}.npy"
            if self.cache and path.is_file() and path.with_suffix(".json").is_file():
                m = torch.as_tensor(np.load(path), dtype=torch.float32)
                side = json.loads(path.with_suffix(".json").read_text())
                stats = torch.tensor(side["value_mean"]), torch.tensor(side["value_std"])
                self.provenance = {**key, "cached": str(path)}
            else:
                from ..data import natural

                if self.data is None:
                    raise FvtrustError("MACO needs natural images for its magnitude spectrum: give param="
                                       "Maco(data=...) (CLI: --data), or a model with default data")
                x = natural(self.data, input_shape=(c, h, w), data_dir=self.data_dir,
                            class_index=self.class_index).fit.nonempty(self.limit)[0]
                if x.shape[1] != c:
                    raise FvtrustError(f"natural data {self.data!r} has {x.shape[1]} channels, the images {c}")
                m = magnitude_spectrum(x, (h, w), color=color)
                stats = natural_value_stats(x)
                self.provenance = {**key, "n": len(x), "computed": str(path) if self.cache else None}
                if self.cache:
                    _save_npy(path, m.numpy(), {**key, "value_mean": stats[0].tolist(), "value_std": stats[1].tolist()})
        self._spectra[mem_key] = m
        self._stats[mem_key] = tuple(v.float() for v in stats)
        return m

    def make(self, shape, *, decorrelate=True, generators=None, start=None, device=None, sd: float = 1.0):
        """An ImageParam over the phase: random phase N(0, sd²) (Horama), or the phase of `start`."""
        from .param import ImageParam, _color_matrix, _logit

        n, c, h, w = shape
        device = torch.device(device or "cpu")
        mag = self.magnitude((c, h, w), decorrelate=decorrelate).to(device)
        color = _color_matrix(c, decorrelate, device)
        a, k = (v.to(device) for v in self.value_map((c, h, w), decorrelate=decorrelate))
        if start is not None:  # invert x = sigmoid(a + k·t)
            t = (_logit(start.to(device=device, dtype=torch.float32)) - a.view(1, -1, 1, 1)) / k.view(1, -1, 1, 1)
            if color is not None:
                t = torch.einsum("nchw,dc->ndhw", t, torch.linalg.inv(color))
            leaf = torch.angle(torch.fft.rfft2(t)).contiguous()
        else:
            gens = generators if generators is not None else [None] * n
            leaf = torch.stack([torch.randn((c, h, w // 2 + 1), generator=g) for g in gens]).to(device) * sd
        leaf.requires_grad_(True)
        return ImageParam("maco", leaf, (n, c, h, w), decorrelate, scale=mag, color=color,
                          standardize_phase=self.standardize_phase and start is None, value_map=(a, k))


@functools.lru_cache(maxsize=8)
def maco_for(default_data: str | None) -> Maco:
    """`param="maco"`: one Maco per default data source and process (its spectra memoized)."""
    return Maco(data=default_data)


def natural_value_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: the mean pixel, and the mean over images of the per-image std (ddof=1, as standardize)."""
    x = images.float()
    return x.mean((0, 2, 3)), x.flatten(2).std(2).mean(0)


def sigmoid_moments(a: float, b: float, nodes: int = 96) -> tuple[float, float]:
    """Mean and std of sigmoid(a + b·z), z ~ N(0, 1), by Gauss-Hermite quadrature."""
    from numpy.polynomial.hermite_e import hermegauss
    from scipy.special import expit

    z, wq = hermegauss(nodes)
    wq = wq / wq.sum()
    y = expit(a + b * z)
    m = float(wq @ y)
    return m, float(np.sqrt(max(float(wq @ (y * y)) - m * m, 0.0)))


def sigmoid_params(mean: float, std: float) -> tuple[float, float]:
    """(a, b) with sigmoid(a + b·z), z ~ N(0, 1), of the given mean and std.

    For each b the mean fixes a (the mean falls as a falls); the std then
    grows with b from 0 towards sqrt(mean (1 - mean)), so b is a root bracket too.
    """
    from scipy.optimize import brentq

    mean = min(max(mean, 1e-4), 1 - 1e-4)
    a_of = lambda b: brentq(lambda a: sigmoid_moments(a, b)[0] - mean, -20 - 4 * b, 20 + 4 * b,  # noqa: E731
                            xtol=1e-12)
    b_max = 40.0
    if std >= sigmoid_moments(a_of(b_max), b_max)[1]:
        raise FvtrustError(f"no sigmoid image has mean {mean:.3g} and std {std:.3g} (at most sqrt(mean (1 - mean)))")
    b = brentq(lambda b: sigmoid_moments(a_of(b), b)[1] - std, 1e-6, b_max, xtol=1e-10)
    return a_of(b), b


def maco_image(phase: torch.Tensor, magnitude: torch.Tensor, hw, color: torch.Tensor | None = None,
               standardize_phase: bool = False, value_map=None) -> torch.Tensor:
    """sigmoid(a + k·colour(standardize(irfft2(M e^{iψ})))), ψ = standardize(φ) or φ, for phases N x C x H x W//2+1;
    `value_map` = (a, k) per channel, None for (0, 1)."""
    if standardize_phase:
        phase = standardize(phase)
    spatial = torch.fft.irfft2(torch.polar(magnitude.expand_as(phase), phase), s=tuple(hw))
    t = standardize(spatial)
    if color is not None:
        t = torch.einsum("nchw,dc->ndhw", t, color)
    if value_map is not None:
        a, k = value_map
        t = a.view(1, -1, 1, 1).to(t.dtype) + k.view(1, -1, 1, 1).to(t.dtype) * t
    return torch.sigmoid(t)


def _save_npy(path: Path, array: np.ndarray, key: dict):
    import io

    from ..io import atomic_write_bytes, atomic_write_json

    buf = io.BytesIO()
    np.save(buf, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(path.with_suffix(".json"), key)


__all__ = ["Maco", "maco_for", "magnitude_spectrum", "maco_image", "natural_value_stats", "sigmoid_moments",
           "sigmoid_params",
           "standardize",
           "cache_dir", "MACO_RECIPE"]
