"""ImageNet-style class folders (torchvision ImageFolder) as [0, 1] tensors."""
from __future__ import annotations

from pathlib import Path

from ..errors import FvtrustError


def image_folder(root, size: int = 224, resize: int | None = None):
    """An ImageFolder yielding (CHW float in [0, 1], label); resize then centre crop.

    No normalization here: fvtrust models normalize inside themselves.
    """
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FvtrustError(f"image folder not found: {root}")
    tf = transforms.Compose([transforms.Resize(resize or int(round(size * 256 / 224))),
                             transforms.CenterCrop(size), transforms.ToTensor()])
    try:
        return datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise FvtrustError(f"not an ImageNet-style folder (one sub-folder per class) {root}: {e}") from None
