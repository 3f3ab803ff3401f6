"""Random transforms for transformation robustness, fused into one resampling.

lucent 0.1.8's `standard_transforms` are, in order: pad 12 (constant 0.5),
jitter 8 (a translation by 0..7 px with zero fill), random scale
1 + (i-5)/50 (bilinear, align_corners=True, zero pad back when shrinking),
random rotation by -10..10 degrees (0 given 5 extra draws) about the centre
with zero fill, jitter 4; the paper adds a centre crop to the model's size.

lucent applies these as five separate resamplings. Each is an affine map of
pixel coordinates, so we compose them into one 2x3 matrix per step and sample
the 0.5-padded image once with `grid_sample` (bilinear, zeros outside): same
geometry, one interpolation instead of several, far less memory traffic.
Integer translations and the padding are exact; scale and rotation differ
from lucent only by interpolating once rather than twice.

Sizes are lucent's at 224 px and scale with the image for other sizes:
pad = max(1, round(12 s / 224)), jitter = max(2, round(8 s / 224)) and
max(2, round(4 s / 224)); scales and angles are unchanged. At 28 px that is
pad 2, jitter 2, jitter 2.

As in lucent, one random draw per step is shared by the whole batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FvtrustError

STANDARD_SCALES = tuple(1 + (i - 5) / 50.0 for i in range(11))
STANDARD_ANGLES = tuple(list(range(-10, 11)) + 5 * [0])


@dataclass
class TransformSpec:
    """Parameters of the standard chain; `None` disables a stage."""

    pad: int = 12
    pad_value: float = 0.5
    jitter1: int | None = 8
    scales: tuple | None = STANDARD_SCALES
    angles: tuple | None = STANDARD_ANGLES
    jitter2: int | None = 4
    crop: tuple | None = None  # (h, w) centre crop; None = the input size
    extra: dict = field(default_factory=dict)

    @classmethod
    def standard(cls, size: int = 224) -> "TransformSpec":
        if size == 224:
            return cls()
        r = size / 224.0
        return cls(pad=max(1, round(12 * r)), jitter1=max(2, round(8 * r)), jitter2=max(2, round(4 * r)))

    def to_dict(self):
        return {"pad": self.pad, "pad_value": self.pad_value, "jitter1": self.jitter1,
                "scales": list(self.scales) if self.scales else None,
                "angles": list(self.angles) if self.angles else None, "jitter2": self.jitter2, "crop": self.crop}


def resolve_transforms(transforms, size: int) -> TransformSpec | None:
    """'standard' | 'none' | None | TransformSpec -> TransformSpec or None (identity)."""
    if transforms is None or transforms is False or transforms == "none":
        return None
    if isinstance(transforms, TransformSpec):
        return transforms
    if transforms == "standard":
        return TransformSpec.standard(size)
    raise FvtrustError(f"unknown transforms {transforms!r}; choose standard or none")


@dataclass
class Draw:
    """One step's random choices (shared by the batch)."""

    o1: tuple  # jitter 1 translation (dy, dx)
    scale: float
    angle: float  # degrees
    o2: tuple  # jitter 2 translation (dy, dx)


def draw(spec: TransformSpec, rng: np.random.Generator) -> Draw:
    def jit(d):
        return (int(rng.integers(d)), int(rng.integers(d))) if d else (0, 0)

    o1 = jit(spec.jitter1)
    scale = float(spec.scales[int(rng.integers(len(spec.scales)))]) if spec.scales else 1.0
    angle = float(spec.angles[int(rng.integers(len(spec.angles)))]) if spec.angles else 0.0
    return Draw(o1, scale, angle, jit(spec.jitter2))


def sampling_grid(spec: TransformSpec, d: Draw, in_hw, out_hw, device, dtype=torch.float32):
    """The grid (1 x Ho x Wo x 2, align_corners=True units) into the *padded* image.

    Output pixel indices are mapped back through crop, jitter 2, rotation,
    scale (+ its zero pad) and jitter 1 to indices of the padded canvas.
    """
    h, w = in_hw
    p = spec.pad
    ph, pw = h + 2 * p, w + 2 * p  # canvas after padding (and after jitter 1, a translation)
    mh, mw = math.ceil(d.scale * ph - 1e-9), math.ceil(d.scale * pw - 1e-9)
    qh, qw = max(0, math.ceil((ph - mh) / 2 - 1e-9)), max(0, math.ceil((pw - mw) / 2 - 1e-9))
    nh, nw = mh + 2 * qh, mw + 2 * qw  # size after scale (and after rotation / jitter 2)
    oh, ow = out_hw
    ch, cw = (nh - oh) // 2, (nw - ow) // 2  # centre crop offsets

    ys = torch.arange(oh, device=device, dtype=torch.float64) + ch - d.o2[0]
    xs = torch.arange(ow, device=device, dtype=torch.float64) + cw - d.o2[1]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    # inverse rotation about the centre of the nh x nw image
    zy, zx = (nh - 1) / 2.0, (nw - 1) / 2.0
    a = -math.radians(d.angle)  # kornia: positive angle = counter-clockwise on screen
    ca, sa = math.cos(a), math.sin(a)
    ry, rx = yy - zy, xx - zx
    y2 = ca * ry - sa * rx + zy
    x2 = sa * ry + ca * rx + zx
    # undo the scale's zero pad, then the align_corners=True upsampling
    y1 = (y2 - qh) * ((ph - 1) / (mh - 1) if mh > 1 else 1.0)
    x1 = (x2 - qw) * ((pw - 1) / (mw - 1) if mw > 1 else 1.0)
    # undo jitter 1 (a translation of the padded canvas)
    yp, xp = y1 - d.o1[0], x1 - d.o1[1]
    gy = yp / (ph - 1) * 2 - 1
    gx = xp / (pw - 1) * 2 - 1
    return torch.stack([gx, gy], dim=-1)[None].to(dtype)


def apply(images: torch.Tensor, spec: TransformSpec | None, d: Draw | None, out_hw=None) -> torch.Tensor:
    """Pad with `pad_value`, then one bilinear resampling through the composed map."""
    if spec is None:
        return images
    n, c, h, w = images.shape
    out_hw = tuple(spec.crop or out_hw or (h, w))
    padded = F.pad(images, [spec.pad] * 4, value=spec.pad_value) if spec.pad else images
    grid = sampling_grid(spec, d, (h, w), out_hw, images.device, images.dtype).expand(n, -1, -1, -1)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
