"""The one place fvtrust.visualize asks for natural images (MACO's spectrum, accentuation seeds, compare-methods).

Natural data comes in two parts: ``fit`` (what a method may learn from, e.g.
MACO's magnitude spectrum: Fashion-MNIST's training split) and ``heldout``
(what a method is judged on: the test split). This adapter sits on
:func:`fvtrust.data.load_data` until `fvtrust.data.natural` owns the split.
"""
from __future__ import annotations

import torch

from ..errors import FvtrustError


def default_source(input_shape) -> str:
    if tuple(input_shape) == (1, 28, 28):
        return "fashion-mnist"
    raise FvtrustError(f"no default natural data for input shape {tuple(input_shape)}: give --data "
                       "(an ImageNet-style folder)")


def natural_images(source: str | None, input_shape, *, part: str = "fit", limit: int | None = None,
                   data_dir=None, with_labels: bool = False):
    """[0, 1] images (N x C x H x W) of `source`'s `part` ('fit' or 'heldout'), the first `limit` of them."""
    from ..data import as_tensors, load_data

    if part not in ("fit", "heldout"):
        raise FvtrustError(f"unknown natural data part {part!r}; choose fit or heldout")
    source = source or default_source(input_shape)
    if source.startswith("fashion-mnist") and ":" not in source:
        source = "fashion-mnist:" + ("train" if part == "fit" else "test")
    ds = load_data(source, input_shape=input_shape, split="train" if part == "fit" else "test", data_dir=data_dir)
    x, y = as_tensors(ds, limit)
    if len(x) == 0:
        raise FvtrustError(f"natural data {source!r} has no images")
    x = x.float()
    return (x, torch.as_tensor(y)) if with_labels else x


def describe(source: str | None, input_shape) -> str:
    return source or default_source(input_shape)
