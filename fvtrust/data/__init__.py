"""Natural data: Fashion-MNIST (IDX), ImageNet-style folders, bundled pictures."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import FvtrustError
from .folders import image_folder
from .idx import load_fashion_mnist, read_idx
from .pictures import list_pictures, load_picture, natural_pictures

__all__ = ["load_fashion_mnist", "read_idx", "image_folder", "load_picture", "list_pictures",
           "natural_pictures", "load_data", "as_tensors"]


def load_data(spec: str | None, *, input_shape=(1, 28, 28), split: str = "test", data_dir=None) -> Dataset:
    """Resolve a data spec to a Dataset of ([0, 1] CHW image, label).

    Specs: ``fashion-mnist`` (split chosen by `split`, or ``fashion-mnist:train``),
    a path to an ImageNet-style folder, or ``pictures`` (scikit-image pictures and
    crops, label -1: for models without a labelled dataset at hand).
    """
    spec = spec or "fashion-mnist"
    if spec.startswith("fashion-mnist"):
        if ":" in spec:
            split = spec.split(":", 1)[1]
        if tuple(input_shape) != (1, 28, 28):
            raise FvtrustError(f"Fashion-MNIST images are 1x28x28 but the model expects {tuple(input_shape)}; "
                               "give --data an ImageNet-style folder")
        x, y = load_fashion_mnist(split, data_dir)
        return TensorDataset(x, y)
    if spec == "pictures":
        x = natural_pictures(input_shape)
        return TensorDataset(x, torch.full((len(x),), -1, dtype=torch.long))
    if Path(spec).is_dir():
        return image_folder(spec, size=input_shape[-1])
    raise FvtrustError(f"unknown data {spec!r}: use fashion-mnist[:train|test], pictures, or a folder path")


def as_tensors(ds: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialize (a prefix of) a dataset as (images, labels) tensors."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return (x[:limit], y[:limit]) if limit else (x, y)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.as_tensor([b for _, b in items])
