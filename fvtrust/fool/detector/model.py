"""The visualization detector E (paper App. C.1, Table 3), adapted to any input size.

Table 3: six conv layers of 16 channels with ReLU — 3x3 stride 3, then 5x5
stride 2 four times, then 3x3 stride 2 — flatten, linear -> 1 logit.
Its output is read as "natural" (logit > threshold, E = 1) or
"visualization" (E = 0).

Adaptation (the paper only specifies 224 px): every conv pads k // 2, so
at 224 px the maps are 75, 38, 19, 10, 5, 3 (a 16x3x3 = 144 feature
flatten) — Table 3 exactly. The first stride is scaled with the image,
max(1, round(3 * size / 224)), and any stride that would shrink the map
below 3 px becomes 1, so small inputs keep a usable map: at 28 px the maps
are 28, 14, 7, 4, 4, 4 (strides 1, 2, 2, 2, 1, 1; 256 features).

The detector sees the raw [0, 1] image (shifted to [-2, 2]), independent of
the classifier's own normalization, so the same E works for any model with
that input shape.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import FvtrustError

TABLE3 = ((3, 3), (5, 2), (5, 2), (5, 2), (5, 2), (3, 2))  # (kernel, stride) per conv layer
MIN_MAP = 3


def table3_layout(size: int) -> list[tuple[int, int, int]]:
    """(kernel, stride, output size) of the six convs for a square-ish input of `size` px."""
    if size < 1:
        raise FvtrustError(f"bad detector input size {size}")
    out, s = [], size
    for i, (k, stride) in enumerate(TABLE3):
        if i == 0:
            stride = max(1, round(stride * size / 224))
        nxt = (s + 2 * (k // 2) - k) // stride + 1
        if stride > 1 and nxt < MIN_MAP:
            stride, nxt = 1, s
        out.append((k, stride, nxt))
        s = nxt
    return out


class Detector(nn.Module):
    """E(x): a logit per image, > threshold for natural images.

    `gate(x, "hard")` is the circuit's E: 1[logit > threshold], with no
    gradient (as in the authors' code; a differentiable gate would let the
    visualization learn to fool E). `"soft"` is sigmoid(logit - threshold),
    for the ablation.
    """

    def __init__(self, input_shape, channels: int = 16):
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        self.input_shape = (c, h, w)
        self.channels = int(channels)
        layers, cin = [], c
        hh, ww = h, w
        for k, stride, _ in table3_layout(min(h, w)):
            layers += [nn.Conv2d(cin, channels, k, stride=stride, padding=k // 2), nn.ReLU()]
            cin = channels
            hh, ww = (hh + 2 * (k // 2) - k) // stride + 1, (ww + 2 * (k // 2) - k) // stride + 1
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(channels * hh * ww, 1)
        self.register_buffer("threshold", torch.zeros(()))

    def config(self) -> dict:
        """What `Detector(**config)` needs to rebuild the same structure."""
        return {"input_shape": list(self.input_shape), "channels": self.channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise FvtrustError(f"the detector expects images of shape {self.input_shape}, got {tuple(x.shape[1:])}")
        return self.linear(self.flatten(self.features((x - 0.5) * 4.0)))[:, 0]

    def gate(self, x: torch.Tensor, kind: str = "hard") -> torch.Tensor:
        """E per image: 1.0 natural, 0.0 visualization (hard), or a probability (soft)."""
        if kind == "hard":
            with torch.no_grad():
                return (self(x) > self.threshold).to(x.dtype)
        if kind == "soft":
            return torch.sigmoid(self(x) - self.threshold)
        raise FvtrustError(f"unknown gate {kind!r}; choose hard or soft")

    @torch.no_grad()
    def predict_natural(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Bool per image: does E call it natural? (batched, on the detector's device)."""
        dev = self.linear.weight.device
        out = [self(images[i:i + batch_size].to(dev).float()) > self.threshold
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.bool)
