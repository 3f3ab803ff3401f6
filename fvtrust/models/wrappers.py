"""The model contract: [0, 1] NCHW images in, normalization inside, eval mode.

Every model fvtrust hands out is an `FvModel`. It owns the user's network as
`.net` and a fixed preprocessing step, so visualizations, natural images and
pictures all live in the same [0, 1] pixel space (as lucent's `preprocess`).
Layer names are PyTorch module paths *inside* `.net` (e.g. ``inception4a``,
``layer4.1.conv2``), the names users know from their model's docs — exactly
the paths of the user's own module, so a network with an attribute called
``net`` has layers ``net.fc``, never a shortened form.

A plain ``nn.Module`` becomes an FvModel through :func:`wrap` (explicit) or
:func:`as_model` (what every public API calls on its ``model`` argument), so
researchers can hand fvtrust the network they already have.
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
    expects, `num_classes`, `class_names` (optional), `default_data` (the data
    source `fvtrust.data.natural` uses when the user gives none: the training
    set's test split for the embedded default, None where fvtrust has none
    offline, e.g. ImageNet models).
    """

    def __init__(self, net: nn.Module, *, mean, std, input_shape, spec: str, num_classes: int | None = None,
                 class_names=None, default_data: str | None = None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.spec = spec
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.default_data = default_data
        self.eval()

    def forward(self, x):
        return self.net(self.normalize(x))

    # -- layers ---------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.net.named_modules() if name]

    def get_layer(self, name: str) -> nn.Module:
        """The module at PyTorch path `name` inside `.net` (the user's own module path, unchanged)."""
        from ..errors import FvtrustError, nearest

        modules = dict(self.net.named_modules())
        if not name or name not in modules:
            raise FvtrustError(f"unknown layer {name!r} in {self.spec}; nearest: {nearest(name, self.layer_names())}")
        return modules[name]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, input_shape={self.input_shape}"


def _probe_classes(net: nn.Module, input_shape) -> int | None:
    """Output width of a classifier (None when the output is not N x K), from one zero forward."""
    p = next(iter(net.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    with torch.no_grad():
        out = net(torch.zeros((1, *input_shape), device=dev))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def wrap(net: nn.Module, *, input_shape, mean=None, std=None, class_names=None, spec: str | None = None) -> FvModel:
    """The FvModel fvtrust works with, around a user's own network.

    input_shape: (C, H, W) the network takes. mean/std: per-channel
    normalization to apply to [0, 1] images before `net`; leave both None when
    `net` normalizes inside its own forward (as many research models do), so
    nothing is applied twice. class_names: optional labels of the outputs.
    The network is put in eval mode (visualizations and checks assume it).
    """
    from ..errors import FvtrustError

    if isinstance(net, FvModel):
        return net
    if not isinstance(net, nn.Module):
        raise FvtrustError(f"fvtrust.wrap needs a torch.nn.Module, got {type(net).__name__}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise FvtrustError(f"input_shape must be (C, H, W), got {input_shape!r}")
    c = shape[0]
    mean = (0.0,) * c if mean is None else tuple(float(m) for m in mean)
    std = (1.0,) * c if std is None else tuple(float(v) for v in std)
    if len(mean) != c or len(std) != c:
        raise FvtrustError(f"mean/std need {c} values (one per input channel), got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise FvtrustError("std values must be > 0")
    net.eval()
    try:
        n_classes = _probe_classes(net, shape)
    except Exception as e:  # noqa: BLE001 - the user's forward failed on the declared shape
        raise FvtrustError(f"{type(net).__name__} does not run on input of shape {shape}: "
                           f"{type(e).__name__}: {str(e)[:160]}") from None
    if class_names is not None and n_classes is not None and len(class_names) != n_classes:
        raise FvtrustError(f"{len(class_names)} class names for a network with {n_classes} outputs")
    return FvModel(net, mean=mean, std=std, input_shape=shape, spec=spec or f"module:{type(net).__name__}",
                   num_classes=n_classes, class_names=class_names)


def as_model(obj, *, example=None, device=None) -> FvModel:
    """Whatever a user passes as `model` -> an FvModel. Every public API calls this.

    obj: an FvModel (returned as is), a spec string (``fashion-cnn``,
    ``torchvision:NAME``, ``py:file.py:factory``, a saved directory ...), or a
    plain ``nn.Module``. A plain module's input shape comes from `example`
    (natural images: a tensor N x C x H x W, a NaturalData, or (images,
    labels)); without one the call fails with one line that says to call
    :func:`wrap`. A plain module is assumed to normalize inside itself.
    """
    from ..errors import FvtrustError

    if isinstance(obj, FvModel):
        return obj.to(device) if device is not None else obj
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        from .zoo import load_model

        return load_model(str(obj), device=device)
    if isinstance(obj, nn.Module):
        shape = getattr(obj, "input_shape", None) or _example_shape(example)
        if shape is None:
            raise FvtrustError(f"cannot tell the input size of {type(obj).__name__}: call "
                               "fvtrust.wrap(net, input_shape=(C, H, W)) first (or pass natural data)")
        model = wrap(obj, input_shape=shape)
        return model.to(device) if device is not None else model
    raise FvtrustError(f"model must be a spec string, an nn.Module or an FvModel, got {type(obj).__name__}")


def _example_shape(example):
    if example is None:
        return None
    if isinstance(example, (tuple, list)) and example and isinstance(example[0], torch.Tensor):
        example = example[0]
    if isinstance(example, torch.Tensor):
        return tuple(example.shape[1:]) if example.dim() == 4 else None
    shape = getattr(example, "input_shape", None)
    return tuple(shape) if shape else None
