"""Natural data: one resolver (`natural`) over Fashion-MNIST (IDX), ImageNet-style folders, bundled pictures."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import FvtrustError
from .folders import folder_class_map, image_folder, imagenet_wnids
from .idx import load_fashion_mnist, read_idx
from .natural import NaturalData, natural
from .pictures import list_pictures, load_picture, natural_pictures

__all__ = ["natural", "NaturalData", "folder_class_map", "imagenet_wnids", "load_fashion_mnist", "read_idx", "image_folder", "load_picture", "list_pictures",
           "natural_pictures", "load_data", "as_tensors"]


def load_data(spec: str | None, *, input_shape=(1, 28, 28), split: str = "test", data_dir=None,
              class_index=None, model=None) -> Dataset:
    """The evaluation part of `natural(spec)` as a Dataset of ([0, 1] CHW image, label).

    Kept for callers that want a plain Dataset; `natural` is the one resolver.
    ``fashion-mnist`` without a split means `split` here.
    """
    spec = spec or "fashion-mnist"
    if spec == "fashion-mnist":
        spec = f"fashion-mnist:{split}"
    data = natural(spec, model=model, input_shape=input_shape if model is None else None, data_dir=data_dir,
                   class_index=class_index)
    if spec.startswith("fashion-mnist:"):
        return data.dataset
    return data.evaluation.dataset


def as_tensors(ds: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialize (a prefix of) a dataset as (images, labels) tensors."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return (x[:limit], y[:limit]) if limit else (x, y)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.as_tensor([b for _, b in items])
