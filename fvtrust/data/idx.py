"""Fashion-MNIST from IDX files, read directly (no torchvision needed offline).

Search order: an explicit `data_dir`, then $FVTRUST_FASHION_MNIST, then the
Debian package's folder /usr/share/datasets/fashion-mnist, then torchvision's
download into ~/.cache/fvtrust (only where online).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import FvtrustError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("FVTRUST_CACHE", Path.home() / ".cache" / "fvtrust"))
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (optionally .gz); raise FvtrustError on anything malformed."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise FvtrustError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise FvtrustError(f"corrupt IDX file {path}: bad magic number")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FvtrustError(f"corrupt IDX file {path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise FvtrustError(f"corrupt IDX file {path}: expected {expected} data bytes for shape {shape}, "
                           f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidates(data_dir):
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("FVTRUST_FASHION_MNIST")
    dirs = [Path(env)] if env else []
    return dirs + [DEBIAN_DIR, CACHE_DIR / "FashionMNIST" / "raw"]


def locate_fashion_mnist(split: str, data_dir=None) -> tuple[Path, Path]:
    if split not in FILES:
        raise FvtrustError(f"unknown Fashion-MNIST split {split!r}; choose train or test")
    img_stem, lbl_stem, _ = FILES[split]
    tried = []
    for folder in _candidates(data_dir):
        img, lbl = _find(folder, img_stem), _find(folder, lbl_stem)
        if img and lbl:
            return img, lbl
        tried.append(str(folder))
    if data_dir is not None:
        raise FvtrustError(f"Fashion-MNIST {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not found in {data_dir}")
    try:  # last resort: torchvision's download (needs the network)
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(CACHE_DIR), train=(split == "train"), download=True)
    except Exception as e:  # noqa: BLE001 - any download failure becomes one clear line
        raise FvtrustError(
            f"Fashion-MNIST not found (looked in {', '.join(tried)}) and download failed ({type(e).__name__}); "
            "install the Debian package dataset-fashion-mnist or pass --data-dir") from None
    img, lbl = _find(CACHE_DIR / "FashionMNIST" / "raw", img_stem), _find(CACHE_DIR / "FashionMNIST" / "raw", lbl_stem)
    if not (img and lbl):
        raise FvtrustError("Fashion-MNIST download finished but the IDX files are missing")
    return img, lbl


def load_fashion_mnist(split: str = "test", data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 N x 1 x 28 x 28 in [0, 1] and int64 labels."""
    img_path, lbl_path = locate_fashion_mnist(split, data_dir)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise FvtrustError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise FvtrustError(f"Fashion-MNIST {split}: labels outside 0..9 in {lbl_path}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
