"""Target pictures: scikit-image's bundled images by name, or any image file.

Used as "arbitrary pictures" a manipulated unit should visualize as; resized
and converted to the model's input shape (grey for 1-channel models).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FvtrustError, nearest

# bundled with scikit-image (no download needed)
PICTURES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "horse", "moon", "page", "text",
            "immunohistochemistry", "hubble_deep_field", "coins", "clock", "grass", "gravel", "brick", "logo",
            "retina", "shepp_logan_phantom"]


def list_pictures() -> list[str]:
    import skimage.data

    return [p for p in PICTURES if hasattr(skimage.data, p)]


def _read(name_or_path) -> np.ndarray:
    p = Path(str(name_or_path))
    if p.suffix and p.exists():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise FvtrustError(f"cannot read picture {p}: {e}") from None
    if p.suffix or "/" in str(name_or_path):
        raise FvtrustError(f"picture file not found: {name_or_path}")
    import skimage.data

    names = list_pictures()
    if str(name_or_path) not in names:
        raise FvtrustError(f"unknown picture {name_or_path!r}; choose one of: {nearest(str(name_or_path), names, 8)}"
                           " or give an image path")
    try:
        arr = np.asarray(getattr(skimage.data, str(name_or_path))())
        return arr.astype(np.float32) if arr.dtype == bool else arr
    except Exception as e:  # noqa: BLE001 - e.g. a picture skimage must download
        raise FvtrustError(f"scikit-image picture {name_or_path!r} is not available offline ({e})") from None


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8/float array -> float CHW in [0, 1] (RGB, alpha dropped)."""
    a = np.asarray(arr)
    scale = 255.0 if a.dtype == np.uint8 else (65535.0 if a.dtype == np.uint16 else 1.0)
    a = a.astype(np.float32) / scale
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    a = a[..., :3]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).clamp(0, 1)


def fit_to_shape(img: torch.Tensor, shape) -> torch.Tensor:
    """Centre-crop to the target aspect ratio, resize (antialiased), match channels."""
    c, h, w = shape
    _, ih, iw = img.shape
    target = w / h
    if iw / ih > target:
        nw = int(round(ih * target))
        x0 = (iw - nw) // 2
        img = img[:, :, x0:x0 + nw]
    else:
        nh = int(round(iw / target))
        y0 = (ih - nh) // 2
        img = img[:, y0:y0 + nh, :]
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    if c == 1:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    elif c != 3:
        raise FvtrustError(f"cannot convert a picture to {c} channels")
    return img.clamp(0, 1)


def load_picture(name_or_path, shape=(3, 224, 224)) -> torch.Tensor:
    """A scikit-image picture name or an image path, as a float CHW tensor of `shape` in [0, 1]."""
    return fit_to_shape(to_tensor(_read(name_or_path)), shape)


def natural_pictures(shape, crops_per_picture: int = 4, seed: int = 0) -> torch.Tensor:
    """All bundled pictures plus random crops: a small natural set for models without data."""
    return natural_pictures_grouped(shape, crops_per_picture, seed)[0]


def natural_pictures_grouped(shape, crops_per_picture: int = 4, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(images, picture index of each image): every picture, then its random crops.

    The group lets fvtrust.data.natural split fit/held-out by picture, so no
    picture has crops on both sides.
    """
    g = torch.Generator().manual_seed(seed)
    out, group = [], []
    for name in list_pictures():
        try:
            full = to_tensor(_read(name))
        except FvtrustError:
            continue
        out.append(fit_to_shape(full, shape))
        group.append(len(set(group)))
        _, ih, iw = full.shape
        for _ in range(crops_per_picture):
            frac = 0.4 + 0.5 * torch.rand(1, generator=g).item()
            ch, cw = max(8, int(ih * frac)), max(8, int(iw * frac))
            y0 = int(torch.randint(0, ih - ch + 1, (1,), generator=g))
            x0 = int(torch.randint(0, iw - cw + 1, (1,), generator=g))
            out.append(fit_to_shape(full[:, y0:y0 + ch, x0:x0 + cw], shape))
            group.append(group[-1])
    return torch.stack(out), np.asarray(group)
