"""Top-1 / top-5 accuracy: the check that a manipulated model still behaves."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import FvtrustError
from .progress import progress


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256, desc: str | None = None) -> torch.Tensor:
    """Logits for a tensor of [0, 1] images, in batches on the model's device."""
    from .models import as_model

    model = as_model(model, example=images)
    dev = model.device
    outs = [model(images[i:i + batch_size].to(dev)).float().cpu()
            for i in progress(range(0, len(images), batch_size), desc=desc, unit="batch")]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def evaluate(model, data: Dataset | tuple, *, batch_size: int = 256, limit: int | None = None,
             num_workers: int = 0, desc: str = "evaluate") -> dict:
    """Accuracy of `model` on natural data; returns n, top1, top5 and per-example predictions.

    data: (images, labels), a Dataset, or a data source for fvtrust.data.natural
    (its evaluation part: Fashion-MNIST test for the embedded default, every
    image of a folder). Unlabelled data is refused in one line.
    """
    from .data import NaturalData, natural
    from .models import as_model

    if data is None or isinstance(data, (str, NaturalData)):
        model = as_model(model, example=data if isinstance(data, NaturalData) else None)
        part = natural(data, model=model).evaluation
        part.require_labels("accuracy")
        data = part.dataset
    model = as_model(model, example=data if isinstance(data, tuple) else None)
    if isinstance(data, tuple):
        data = TensorDataset(*data)
    if limit:
        data = torch.utils.data.Subset(data, range(min(limit, len(data))))
    if len(data) == 0:
        raise FvtrustError("no images to evaluate")
    if isinstance(data, TensorDataset):  # plain slicing: no DataLoader machinery (or RNG draws)
        xs, ys = data.tensors
        loader = ((xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(xs), batch_size))
        loader = progress(loader, total=(len(xs) + batch_size - 1) // batch_size, desc=desc, unit="batch")
    else:
        loader = progress(DataLoader(data, batch_size=batch_size, num_workers=num_workers), desc=desc, unit="batch")
    dev = model.device
    correct1 = correct5 = n = 0
    preds = []
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        if x.shape[1:] != tuple(model.input_shape):
            raise FvtrustError(f"images of shape {tuple(x.shape[1:])} do not fit {model.spec}, which expects "
                               f"{tuple(model.input_shape)}")
        logits = model(x)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += len(y)
        preds.append(top[:, 0].cpu())
    return {"n": n, "top1": correct1 / n, "top5": correct5 / n, "predictions": torch.cat(preds)}
