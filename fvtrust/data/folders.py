"""ImageNet-style class folders as [0, 1] tensors, and their labels in the model's class order.

A folder's sub-folder names mean nothing to a model until they are mapped to
its output indices: ``ImageFolder`` numbers classes alphabetically, which is
the model's order only by luck. `folder_class_map` decides the mapping once,
for every command: an explicit ``--class-index`` JSON, else the model's class
names, else ImageNet synset ids (``n01440764``) through the standard 1000-class
order (sorted wnids, shipped as ``imagenet_wnids.txt``, the list timm ships),
else integer folder names. When none applies the images stay usable, unlabelled,
and commands that need labels say why in one line.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import torch

from ..errors import FvtrustError


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k synset ids in the standard class order (index i = class i)."""
    text = (resources.files("fvtrust.data") / "imagenet_wnids.txt").read_text()
    return [w.strip() for w in text.splitlines() if w.strip()]


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def read_class_index(class_index) -> dict[str, int]:
    """`class_index`: a dict or a JSON file ``{"folder name": class index}``."""
    if isinstance(class_index, dict):
        mapping = class_index
    else:
        path = Path(class_index)
        try:
            mapping = json.loads(path.read_text())
        except FileNotFoundError:
            raise FvtrustError(f"class index file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FvtrustError(f"class index {path} is not readable JSON: {e}") from None
    if not isinstance(mapping, dict):
        raise FvtrustError('class index must be a JSON object {"folder name": class index}')
    try:
        return {str(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise FvtrustError("class index values must be integers (class indices)") from None


def folder_class_map(classes: list[str], *, class_names=None, num_classes=None,
                     class_index=None) -> tuple[dict[str, int] | None, str]:
    """(folder -> model class index, how it was decided), or (None, why not).

    Raises only for an explicit `class_index` that does not cover the folders
    or points outside the model's outputs (the user asked for exactly that map).
    """
    if class_index is not None:
        mapping = read_class_index(class_index)
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise FvtrustError(f"class index has no entry for folder(s) {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}")
        if num_classes is not None:
            bad = [(c, mapping[c]) for c in classes if not 0 <= mapping[c] < num_classes]
            if bad:
                raise FvtrustError(f"class index maps {bad[0][0]!r} to {bad[0][1]}, outside the model's "
                                   f"0..{num_classes - 1}")
        return {c: mapping[c] for c in classes}, "class index file"
    if class_names:
        by_name = {}
        for i, n in enumerate(class_names):
            by_name.setdefault(_norm(n), i)
        if all(_norm(c) in by_name for c in classes):
            return {c: by_name[_norm(c)] for c in classes}, "folder names = the model's class names"
    if num_classes == 1000 and all(re.fullmatch(r"n\d{8}", c) for c in classes):
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        if all(c in index for c in classes):
            return {c: index[c] for c in classes}, "ImageNet synset ids in the standard 1000-class order"
    if num_classes is not None and all(c.isdigit() for c in classes) and all(int(c) < num_classes for c in classes):
        return {c: int(c) for c in classes}, "folder names are class indices"
    if num_classes is None:
        return None, "the model has no class outputs"
    sample = ", ".join(classes[:3])
    return None, (f"the folder's classes ({sample}{' ...' if len(classes) > 3 else ''}) do not match the model's "
                  f"{num_classes} classes; give --class-index FILE with {{\"folder name\": class index}}")


def _loader(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt/unreadable files: one clear line
        raise FvtrustError(f"cannot read image {path}: {type(e).__name__}: {str(e)[:120]}") from None


def image_folder(root, size: int = 224, resize: int | None = None, channels: int = 3, class_map=None):
    """An ImageFolder yielding (C x size x size float in [0, 1], label); resize then centre crop.

    No normalization here: fvtrust models normalize inside themselves. `class_map`
    (folder -> class index) relabels; without one labels are -1 (unlabelled).
    """
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FvtrustError(f"image folder not found: {root}")
    steps = [transforms.Resize(resize or int(round(size * 256 / 224))), transforms.CenterCrop(size)]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    elif channels != 3:
        raise FvtrustError(f"image folders give 1- or 3-channel images; the model expects {channels} channels")
    steps.append(transforms.ToTensor())
    try:
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose(steps), loader=_loader)
    except PermissionError as e:
        raise FvtrustError(f"image folder {root} is not readable: {e}") from None
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise FvtrustError(f"not an ImageNet-style folder with images (one sub-folder per class) {root}: {e}") from None
    relabel = _Relabel({ds.class_to_idx[c]: int(i) for c, i in class_map.items()} if class_map else None)
    ds.target_transform = relabel
    ds.targets_in_model_order = torch.as_tensor([relabel(t) for t in ds.targets], dtype=torch.long)
    return ds


class _Relabel:
    """Folder index -> model class index (-1 when unlabelled); a class, so datasets stay picklable."""

    def __init__(self, table):
        self.table = table

    def __call__(self, t):
        return self.table[t] if self.table is not None else -1
