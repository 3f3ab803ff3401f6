"""List every hookable layer of a model with its output shape and unit count."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import FvtrustError


@dataclass
class LayerInfo:
    name: str
    type: str
    shape: tuple  # output shape without the batch dimension
    units: int    # channels (dim 1) of the output; features for 2-D outputs

    def to_dict(self):
        return asdict(self)


@torch.no_grad()
def list_layers(model) -> list[LayerInfo]:
    """One dummy forward with hooks on every named module inside `model.net`."""
    from .wrappers import as_model

    model = as_model(model)
    shapes: dict[str, tuple] = {}
    handles = []
    named = [(n, m) for n, m in model.net.named_modules() if n]

    def make(name):
        def hook(_m, _i, out):
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
            if isinstance(out, torch.Tensor) and name not in shapes:
                shapes[name] = tuple(out.shape[1:])
        return hook

    for n, m in named:
        handles.append(m.register_forward_hook(make(n)))
    try:
        model(torch.zeros((1, *model.input_shape), device=model.device))
    finally:
        for h in handles:
            h.remove()
    return [LayerInfo(n, type(m).__name__, shapes[n], int(shapes[n][0]) if shapes[n] else 1)
            for n, m in named if n in shapes]


def layer_units(model, layer: str) -> int:
    """Number of units (channels) of `layer`; FvtrustError for unknown layers."""
    model.get_layer(layer)
    for info in list_layers(model):
        if info.name == layer:
            return info.units
    raise FvtrustError(f"layer {layer!r} produces no tensor output in {model.spec}")


def is_fully_connected(model, layer: str, info: LayerInfo | None = None) -> bool:
    """True when `layer` is a fully connected layer: a `torch.nn.Linear` (or subclass) whose output is one vector
    per image (N x C), as a classifier head or an MLP layer of a CNN is.

    Why a layer kind is decided at all: signals whose clean spread differs by kind of layer can carry a
    threshold per kind (the audit's `linear_start_gap`). A Linear applied per token (N x T x C, as in a
    transformer) is not counted: its units are not one number per image. The one place fvtrust decides this.
    `info`: the layer's `list_layers` entry, where the caller has it (saves the dummy forward pass)."""
    from .wrappers import as_model

    model = as_model(model)
    module = model.get_layer(layer)
    if not isinstance(module, torch.nn.Linear):
        return False
    if info is None:
        info = next((i for i in list_layers(model) if i.name == layer.removeprefix("net.")), None)
    return info is not None and len(info.shape) == 1


def parse_units(units, n_units: int, layer: str = "layer") -> list[int]:
    """'all', '0,1,5', '0-9', an int or a list -> validated list of unit indices."""
    if isinstance(units, str):
        text = units.strip()
        if text == "all":
            return list(range(n_units))
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                    out.extend(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise FvtrustError(f"bad unit list {units!r}: use e.g. 0,1,2 or 0-9 or all") from None
        units = out
    elif isinstance(units, int):
        units = [units]
    units = [int(u) for u in units]
    if not units:
        raise FvtrustError("no units given")
    bad = [u for u in units if not 0 <= u < n_units]
    if bad:
        raise FvtrustError(f"unit {bad[0]} out of range for {layer}: valid units are 0..{n_units - 1}")
    return units
