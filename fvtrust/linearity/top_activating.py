"""The M natural images that activate a unit most: the starts of the linearity paths.

All units are ranked in one pass over the data: each batch's activations for
every requested unit are merged into a running top-M per unit (a stable sort
of the current top M and the new batch), so the cost is one forward pass per
image regardless of the number of units. Ties go to the earlier image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import FvtrustError, nearest
from ..models.hooks import forward_to
from ..models.layers import layer_units, parse_units
from ..progress import progress

UNIT_OBJECTIVES = ("channel", "neuron")


@dataclass
class TopActivating:
    """images: (units x) M x C x H x W; values, indices: (units x) M, best first."""

    images: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    units: list
    layer: str
    objective: str

    def to_dict(self) -> dict:
        return {"layer": self.layer, "units": list(self.units), "objective": self.objective,
                "indices": self.indices.tolist(), "values": self.values.tolist()}


def unit_activations(acts: torch.Tensor, units: torch.Tensor, objective: str = "channel") -> torch.Tensor:
    """(B, U) activation of each unit on each image, as the visualization objective measures it.

    `channel`: mean over positions (fvtrust.visualize.Channel); `neuron`: the
    value at the spatial centre (H // 2, W // 2) as fvtrust.visualize.Neuron.
    """
    a = acts.index_select(1, units)
    if a.dim() == 2:
        return a
    if objective == "channel":
        return a.reshape(a.shape[0], a.shape[1], -1).mean(2)
    if a.dim() == 4:
        return a[:, :, a.shape[2] // 2, a.shape[3] // 2]
    return a.reshape(a.shape[0], a.shape[1], -1).mean(2)


def _num_images(data) -> int:
    if isinstance(data, torch.Tensor):
        return len(data)
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return len(data[0])
    if isinstance(data, Dataset):
        return len(data)
    raise FvtrustError(f"data must be an image tensor (N x C x H x W), an (images, labels) pair or a Dataset, "
                       f"not {type(data).__name__}")


def _as_dataset(data) -> Dataset:
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)):
        return TensorDataset(data[0])
    return data


def _image_of(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _batches(data, batch_size: int):
    """Yield image batches in dataset order; tensors are sliced, other datasets loaded item by item."""
    ds = _as_dataset(data)
    if isinstance(ds, TensorDataset):
        x = ds.tensors[0]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]
        return
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=lambda items: torch.stack([_image_of(it) for it in items]))
    yield from loader


def _gather(data, indices: torch.Tensor) -> torch.Tensor:
    ds = _as_dataset(data)
    flat = indices.reshape(-1).tolist()
    if isinstance(ds, TensorDataset):
        imgs = ds.tensors[0][torch.as_tensor(flat, dtype=torch.long)]
    else:
        imgs = torch.stack([_image_of(ds[i]) for i in flat])
    return imgs.reshape(*indices.shape, *imgs.shape[1:]).float()


@torch.no_grad()
def top_activating_many(model, layer: str, units, data, m: int = 20, *, objective: str = "channel",
                        batch_size: int = 256) -> TopActivating:
    """The m most activating images of each unit, from one streaming pass over `data`.

    Returns images (U, m, C, H, W), values (U, m) and dataset indices (U, m),
    sorted best first. `data`: a tensor N x C x H x W in [0, 1], an
    (images, labels) pair, a Dataset of (image, label), or a data source
    (fvtrust.data.natural: its evaluation part is ranked).
    """
    from ..data import NaturalData, natural
    from ..models import as_model

    if isinstance(data, (str, NaturalData)) or data is None:
        model = as_model(model, example=data if isinstance(data, NaturalData) else None)
        data = natural(data, model=model).evaluation.dataset
    model = as_model(model, example=data if isinstance(data, (torch.Tensor, tuple)) else None)
    if objective not in UNIT_OBJECTIVES:
        raise FvtrustError(f"unknown objective {objective!r} for ranking images; nearest: "
                           f"{nearest(objective, UNIT_OBJECTIVES)}")
    units = parse_units(units, layer_units(model, layer), layer)
    n = _num_images(data)
    if m < 1:
        raise FvtrustError(f"m must be >= 1, got {m}")
    if n < m:
        raise FvtrustError(f"need at least m={m} images to pick the top {m}, the data has {n}")
    if batch_size < 1:
        raise FvtrustError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device
    u_t = torch.as_tensor(units, device=device)
    best_v = torch.empty(0, len(units))
    best_i = torch.empty(0, len(units), dtype=torch.long)
    offset = 0
    for x in progress(_batches(data, batch_size), total=-(-n // batch_size), desc=f"top-{m} {layer}", unit="batch"):
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(model.input_shape):
            raise FvtrustError(f"data images have shape {tuple(x.shape[1:])}, the model expects "
                               f"{tuple(model.input_shape)}")
        acts = forward_to(model, x.to(device=device, dtype=torch.float32), [layer], detach=True)[layer]
        vals = unit_activations(acts, u_t, objective).float().cpu()
        idx = torch.arange(offset, offset + len(x)).unsqueeze(1).expand(-1, len(units))
        offset += len(x)
        # merge: current top (earlier images) first, so the stable sort breaks ties by index
        cat_v, cat_i = torch.cat([best_v, vals]), torch.cat([best_i, idx])
        order = torch.sort(cat_v, dim=0, descending=True, stable=True).indices[:m]
        best_v, best_i = cat_v.gather(0, order), cat_i.gather(0, order)
    if not torch.isfinite(best_v).all():
        raise FvtrustError(f"non-finite activations in {layer}: check the data and the model weights")
    values, indices = best_v.T.contiguous(), best_i.T.contiguous()
    return TopActivating(_gather(data, indices), values, indices, list(units), layer, objective)


def top_activating(model, layer: str, unit: int, data, m: int = 20, *, objective: str = "channel",
                   batch_size: int = 256) -> TopActivating:
    """The m most activating images of one unit: images (m, C, H, W), values and indices (m,)."""
    res = top_activating_many(model, layer, [int(unit)], data, m, objective=objective, batch_size=batch_size)
    return TopActivating(res.images[0], res.values[0], res.indices[0], res.units, layer, objective)


__all__ = ["UNIT_OBJECTIVES", "TopActivating", "top_activating", "top_activating_many", "unit_activations"]
