"""The one place that decides what natural data is: `natural(source, ...)` -> NaturalData.

Every command and API that needs natural images (evaluate, the fooling
circuit and its detector, silent units, the sanity check, linearity,
reproduce, the audit) resolves its ``data`` argument here, so a user's
ImageNet folder reaches all of them the same way, and no module decides by
the input shape what "natural" means.

Parts. A construction that *fits* something on natural data (ȳ_max,nat of a
silent unit, the bounds for the circuit's k, the detector's natural set) must
be checked on images it never saw. So a NaturalData declares two disjoint
parts: ``fit`` (what constructions measure on) and ``heldout`` (what their
checks run on), plus ``evaluation`` (what measure-only commands such as
``evaluate`` and ``sanity-check`` read, since nothing is fitted there):

=====================  ===================  ====================  =================
source                 fit                  heldout               evaluation
=====================  ===================  ====================  =================
``fashion-mnist``      the train split      the test split        the test split
``fashion-mnist:S``    seeded half of S     the other half        all of S
a folder               seeded half          the other half        all images
``pictures``           even-indexed         odd-indexed pictures  all
                       pictures + crops     + crops (no picture
                                            in both)
a tensor               all of it            none                  all of it
=====================  ===================  ====================  =================

``limit`` (``--natural-limit``) caps every part at that many images (the
first ones in a fixed seeded order, so a larger limit extends a smaller one).
Labels are the model's class indices (folders are mapped by
:func:`fvtrust.data.folders.folder_class_map`); -1 means unlabelled, and
`require_labels` says why in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import FvtrustError

DEFAULT_FIT_FRACTION = 0.5


@dataclass
class NaturalData:
    """Natural images of one source (or one part of it): a Dataset of ([0, 1] C x H x W, label)."""

    dataset: Dataset
    source: str
    role: str = "all"
    path: str | None = None
    labels_note: str | None = None  # None: labelled; else why labels are unavailable
    label_rule: str | None = None   # how labels were decided (folders)
    parts: dict = field(default_factory=dict, repr=False)

    # -- parts -------------------------------------------------------------------------------------------
    @property
    def fit(self) -> "NaturalData":
        return self.parts.get("fit", self)

    @property
    def heldout(self) -> "NaturalData":
        part = self.parts.get("heldout")
        if part is None:
            raise FvtrustError(f"natural data {self.source} has no held-out part (a tensor is used whole for "
                               "fitting); give a data source (fashion-mnist, a folder, pictures) for held-out checks")
        return part

    @property
    def has_heldout(self) -> bool:
        return "heldout" in self.parts

    @property
    def evaluation(self) -> "NaturalData":
        return self.parts.get("evaluation", self)

    # -- access ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def input_shape(self) -> tuple:
        if isinstance(self.dataset, TensorDataset):
            return tuple(self.dataset.tensors[0].shape[1:])
        return tuple(self.dataset[0][0].shape) if len(self.dataset) else ()

    @property
    def labelled(self) -> bool:
        return self.labels_note is None

    def require_labels(self, what: str = "this step") -> None:
        if self.labels_note is not None:
            raise FvtrustError(f"{what} needs labelled natural images, but {self.labels_note}")

    def tensors(self, limit: int | None = None, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the first `limit` images, materialized (use `batches` to stream)."""
        from ..progress import progress

        n = len(self) if limit is None else min(int(limit), len(self))
        if isinstance(self.dataset, TensorDataset):
            x, y = self.dataset.tensors
            return x[:n], y[:n]
        xs, ys = [], []
        for x, y in progress(self.batches(256, limit=n), total=(n + 255) // 256,
                             desc=desc or f"read {self.role} images", unit="batch"):
            xs.append(x)
            ys.append(y)
        if not xs:
            return torch.empty(0, *self.input_shape), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)

    def images(self, limit: int | None = None, desc: str | None = None) -> torch.Tensor:
        return self.tensors(limit, desc=desc)[0]

    def nonempty(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(float images, labels) like `tensors`, or one clear error when there are none to fit or judge on."""
        x, y = self.tensors(limit)
        if len(x) == 0:
            raise FvtrustError(f"natural data {self.source!r} has no {self.role} images")
        return x.float(), torch.as_tensor(y)

    def targets(self) -> torch.Tensor:
        """Every image's label (model class index, -1 = unlabelled) without reading any image."""
        return _targets(self.dataset)

    def select(self, indices, role: str | None = None) -> "NaturalData":
        """The images at `indices` (e.g. the first 50 of each class), as a NaturalData."""
        return self._part(indices, role or self.role)

    def batches(self, batch_size: int = 256, limit: int | None = None, num_workers: int = 0):
        """Stream (images, labels) batches; nothing larger than a batch is held in memory."""
        ds = self.dataset if limit is None else Subset(self.dataset, range(min(int(limit), len(self))))
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size], y[i:i + batch_size]
            return
        yield from DataLoader(ds, batch_size=batch_size, num_workers=num_workers)

    def describe(self) -> dict:
        """What a report says about where its natural images came from."""
        out = {"source": self.source, "path": self.path, "role": self.role, "n": len(self),
               "labelled": self.labelled}
        if self.label_rule:
            out["labels"] = self.label_rule
        if self.labels_note:
            out["labels_note"] = self.labels_note
        if self.parts:
            out["parts"] = {k: {"n": len(v), "role": v.role} for k, v in self.parts.items()}
        return out

    def _part(self, indices, role: str) -> "NaturalData":
        return NaturalData(_subset(self.dataset, indices), self.source, role, self.path, self.labels_note,
                           self.label_rule)


def _targets(ds: Dataset) -> torch.Tensor:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    if isinstance(ds, Subset):
        return _targets(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    known = getattr(ds, "targets_in_model_order", None)
    if known is not None:
        return known
    return torch.as_tensor([ds[i][1] for i in range(len(ds))], dtype=torch.long)


def _subset(ds: Dataset, indices) -> Dataset:
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def _capped(n: int, limit) -> int:
    return n if limit is None else min(n, int(limit))


def _split(root: NaturalData, *, seed: int, fit_fraction: float, limit) -> NaturalData:
    """fit/held-out = a seeded disjoint split of one pool; evaluation = the whole pool (capped)."""
    n = len(root)
    if n == 0:
        raise FvtrustError(f"natural data {root.path or root.source} has no images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    # one image: it is the fit part, and the held-out part is empty (checks that need it say so)
    n_fit = 1 if n == 1 else min(n - 1, max(1, int(round(n * fit_fraction))))
    fit, held = order[:n_fit], order[n_fit:]
    # cap in the seeded order (a representative subset, not the first classes), then read in file order
    root.parts = {"fit": root._part(np.sort(fit[:_capped(len(fit), limit)]), "fit"),
                  "heldout": root._part(np.sort(held[:_capped(len(held), limit)]), "heldout"),
                  "evaluation": root._part(np.sort(order[:_capped(n, limit)]), "evaluation")}
    return root


def _model_facts(model, input_shape):
    shape = tuple(input_shape) if input_shape is not None else tuple(getattr(model, "input_shape", ()) or ())
    names = getattr(model, "class_names", None)
    n_classes = getattr(model, "num_classes", None)
    return shape, names, n_classes


def natural(source=None, *, model=None, input_shape=None, limit: int | None = None, class_index=None,
            seed: int = 0, fit_fraction: float = DEFAULT_FIT_FRACTION, data_dir=None) -> NaturalData:
    """Resolve a data source to a NaturalData with fit / held-out / evaluation parts (table above).

    source: ``fashion-mnist[:train|test]``, a path to an ImageNet-style folder,
    ``pictures`` (scikit-image pictures and crops; unlabelled), a tensor of
    [0, 1] images (or an (images, labels) pair), a NaturalData (returned as is),
    or None for the model's own default (fashion-cnn: Fashion-MNIST).
    model / input_shape: what the images must fit (size, channels, classes).
    class_index: a ``{"folder name": class index}`` dict or JSON file for folders.
    """
    if isinstance(source, NaturalData):
        return source
    shape, names, n_classes = _model_facts(model, input_shape)
    if source is None:
        source = getattr(model, "default_data", None)
        if source is None:
            raise FvtrustError(f"{getattr(model, 'spec', 'this model')} has no default natural data: give --data "
                               "(an ImageNet-style folder, fashion-mnist or pictures)")
    if limit is not None and int(limit) < 1:
        raise FvtrustError(f"--natural-limit must be >= 1, got {limit}")
    if not 0 < fit_fraction < 1:
        raise FvtrustError(f"fit fraction must lie in (0, 1), got {fit_fraction}")
    if isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[0], torch.Tensor):
        x, y = source
        return _from_tensor(x, torch.as_tensor(y, dtype=torch.long), shape, limit)
    if isinstance(source, torch.Tensor):
        return _from_tensor(source, None, shape, limit)
    text = str(source)
    if text.startswith("fashion-mnist"):
        return _fashion(text, shape, limit, seed, fit_fraction, data_dir, n_classes)
    if text == "pictures":
        return _pictures(shape, limit, seed)
    if Path(text).exists():
        return _folder(Path(text), shape, names, n_classes, class_index, limit, seed, fit_fraction)
    raise FvtrustError(f"unknown data {text!r}: use fashion-mnist[:train|test], pictures, or an existing folder path")


def _from_tensor(x, y, shape, limit) -> NaturalData:
    if x.dim() != 4:
        raise FvtrustError(f"natural images must be an N x C x H x W tensor, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise FvtrustError("no natural images (the tensor is empty)")
    if shape and tuple(x.shape[1:]) != tuple(shape):
        raise FvtrustError(f"natural images have shape {tuple(x.shape[1:])}, the model expects {tuple(shape)}")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise FvtrustError("natural images must be finite values in [0, 1]")
    y = torch.full((len(x),), -1, dtype=torch.long) if y is None else y
    n = _capped(len(x), limit)
    note = None if (y >= 0).all() else "the images were given without labels"
    root = NaturalData(TensorDataset(x[:n].float(), y[:n]), "tensor", "all", None, note)
    root.parts = {"fit": root, "evaluation": root}
    return root


def _fashion(text, shape, limit, seed, fit_fraction, data_dir, n_classes) -> NaturalData:
    from .idx import load_fashion_mnist

    split = text.split(":", 1)[1] if ":" in text else None
    if split not in (None, "train", "test"):
        raise FvtrustError(f"unknown Fashion-MNIST split {split!r}: use fashion-mnist, fashion-mnist:train or "
                           "fashion-mnist:test")
    if shape and tuple(shape) != (1, 28, 28):
        raise FvtrustError(f"Fashion-MNIST images are 1x28x28 but the model expects {tuple(shape)}; "
                           "give --data an ImageNet-style folder")
    note = None if n_classes in (None, 10) else f"Fashion-MNIST has 10 classes and the model {n_classes} outputs"
    if split is None:
        train, test = load_fashion_mnist("train", data_dir), load_fashion_mnist("test", data_dir)
        cap = lambda t: tuple(v[:_capped(len(v), limit)] for v in t)  # noqa: E731
        root = NaturalData(TensorDataset(*cap(test)), "fashion-mnist", "all", None, note)
        fit = NaturalData(TensorDataset(*cap(train)), "fashion-mnist:train", "fit", None, note)
        held = NaturalData(TensorDataset(*cap(test)), "fashion-mnist:test", "heldout", None, note)
        root.parts = {"fit": fit, "heldout": held, "evaluation": held}
        return root
    x, y = load_fashion_mnist(split, data_dir)
    return _split(NaturalData(TensorDataset(x, y), f"fashion-mnist:{split}", "all", None, note),
                  seed=seed, fit_fraction=fit_fraction, limit=limit)


def _pictures(shape, limit, seed) -> NaturalData:
    from .pictures import natural_pictures_grouped

    if not shape:
        raise FvtrustError("pictures need the model's input shape")
    x, group = natural_pictures_grouped(shape, crops_per_picture=3, seed=seed)
    note = "scikit-image pictures carry no class labels"
    root = NaturalData(TensorDataset(x, torch.full((len(x),), -1, dtype=torch.long)), "pictures", "all", None, note)
    fit, held = np.flatnonzero(group % 2 == 0), np.flatnonzero(group % 2 == 1)
    root.parts = {"fit": root._part(fit[:_capped(len(fit), limit)], "fit"),
                  "heldout": root._part(held[:_capped(len(held), limit)], "heldout"),
                  "evaluation": root._part(np.arange(_capped(len(x), limit)), "evaluation")}
    return root


def _folder(path: Path, shape, names, n_classes, class_index, limit, seed, fit_fraction) -> NaturalData:
    from torchvision import datasets

    from .folders import folder_class_map, image_folder

    if not path.is_dir():
        raise FvtrustError(f"--data {path} is a file; give an ImageNet-style folder (one sub-folder per class)")
    if not shape:
        raise FvtrustError("an image folder needs the model's input shape to resize to")
    try:
        classes = datasets.folder.find_classes(str(path))[0]
    except PermissionError as e:
        raise FvtrustError(f"image folder {path} is not readable: {e}") from None
    except (FileNotFoundError, OSError) as e:
        raise FvtrustError(f"no class sub-folders in {path} (need an ImageNet-style folder): {e}") from None
    mapping, rule = folder_class_map(classes, class_names=names, num_classes=n_classes, class_index=class_index)
    ds = image_folder(path, size=shape[-1], channels=shape[0], class_map=mapping)
    if shape[-2] != shape[-1]:
        raise FvtrustError(f"image folders are centre-cropped square; the model expects {shape[-2]}x{shape[-1]}")
    root = NaturalData(ds, "folder", "all", str(path.resolve()), None if mapping else rule,
                       rule if mapping else None)
    return _split(root, seed=seed, fit_fraction=fit_fraction, limit=limit)


def batches_of(data, batch_size: int = 256):
    """(images, labels) batches from a NaturalData, an (images, labels) pair or an images tensor (labels -1)."""
    if isinstance(data, NaturalData):
        yield from data.batches(batch_size)
        return
    if isinstance(data, (tuple, list)):
        x, y = data
    else:
        x, y = data, torch.full((len(data),), -1, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]
