"""The one place fvtrust.visualize and compare ask for natural images: `fvtrust.data.natural`, one part of it.

MACO's magnitude spectrum and accentuation's seeds are *fitted* on natural
data, so they read the ``fit`` part (Fashion-MNIST's training split on the
embedded default); compare-methods judges every method on the ``heldout``
part (the test split), images no method saw.
"""
from __future__ import annotations

import torch

from ..errors import FvtrustError


def natural_images(source, input_shape=None, *, part: str = "fit", limit: int | None = None, data_dir=None,
                   with_labels: bool = False, model=None, class_index=None, natural_limit=None):
    """[0, 1] images (N x C x H x W) of `source`'s `part` ('fit' or 'heldout'), the first `limit` of them.

    `source` is anything `fvtrust.data.natural` takes (None: the model's default data).
    """
    from ..data import natural

    if part not in ("fit", "heldout"):
        raise FvtrustError(f"unknown natural data part {part!r}; choose fit or heldout")
    data = natural(source, model=model, input_shape=None if model is not None else input_shape, limit=natural_limit,
                   class_index=class_index, data_dir=data_dir)
    x, y = getattr(data, part).tensors(limit)
    if len(x) == 0:
        raise FvtrustError(f"natural data {data.source!r} has no {part} images")
    x = x.float()
    return (x, torch.as_tensor(y)) if with_labels else x


def describe(source, model=None) -> str:
    if source is None:
        source = getattr(model, "default_data", None)
    return "tensor" if isinstance(source, torch.Tensor) else str(source)
