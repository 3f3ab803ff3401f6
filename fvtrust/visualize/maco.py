"""MACO: optimize only the Fourier phase; the magnitude is a natural-image spectrum.

Fel et al., "Unlocking Feature Visualization for Deeper Networks with
MAgnitude Constrained Optimization" (NeurIPS 2023). With φ the optimized phase
(C x H x W//2+1 per image) and M a fixed magnitude spectrum,

    ψ = standardize(φ)                          (the authors' code, Horama and xplique, does this)
    s = irfft2(M · e^{iψ})                      (the real image whose spectrum has magnitude M)
    x = sigmoid(colour(standardize(s)) + a)      (standardize: zero mean, unit std per image)

so the image's energy per frequency stays that of natural images and only
*where* structure sits is free. colour is lucid's recorrelation matrix for RGB.
For a grey model it is the matrix's luminance weight L = 1/√3 (the mean of its
first column; the other two columns sum to 0): a grey MACO image is the grey
(channel mean) of the colour image MACO would make, x = sigmoid(L · standardize(s)),
so grey and RGB models get the same contrast per channel. Before, grey models
got sigmoid(standardize(s)), √3 times the per-channel contrast of RGB ones.

**The image mean is natural too.** MACO's premise is that the image keeps the
natural data's statistics and only the phase is free. M is estimated from
standardized images, so its DC coefficient (the image mean) is ~0, and the
sigmoid then puts every image's mean at 0.5, whatever the data: a mid-grey
that suits ImageNet but not objects on black (Fashion-MNIST's mean is 0.28).
The offset a (per channel) restores the one statistic the template cannot
carry, from the same natural images M comes from: a solves
E[sigmoid(a + g·z)] = μ for z ~ N(0, 1) (Gauss-Hermite quadrature), with μ
the channel's natural mean pixel and g the channel's gain (the norm of its
row of the colour matrix; the luminance weight for grey). The contrast stays
the recipe's. `value_mean=None` is the old (and Horama's) a = 0; a given
`magnitude` without data carries no mean, so it gets a = 0 as well.

**The recipe is part of the method.** MACO was published with its own
optimization: NAdam at lr 1.0 on the (standardized) phase, and every step the
objective averaged over 6 random near-full crops of the image plus pixel noise
(`transforms="maco"`, transforms.CropSpec). :data:`MACO_RECIPE` holds these
settings; `fvtrust visualize --param maco` and compare-methods use them unless
told otherwise (the old setting was lucent's transforms at Adam lr 0.05).
Measured on fashion-cnn (README): the crops and the grey luminance each bring
MACO's images closer to how the network processes natural images, on the last
and a hidden layer; NAdam with the standardized phase is mixed (within noise).
The price: the images drive their unit less (activation and class
faithfulness drop), as Horama's do.

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
CACHE_VERSION = 2  # 2: the natural mean pixel is cached with the spectrum
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
    paper's formula omits it). `value_mean`: "natural" (the data's mean pixel
    per channel, cached with the spectrum), a number or per-channel sequence,
    or None (0.5, the sigmoid's centre). Optimize with :data:`MACO_RECIPE`.
    """

    name = "maco"

    def __init__(self, data=None, *, magnitude=None, limit: int = DEFAULT_LIMIT, data_dir=None, cache: bool = True,
                 class_index=None, standardize_phase: bool = True, value_mean="natural"):
        self.data, self.limit, self.data_dir, self.cache = data, int(limit), data_dir, cache
        self.standardize_phase = bool(standardize_phase)
        if not (value_mean is None or value_mean == "natural"):
            v = np.atleast_1d(np.asarray(value_mean, dtype=np.float64))
            if v.ndim != 1 or not np.all((v > 0) & (v < 1)):
                raise FvtrustError(f"value_mean must be 'natural', None or means in (0, 1), got {value_mean!r}")
        self.value_mean = value_mean
        self._means: dict = {}
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
                f"value_mean={self.value_mean if isinstance(self.value_mean, (str, type(None))) else 'given'})")

    def _key(self, chw, decorrelate) -> dict:
        return {"source": str(self.data), "limit": self.limit, "chw": list(chw), "decorrelate": bool(decorrelate),
                "version": CACHE_VERSION}

    def natural_mean(self, chw, *, decorrelate: bool = True) -> torch.Tensor | None:
        """Per-channel mean pixel of the natural images the spectrum comes from (None for a given spectrum)."""
        if self._given is not None:
            return None
        self.magnitude(chw, decorrelate=decorrelate)
        return self._means[(tuple(chw), bool(decorrelate))]

    def offsets(self, chw, *, decorrelate: bool = True) -> torch.Tensor:
        """a per channel: E[sigmoid(a_c + g_c z)] = μ_c, z ~ N(0, 1) (a = 0 where no mean applies)."""
        c = chw[0]
        if self.value_mean is None:
            return torch.zeros(c)
        if self.value_mean == "natural":
            mu = self.natural_mean(chw, decorrelate=decorrelate)
            if mu is None:
                return torch.zeros(c)
            mu = mu.double().numpy()
        else:
            mu = np.broadcast_to(np.atleast_1d(np.asarray(self.value_mean, dtype=np.float64)), (c,))
        color = maco_color(c, decorrelate, "cpu")
        gains = np.ones(c) if color is None else np.linalg.norm(color.double().numpy(), axis=1)
        return torch.tensor([sigmoid_offset(float(m), float(g)) for m, g in zip(mu, gains)], dtype=torch.float32)

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
            mean = self.data[: self.limit].float().mean((0, 2, 3))
            self.provenance = {"source": "tensor", "n": min(len(self.data), self.limit)}
        else:
            key = self._key(chw, decorrelate)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            path = cache_dir() / f"{digest}.npy"
            if self.cache and path.is_file() and path.with_suffix(".json").is_file():
                m = torch.as_tensor(np.load(path), dtype=torch.float32)
                mean = torch.tensor(json.loads(path.with_suffix(".json").read_text())["value_mean"])
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
                mean = x.float().mean((0, 2, 3))
                self.provenance = {**key, "n": len(x), "computed": str(path) if self.cache else None}
                if self.cache:
                    _save_npy(path, m.numpy(), {**key, "value_mean": mean.tolist()})
        self._spectra[mem_key] = m
        self._means[mem_key] = mean.float()
        return m

    def make(self, shape, *, decorrelate=True, generators=None, start=None, device=None, sd: float = 1.0):
        """An ImageParam over the phase: random phase N(0, sd²) (Horama), or the phase of `start`."""
        from .param import ImageParam, _logit

        n, c, h, w = shape
        device = torch.device(device or "cpu")
        mag = self.magnitude((c, h, w), decorrelate=decorrelate).to(device)
        color = maco_color(c, decorrelate, device)
        offset = self.offsets((c, h, w), decorrelate=decorrelate).to(device)
        if start is not None:
            t = _logit(start.to(device=device, dtype=torch.float32)) - offset.view(1, -1, 1, 1)
            if color is not None:
                t = torch.einsum("nchw,dc->ndhw", t, torch.linalg.inv(color))
            leaf = torch.angle(torch.fft.rfft2(t)).contiguous()
        else:
            gens = generators if generators is not None else [None] * n
            leaf = torch.stack([torch.randn((c, h, w // 2 + 1), generator=g) for g in gens]).to(device) * sd
        leaf.requires_grad_(True)
        return ImageParam("maco", leaf, (n, c, h, w), decorrelate, scale=mag, color=color,
                          standardize_phase=self.standardize_phase and start is None, offset=offset)


@functools.lru_cache(maxsize=8)
def maco_for(default_data: str | None) -> Maco:
    """`param="maco"`: one Maco per default data source and process (its spectra memoized)."""
    return Maco(data=default_data)


def luminance_weight() -> float:
    """The per-channel weight of the luminance axis in lucid's colour matrix (the mean of its first column)."""
    from .param import COLOR_CORRELATION_NORMALIZED

    return float(COLOR_CORRELATION_NORMALIZED[:, 0].mean())


def maco_color(channels: int, decorrelate: bool, device) -> torch.Tensor | None:
    """MACO's colour step: lucid's matrix for RGB; for grey, the 1 x 1 matrix [luminance weight]."""
    from .param import _color_matrix

    if decorrelate and channels == 1:
        return torch.tensor([[luminance_weight()]], device=device)
    return _color_matrix(channels, decorrelate, device)


def sigmoid_offset(mean: float, gain: float, nodes: int = 96) -> float:
    """a with E[sigmoid(a + gain·z)] = mean for z ~ N(0, 1): Gauss-Hermite quadrature, then a root bracket."""
    from numpy.polynomial.hermite_e import hermegauss
    from scipy.optimize import brentq

    z, wq = hermegauss(nodes)
    wq = wq / wq.sum()
    mean = min(max(mean, 1e-4), 1 - 1e-4)
    return float(brentq(lambda a: float(wq @ (1 / (1 + np.exp(-(a + gain * z))))) - mean, -30.0, 30.0, xtol=1e-10))


def maco_image(phase: torch.Tensor, magnitude: torch.Tensor, hw, color: torch.Tensor | None = None,
               standardize_phase: bool = False, offset: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid(colour(standardize(irfft2(M e^{iψ}))) + a), ψ = standardize(φ) or φ, for phases N x C x H x W//2+1."""
    if standardize_phase:
        phase = standardize(phase)
    spatial = torch.fft.irfft2(torch.polar(magnitude.expand_as(phase), phase), s=tuple(hw))
    t = standardize(spatial)
    if color is not None:
        t = torch.einsum("nchw,dc->ndhw", t, color)
    if offset is not None:
        t = t + offset.view(1, -1, 1, 1).to(t.dtype)
    return torch.sigmoid(t)


def _save_npy(path: Path, array: np.ndarray, key: dict):
    import io

    from ..io import atomic_write_bytes, atomic_write_json

    buf = io.BytesIO()
    np.save(buf, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(path.with_suffix(".json"), key)


__all__ = ["Maco", "maco_for", "magnitude_spectrum", "maco_image", "maco_color", "luminance_weight", "sigmoid_offset",
           "standardize",
           "cache_dir", "MACO_RECIPE"]
