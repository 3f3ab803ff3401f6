"""Silent units (paper §2.2): every unit of a layer visualizes the same thing.

A Conv-BN-ReLU unit y = ReLU(BN(Conv(x, Θ))) becomes ȳ = y + Δy with
Δy = ReLU(Conv(x, Θ̄) + b), Θ̄ = αΘ + βΔΘ⊥. ΔΘ⊥ is a target filter made
orthogonal to Θ; b sits just below the largest value Conv(x, Θ̄) reaches on
natural images, so Δy is exactly 0 on natural input (outputs bit-identical:
y + 0.0 == y) while visualizations, which reach far higher activations, are
dominated by Δy and show the target.

Implementation: the conv is replaced by `SilentConv` (the original conv plus
the silent filters, computed from the same input) and its BN by `SilentBN`,
which returns ReLU(BN(z)) + Δy. The ReLU that follows is then a no-op on a
non-negative tensor (ReLU(ReLU(v) + 0) == ReLU(v) bit for bit). That is only
true when the BN's output goes straight into a ReLU, so the sequence is found
by tracing the forward pass (fvtrust.models.trace): fvtrust's ConvBNReLU, a
plain ``nn.Sequential`` (``features.0``), torchvision's Bottleneck
``conv1``/``conv2`` qualify; a BN followed by a residual addition
(BasicBlock ``conv2``, Bottleneck ``conv3``) is refused. A Conv→ReLU without
BN gets ReLU(z) + Δy from SilentConv directly.

The paper writes b = −(α/β)·ȳ_max,nat; we follow the authors' code: b is minus
the largest natural response ȳ_max of the *constructed* filter, moved a further
margin·|ȳ_max| down: b = −ȳ_max − margin·|ȳ_max|. The absolute value matters when
ȳ_max < 0: −(1 + margin)·ȳ_max would then be a positive bias above −ȳ_max, and
Δy would fire on exactly the natural images that calibrated it.

Receptive field (`pool`): "local" is the paper's per-position Conv(x, Θ̄). It
needs visualizations to beat natural images *at a position*; on ImageNet
networks they do by far, but on the 28-px fashion-cnn they reach only ~1.2x
the natural per-position maximum, so a local silent unit never switches on.
"map" (default) gives each unit one kernel over the conv's whole input map (like
the picture unit of the fooling circuit): its α part is the full-map kernel of
the mean of Conv(x, Θ) over positions, its β part the target's input map, and Δy
is added at every position of the unit's channel. A visualization can raise
that one number far above its natural maximum, which is the gap the
construction needs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...data.natural import batches_of
from ...errors import FvtrustError
from ...models.hooks import LayerTap
from ...progress import progress


class SilentConv(nn.Module):
    """The original conv, plus Δy = ReLU(Conv(x, Θ̄) + b) for the chosen units, kept for SilentBN."""

    def __init__(self, conv: nn.Conv2d, units: list[int], pool: str = "map", fuse_relu: bool = False):
        super().__init__()
        self.conv = conv
        self.pool = pool
        self.fuse_relu = fuse_relu  # Conv→ReLU without BN: emit ReLU(z) + Δy here (the ReLU after is then a no-op)
        k = len(units)
        self.register_buffer("units", torch.as_tensor(units, dtype=torch.long))
        self.register_buffer("weight_bar", torch.zeros(k, *conv.weight.shape[1:]))
        self.register_buffer("bias_bar", torch.zeros(k))
        self.register_buffer("map_bar", torch.zeros(k, 0))  # "map" pool: (k, Cin*H*W), sized when built
        self.delta = None

    def raw_silent(self, x):
        """Conv(x, Θ̄): per position ("local", the paper's form) or one full-map kernel ("map")."""
        c = self.conv
        if self.pool == "map":
            return (x.flatten(1) @ self.map_bar.T)[:, :, None, None]
        return F.conv2d(x, self.weight_bar, None, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x):
        z = self.conv(x)
        pre = self.raw_silent(x) + self.bias_bar.view(1, -1, 1, 1)
        delta = torch.zeros_like(z)
        delta[:, self.units] = torch.relu(pre).expand(-1, -1, *z.shape[2:])
        if self.fuse_relu:
            return torch.relu(z) + delta
        self.delta = delta
        return z


class SilentBN(nn.Module):
    """ReLU(BN(z)) + Δy. The block's ReLU after it leaves this non-negative sum unchanged."""

    def __init__(self, bn: nn.BatchNorm2d, source: SilentConv):
        super().__init__()
        self.bn = bn
        self._source = [source]  # a plain reference, not a second registration of the conv

    def forward(self, z):
        delta = self._source[0].delta
        self._source[0].delta = None
        y = torch.relu(self.bn(z))
        return y if delta is None else y + delta


def _set(root: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def resolve_block(model, layer: str) -> tuple[str, str | None]:
    """(conv path, BN path or None) of the Conv→(BN→)ReLU sequence `layer` names.

    Found by tracing the forward pass (fvtrust.models.trace), so a BN followed
    by a residual addition rather than a ReLU (BasicBlock ``conv2``, Bottleneck
    ``conv3``) is refused: Δy behind a ReLU that is not there would change
    natural outputs.
    """
    from ...models.trace import resolve_conv_block

    block = resolve_conv_block(model, layer)
    return block.conv, block.bn


def rebuild(base, *, layer: str, units: list[int], pool: str = "map", map_size: int = 0, **_ignored):
    """The manipulated structure (weights are loaded afterwards)."""
    if pool not in ("map", "local"):
        raise FvtrustError(f"unknown pool {pool!r}; choose map or local")
    model = copy.deepcopy(base)
    conv_name, bn_name = resolve_block(model, layer)
    conv = model.net.get_submodule(conv_name)
    sconv = SilentConv(conv, list(units), pool, fuse_relu=bn_name is None)
    sconv.map_bar = torch.zeros(len(units), map_size)
    _set(model.net, conv_name, sconv)
    if bn_name is not None:
        _set(model.net, bn_name, SilentBN(model.net.get_submodule(bn_name), sconv))
    model.eval()
    return model


def _target_unit(target, conv: nn.Conv2d) -> int | None:
    """N for a `unit:N` target (validated against the conv's units); None for a picture target."""
    if not (isinstance(target, str) and target.startswith("unit:")):
        return None
    try:
        n = int(target.split(":", 1)[1])
    except ValueError:
        raise FvtrustError(f"bad target {target!r}: use unit:N") from None
    if not 0 <= n < conv.out_channels:
        raise FvtrustError(f"target unit {n} out of range: valid units are 0..{conv.out_channels - 1}")
    return n


def _target_picture(model, target) -> torch.Tensor:
    """A picture target (name, path or CHW tensor in [0, 1]) as a 1 x C x H x W batch of the model's size."""
    if isinstance(target, torch.Tensor):
        if tuple(target.shape) != tuple(model.input_shape):
            raise FvtrustError(f"target picture has shape {tuple(target.shape)}; the model expects "
                               f"{tuple(model.input_shape)}")
        return target[None]
    from ...data import load_picture

    return load_picture(target, model.input_shape)[None]


def target_filter(model, layer: str, target, conv: nn.Conv2d) -> torch.Tensor:
    """ΔΘ before orthogonalization: the filter all manipulated units should share.

    `unit:N` → unit N's own filter (so every unit visualizes like unit N); a
    picture (name, path or CHW tensor in [0, 1]) → the conv-input feature patch
    at the picture's centre, mean-removed, so the unit responds to that pattern.
    """
    n = _target_unit(target, conv)
    if n is not None:
        return conv.weight[n].detach().clone()
    k = conv.weight.shape[-2:]
    feats = _conv_input(model, conv, _target_picture(model, target))[0]
    _, fh, fw = feats.shape
    y0, x0 = (fh - k[0]) // 2, (fw - k[1]) // 2
    patch = feats[:, y0:y0 + k[0], x0:x0 + k[1]]
    return patch - patch.mean()


@torch.no_grad()
def quiet_subspace(model, conv_name: str, natural, fraction: float = 0.25,
                   max_images: int = 2000) -> torch.Tensor:
    """Orthonormal basis (D x k) of the input-patch directions natural images barely use.

    The silent filter lives here: natural inputs hardly respond to it, so the
    natural maximum that sets b stays low, while a visualization, free to leave
    the natural manifold, can drive it hard once Δy switches on.
    """
    conv = model.net.get_submodule(conv_name)
    conv = conv.conv if isinstance(conv, SilentConv) else conv
    captured = {}
    h = conv.register_forward_pre_hook(lambda m, inp: captured.__setitem__("x", inp[0]))
    second = None
    try:
        with LayerTap(model, [conv_name]) as tap:
            for xb, _ in batches_of(_first(natural, max_images), 250):
                tap(xb.to(model.device))
                cols = F.unfold(captured["x"], conv.kernel_size, conv.dilation, conv.padding, conv.stride)
                cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double().cpu()
                m2 = cols.T @ cols
                second = m2 if second is None else second + m2
    finally:
        h.remove()
    evals, evecs = torch.linalg.eigh(second)
    k = max(1, int(fraction * len(evals)))
    return evecs[:, :k].float()  # smallest second moments first


def _conv_input(model, conv: nn.Conv2d, images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        images = images.images()
    captured = {}
    h = conv.register_forward_pre_hook(lambda m, inp: captured.setdefault("x", inp[0].detach()))
    try:
        with torch.no_grad():
            model(images.to(model.device))
    finally:
        h.remove()
    return captured["x"].cpu()


def _map_filters(model, conv_name, conv, units, target, natural):
    """Full-map kernels: Θ's as the map-level filter of its channel mean, and the target's input map.

    The α part, mean over positions of Conv(x, Θ_u), is linear in the input map
    x: its full-map kernel is the adjoint of that mean (a transposed conv of a
    constant map). The target is the conv-input map of the target image (the
    picture, or the original model's visualization of unit N), mean-removed,
    so every manipulated unit's visualization is pulled towards that one map.
    """
    x0 = _conv_input(model, conv, natural)
    _, cin, h, w = x0.shape
    probe = torch.zeros(1, cin, h, w, requires_grad=True)
    out = F.conv2d(probe, conv.weight.detach().cpu(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    rows = []
    for u in units:
        (g,) = torch.autograd.grad(out[0, u].mean(), probe, retain_graph=True)
        rows.append(g.reshape(-1))
    theta_map = torch.stack(rows)
    n = _target_unit(target, conv)
    if n is not None:
        from ...visualize import visualize

        image = visualize(model, conv_name, [n], steps=256, objective="channel").final
    else:
        image = _target_picture(model, target)
    tmap = _conv_input(model, conv, image).reshape(-1)
    return theta_map, (tmap - tmap.mean())[None]


def silent_bias(ymax: torch.Tensor, margin: float) -> torch.Tensor:
    """b = −ȳ_max − margin·|ȳ_max|: below −ȳ_max also when the natural maximum is negative
    (−(1 + margin)·ȳ_max would then be *above* it and Δy would fire on the calibration images)."""
    return -ymax - margin * ymax.abs()


def orthogonalize(delta: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """ΔΘ⊥ per unit: remove the Θ component (Gram–Schmidt), rescale to ‖Θ‖. Shapes (U, ...)."""
    d = delta.reshape(len(delta), -1).double()
    t = theta.reshape(len(theta), -1).double()
    d = d - (d * t).sum(1, keepdim=True) / (t * t).sum(1, keepdim=True).clamp_min(1e-30) * t
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30) * t.norm(dim=1, keepdim=True)
    return d.reshape(delta.shape).float()


def _first(data, n: int):
    """The first n images of a tensor or a NaturalData (streamed later, never all loaded)."""
    from torch.utils.data import Subset

    from ...data.natural import NaturalData

    if isinstance(data, NaturalData):
        if len(data) <= n:
            return data
        return NaturalData(Subset(data.dataset, range(n)), data.source, data.role, data.path, data.labels_note)
    return data[:n]


@torch.no_grad()
def natural_max(model, conv_name: str, natural, batch_size: int = 500) -> torch.Tensor:
    """Largest value of the silent pre-activation Conv(x, Θ̄) per unit over natural images and positions."""
    sconv = model.net.get_submodule(conv_name)
    best = torch.full((len(sconv.units),), -float("inf"))
    captured = {}
    h = sconv.register_forward_pre_hook(lambda m, inp: captured.__setitem__("x", inp[0]))
    try:
        with LayerTap(model, [conv_name]) as tap:
            for xb, _ in progress(batches_of(natural, batch_size), total=-(-len(natural) // batch_size),
                                  desc="natural maxima", unit="batch"):
                tap(xb.to(model.device))
                raw = sconv.raw_silent(captured["x"])
                best = torch.maximum(best, raw.amax(dim=(0, 2, 3)).cpu())  # over images and positions
    finally:
        h.remove()
    return best


def silent_units(model, layer: str, *, target="unit:0", natural, alpha: float = 1.0,
                 beta: float = 30.0, units=None, margin: float = 0.1, quiet_fraction: float = 0.25,
                 pool: str = "map"):
    """A copy of `model` whose chosen units of `layer` are silent-unit manipulated.

    model: a spec, an FvModel or a plain nn.Module (its input shape is read
    from `natural`). natural: where ȳ_max,nat is measured — a data source
    (``fashion-mnist``, a folder, ``pictures``; its *fit* part is used, so its
    held-out part stays free for the leak check) or a tensor of [0, 1] images
    (used whole). margin ≥ 0 puts b further below the natural maximum: safer on
    unseen images, weaker takeover of visualizations.
    """
    from ...data import natural as resolve_natural
    from ...models import as_model
    from ...models.layers import parse_units

    model = as_model(model, example=natural)

    if alpha < 0 or beta <= 0:
        raise FvtrustError(f"need alpha >= 0 and beta > 0, got alpha={alpha}, beta={beta}")
    if margin < 0:
        raise FvtrustError(f"margin must be >= 0, got {margin}")
    if natural is None or (isinstance(natural, torch.Tensor) and len(natural) == 0):
        raise FvtrustError("silent units need natural images to measure the natural maximum")
    data = resolve_natural(natural, model=model)
    fit = data.fit
    natural = fit.images() if fit.source == "tensor" else fit
    conv_name, _ = resolve_block(model, layer)
    conv = model.net.get_submodule(conv_name)
    units = parse_units(units if units is not None else "all", conv.out_channels, layer)
    if pool == "map":
        theta_map, delta_map = _map_filters(model, conv_name, conv, units, target, _first(natural, 1))
        delta_perp = orthogonalize(delta_map.expand_as(theta_map).clone(), theta_map)
        new = rebuild(model, layer=layer, units=units, pool=pool, map_size=theta_map.shape[1])
        sconv = new.net.get_submodule(conv_name)
        sconv.map_bar.copy_(alpha * theta_map + beta * delta_perp)
    else:  # the paper's per-position filter, drawn from input directions natural images barely use
        delta = target_filter(model, layer, target, conv)
        if quiet_fraction < 1.0:
            basis = quiet_subspace(model, conv_name, natural, quiet_fraction)
            flat = delta.reshape(-1)
            projected = basis @ (basis.T @ flat)
            delta = (projected / projected.norm().clamp_min(1e-12) * flat.norm()).reshape(delta.shape)
        theta = conv.weight.detach()[units].cpu()
        delta_perp = orthogonalize(delta.expand_as(theta).clone(), theta)
        new = rebuild(model, layer=layer, units=units, pool=pool)
        sconv = new.net.get_submodule(conv_name)
        sconv.weight_bar.copy_(alpha * theta + beta * delta_perp)
    ymax = natural_max(new, conv_name, natural)
    sconv.bias_bar.copy_(silent_bias(ymax, margin))
    new.silent_info = {"layer": layer, "conv": conv_name, "units": units, "alpha": alpha, "beta": beta,
                       "margin": margin, "pool": pool,
                       "map_size": int(sconv.map_bar.shape[1]), "quiet_fraction": quiet_fraction, "target": target if isinstance(target, str) else "tensor",
                       "natural_max": ymax.tolist(), "n_natural": len(natural),
                       "natural": fit.describe()}
    return new
