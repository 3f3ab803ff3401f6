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

`transforms="maco"` is instead Fel et al.'s MACO augmentation (:class:`CropSpec`):
each step shows the model `crops` random square crops of every image plus pixel
noise and averages the objective over them, the published recipe that
MACO's phase-only parameterization was designed with (see maco.py).
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

    views = 1  # images the model sees per visualized image and step

    def to_dict(self):
        return {"pad": self.pad, "pad_value": self.pad_value, "jitter1": self.jitter1,
                "scales": list(self.scales) if self.scales else None,
                "angles": list(self.angles) if self.angles else None, "jitter2": self.jitter2, "crop": self.crop}


@dataclass
class CropSpec:
    """Fel et al.'s MACO augmentation: several random square crops per image and step, plus noise.

    Each of the `crops` views is a square of side d·S (S the image side, d
    uniform in `box`) centred at (0.5 + N(0, centre_sd²)) · S per axis,
    resampled bilinearly to the model's input size with zeros outside the
    image, plus N(0, noise²) + U(-noise/2, noise/2) per pixel. The model sees
    all views in one batch and the objective is their mean. `box=(1.0, 1.1)`
    is what Horama 0.3.0's `maco` draws when asked for (0.9, 1.0), the box
    range fvtrust's anchor gives it at a model's own size (Horama's
    `delta = U·(hi - lo) + hi`): both MACOs see the same crops.
    One draw per step is shared by the whole batch (as lucent's transforms),
    so an image's crops do not depend on its batch.
    """

    crops: int = 6
    box: tuple = (1.0, 1.1)
    centre_sd: float = 0.15
    noise: float = 0.05

    @property
    def views(self) -> int:
        return self.crops

    def to_dict(self):
        return {"kind": "maco-crops", "crops": self.crops, "box": list(self.box), "centre_sd": self.centre_sd,
                "noise": self.noise}


@dataclass
class CropDraw:
    """One step's crops (shared by the batch): centres (K x 2, x then y, image fractions), sides (K), noise seed."""

    centres: np.ndarray
    sides: np.ndarray
    noise_seed: int


TRANSFORMS = ("standard", "maco", "none")


def resolve_transforms(transforms, size: int):
    """'standard' | 'maco' | 'none' | None | TransformSpec | CropSpec -> a spec or None (identity)."""
    if transforms is None or transforms is False or transforms == "none":
        return None
    if isinstance(transforms, (TransformSpec, CropSpec)):
        return transforms
    if transforms == "standard":
        return TransformSpec.standard(size)
    if transforms == "maco":
        return CropSpec()
    raise FvtrustError(f"unknown transforms {transforms!r}; choose one of: {', '.join(TRANSFORMS)}")


@dataclass
class Draw:
    """One step's random choices (shared by the batch)."""

    o1: tuple  # jitter 1 translation (dy, dx)
    scale: float
    angle: float  # degrees
    o2: tuple  # jitter 2 translation (dy, dx)


def draw(spec, rng: np.random.Generator):
    if isinstance(spec, CropSpec):
        k = spec.crops
        centres = 0.5 + rng.standard_normal((k, 2)) * spec.centre_sd
        sides = spec.box[0] + rng.random(k) * (spec.box[1] - spec.box[0])
        return CropDraw(centres, sides, int(rng.integers(2**62)))

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


def crop_theta(d: CropDraw) -> torch.Tensor:
    """K x 2 x 3 affine maps (align_corners=False units) from crop coordinates to image coordinates.

    A crop of side s (image fraction) centred at c maps output coordinate
    u in [-1, 1] to input coordinate (2c - 1) + s·u.
    """
    k = len(d.sides)
    theta = torch.zeros(k, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.as_tensor(d.sides)
    theta[:, :, 2] = torch.as_tensor(2 * d.centres - 1)
    return theta


def apply_crops(images: torch.Tensor, spec: CropSpec, d: CropDraw, out_hw=None) -> torch.Tensor:
    """N x C x H x W -> (N·K) x C x Ho x Wo: image i's K crops are rows i·K .. i·K + K - 1."""
    n, c, h, w = images.shape
    k = spec.crops
    oh, ow = tuple(out_hw or (h, w))
    grid = F.affine_grid(crop_theta(d).to(images.dtype), [k, c, oh, ow], align_corners=False).to(images.device)
    x = F.grid_sample(images.repeat_interleave(k, 0), grid.repeat(n, 1, 1, 1), mode="bilinear",
                      padding_mode="zeros", align_corners=False)
    if spec.noise:
        g = torch.Generator().manual_seed(d.noise_seed)
        noise = (torch.randn((k, c, oh, ow), generator=g) * spec.noise
                 + (torch.rand((k, c, oh, ow), generator=g) - 0.5) * spec.noise)
        x = x + noise.to(device=images.device, dtype=images.dtype).repeat(n, 1, 1, 1)
    return x


def apply(images: torch.Tensor, spec, d, out_hw=None) -> torch.Tensor:
    """Pad with `pad_value`, then one bilinear resampling through the composed map (CropSpec: `apply_crops`)."""
    if spec is None:
        return images
    if isinstance(spec, CropSpec):
        return apply_crops(images, spec, d, out_hw)
    n, c, h, w = images.shape
    out_hw = tuple(spec.crop or out_hw or (h, w))
    padded = F.pad(images, [spec.pad] * 4, value=spec.pad_value) if spec.pad else images
    grid = sampling_grid(spec, d, (h, w), out_hw, images.device, images.dtype).expand(n, -1, -1, -1)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
