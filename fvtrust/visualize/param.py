"""Image parameterizations: what the optimizer actually changes.

`fft` (default, as lucid/lucent): per-channel spectra scaled by 1/f^decay so
the optimizer sees decorrelated spatial frequencies, then an inverse real FFT
(orthonormal, divided by lucid's magic 4), a colour decorrelation matrix for
RGB and a sigmoid into [0, 1]. `pixel`: raw logits through the same colour
step and sigmoid. `raw`: the pixels themselves, unconstrained (no sigmoid, no
clamping) for analyses that need the plain gradient ascent path. `maco`:
only the Fourier phase is optimized, the magnitude is a natural-image
spectrum (maco.py; `param=Maco(data=...)` chooses the data).

Every parameterization can start from given images (`start`): we invert the
map (logit, inverse colour matrix, forward FFT / scale), so a run can begin at
a natural image, as the linearity analysis does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FvtrustError

# lucid's colour correlation square root (ImageNet), columns normalized by the largest column norm
COLOR_CORRELATION_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                                         [0.27, 0.00, -0.05],
                                         [0.27, -0.09, 0.03]], dtype=np.float32)
COLOR_CORRELATION_NORMALIZED = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))
FFT_MAGIC = 4.0  # lucid's constant; larger values reduce saturation
PARAMS = ("fft", "pixel", "raw", "maco")


def rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """|frequency| of each rfft2 coefficient, shape (h, w // 2 + 1)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fft_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """1 / max(f, 1/max(h, w))^decay: lucid's spectrum scaling (shape h x (w//2+1))."""
    freqs = rfft2d_freqs(h, w)
    return torch.tensor(1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power, dtype=torch.float32)


@dataclass
class ImageParam:
    """A differentiable map from `tensor` (the optimized leaf) to images in [0, 1] (or raw)."""

    kind: str
    tensor: torch.Tensor
    shape: tuple  # (N, C, H, W) of the images
    decorrelate: bool
    scale: torch.Tensor | None = None
    color: torch.Tensor | None = None
    standardize_phase: bool = False  # maco only: standardize the phase before use (maco.py)
    value_map: tuple | None = None  # maco only: per-channel (a, k) of sigmoid(a + k·t), the natural statistics

    def image(self) -> torch.Tensor:
        n, c, h, w = self.shape
        t = self.tensor
        if self.kind == "raw":
            return t
        if self.kind == "maco":
            from .maco import maco_image

            return maco_image(t, self.scale, (h, w), self.color, self.standardize_phase, self.value_map)
        if self.kind == "fft":
            spec = torch.view_as_complex(t) * self.scale
            t = torch.fft.irfftn(spec, s=(h, w), norm="ortho") / FFT_MAGIC
        if self.color is not None:
            t = torch.einsum("nchw,dc->ndhw", t, self.color)
        return torch.sigmoid(t)

    __call__ = image


def _color_matrix(channels: int, decorrelate: bool, device) -> torch.Tensor | None:
    if not decorrelate or channels != 3:
        return None  # grey (or non-RGB) models: no colour decorrelation to apply
    return torch.tensor(COLOR_CORRELATION_NORMALIZED, device=device)


def _logit(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x) - torch.log1p(-x)


def make_param(kind: str, shape, *, decorrelate: bool = True, sd: float = 0.01, decay_power: float = 1.0,
               generators=None, start: torch.Tensor | None = None, device=None) -> ImageParam:
    """Build a parameterization for N images of shape (C, H, W).

    `generators`: one torch.Generator per image, so each image's random
    initialization depends only on its own seed (a unit gets the same start
    whether it is visualized alone or in a batch of 500). `kind` may also be an
    object with a `make` method (e.g. `maco.Maco(data=...)`); "maco" is `Maco()`
    without data (render's `visualize` gives it the model's default data).
    """
    if kind == "maco":
        from .maco import Maco

        kind = Maco()
    if not isinstance(kind, str) and hasattr(kind, "make"):
        return kind.make(shape, decorrelate=decorrelate, generators=generators, start=start, device=device)
    if kind not in PARAMS:
        raise FvtrustError(f"unknown parameterization {kind!r}; choose one of: {', '.join(PARAMS)}")
    n, c, h, w = shape
    device = torch.device(device or "cpu")
    color = _color_matrix(c, decorrelate, device) if kind != "raw" else None
    scale = fft_scale(h, w, decay_power).to(device) if kind == "fft" else None
    leaf_shape = (c, h, w // 2 + 1, 2) if kind == "fft" else (c, h, w)

    if start is not None:
        start = start.to(device=device, dtype=torch.float32)
        if tuple(start.shape) != (n, c, h, w):
            raise FvtrustError(f"start images have shape {tuple(start.shape)}, expected {(n, c, h, w)}")
        if kind == "raw":
            leaf = start.clone()
        else:
            t = _logit(start)
            if color is not None:
                t = torch.einsum("nchw,dc->ndhw", t, torch.linalg.inv(color))
            if kind == "fft":
                spec = torch.fft.rfftn(t * FFT_MAGIC, s=(h, w), norm="ortho") / scale
                leaf = torch.view_as_real(spec).contiguous()
            else:
                leaf = t
    else:
        if generators is None:
            generators = [None] * n
        noise = [torch.randn(leaf_shape, generator=g) for g in generators]
        leaf = torch.stack(noise).to(device) * sd
        if kind == "raw":
            leaf = leaf + 0.5  # mid-grey plus small noise: the raw analogue of sigmoid(noise)
    leaf.requires_grad_(True)
    return ImageParam(kind, leaf, (n, c, h, w), decorrelate, scale, color)


def seed_generators(seed: int, keys) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, key) so results are batch-invariant."""
    gens = []
    for k in keys:
        g = torch.Generator()
        g.manual_seed((int(seed) * 1_000_003 + hash(k) % 1_000_000_007) % (2**63 - 1))
        gens.append(g)
    return gens


def fft_param_count(h: int, w: int) -> int:
    return h * (w // 2 + 1) * 2


__all__ = ["ImageParam", "make_param", "fft_scale", "rfft2d_freqs", "COLOR_CORRELATION_NORMALIZED", "PARAMS",
           "seed_generators"]
