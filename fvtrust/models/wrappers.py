"""The model contract: [0, 1] NCHW images in, normalization inside, eval mode.

Every model fvtrust hands out is an `FvModel`. It owns the user's network as
`.net` and a fixed preprocessing step, so visualizations, natural images and
pictures all live in the same [0, 1] pixel space (as lucent's `preprocess`).
Layer names are PyTorch module paths *inside* `.net` (e.g. ``inception4a``,
``layer4.1.conv2``), the names users know from their model's docs.
"""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, or lucid's x*255 - 117 via mean/std choice."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class FvModel(nn.Module):
    """A network plus its preprocessing and the facts fvtrust needs about it.

    Attributes: `spec` (how to rebuild it), `input_shape` (C, H, W) the network
    expects, `num_classes`, `class_names` (optional).
    """

    def __init__(self, net: nn.Module, *, mean, std, input_shape, spec: str, num_classes: int | None = None,
                 class_names=None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.spec = spec
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.eval()

    def forward(self, x):
        return self.net(self.normalize(x))

    # -- layers ---------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.net.named_modules() if name]

    def get_layer(self, name: str) -> nn.Module:
        """The module at PyTorch path `name` inside `.net` (a leading 'net.' is accepted)."""
        from ..errors import FvtrustError, nearest

        key = name[4:] if name.startswith("net.") else name
        modules = dict(self.net.named_modules())
        if not key or key not in modules:
            raise FvtrustError(f"unknown layer {name!r} in {self.spec}; nearest: {nearest(name, self.layer_names())}")
        return modules[key]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, input_shape={self.input_shape}"
