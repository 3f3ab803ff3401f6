"""Forward/backward probes of one unit per image, batched: what every model offers, nothing else.

`probe(model, layer, images, units)` runs each image i up to `layer` and
returns, for its own unit units[i], the unit's activation (as the
visualization objective measures it: spatial mean for conv maps), the
gradient of that activation w.r.t. the image, and the gradient w.r.t. the
layer's *input* (every floating-point tensor the layer module receives,
concatenated, so a layer that takes several inputs works), summed over the
positions of each input channel (dims >= 2 of an N x C x ... input).

Why summed: for a conv unit y = mean_p ReLU(w · h_p), the gradient w.r.t.
the input map is the filter pasted at every position where the unit is
active, so its raw map mostly tells *where* the unit fired. Summed over
positions it is (fraction active) x (the filter summed over its taps) per
input channel: the same direction whatever the positions, i.e. which input
channels drive the unit and with what sign. Measured on clean fashion-cnn
block3: raw-map cosines between a unit's top natural images and its
visualization ranged 0.11-0.93 (median 0.51); the channel profiles agree.
No module of the model is inspected or recognised: only a forward pre-hook
and a forward hook on the audited layer, which stops the forward pass there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import FvtrustError


class _Reached(Exception):
    pass


@dataclass
class Probe:
    """value: (B,); image_grad: (B, C*H*W) or None; input_grad: (B, D) (zeros where the input is unused)."""

    value: torch.Tensor
    image_grad: torch.Tensor | None
    input_grad: torch.Tensor


def unit_value(out: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """(B,) activation of image i's own unit: spatial mean of the channel (the `channel` objective)."""
    if out.dim() < 2:
        raise FvtrustError("the audited layer's output has no unit dimension")
    a = out.gather(1, units.view(-1, *(1,) * (out.dim() - 1)).expand(-1, 1, *out.shape[2:]))
    return a.reshape(len(a), -1).mean(1)


def channel_profile(g: torch.Tensor) -> torch.Tensor:
    """(B, C) per-channel sum over positions for N x C x ... tensors; (B, D) tensors as they are."""
    return g.reshape(len(g), g.shape[1], -1).sum(2) if g.dim() >= 3 else g.reshape(len(g), -1)


def _tensors_in(args, kwargs) -> list[torch.Tensor]:
    found = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            if v.is_floating_point():
                found.append(v)
        elif isinstance(v, (tuple, list)):
            for w in v:
                walk(w)
        elif isinstance(v, dict):
            for w in v.values():
                walk(w)

    walk(args)
    walk(kwargs)
    return found


def _readout_hooks(module, stage_module, store: dict) -> list:
    """Hooks that put the layer's readout in store["out"] and stop the forward pass there.

    stage_module None: the layer's output. Otherwise the *input* of
    `stage_module`, the layer's final elementwise stage (`final_stage`), on the
    call whose output is the layer's output. Its input is cloned before the
    stage runs, so an in-place activation (ReLU(inplace=True)) cannot
    overwrite it; the clone keeps the autograd graph.
    """
    def post(_m, _args, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        if stage_module is None:
            store["out"] = out
        else:
            last = store.get("stage")
            if last is None or last[1] is not out:
                raise FvtrustError("the layer's final stage did not produce its output on this input, so its "
                                   "pre-activation cannot be read")
            store["out"] = last[0]
        raise _Reached

    hooks = []
    if stage_module is not None:
        def stage_pre(_m, args):
            store["pending"] = args[0].clone()

        def stage_post(_m, _args, out):
            store["stage"] = (store.pop("pending"), out)

        hooks += [stage_module.register_forward_pre_hook(stage_pre), stage_module.register_forward_hook(stage_post)]
    return hooks + [module.register_forward_hook(post)]


def _probe_batch(model, module, x: torch.Tensor, units: torch.Tensor, image_grad: bool,
                 stage_module=None) -> Probe:
    store: dict = {}

    def pre(_m, args, kwargs):
        store["in"] = _tensors_in(args, kwargs)

    hooks = [module.register_forward_pre_hook(pre, with_kwargs=True)] + _readout_hooks(module, stage_module, store)
    x = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            try:
                model(x)
            except _Reached:
                pass
    finally:
        for h in hooks:
            h.remove()
    if "out" not in store or not isinstance(store["out"], torch.Tensor):
        raise FvtrustError("the audited layer did not produce a tensor in the forward pass")
    value = unit_value(store["out"], units)
    ins = [t for t in store["in"] if t.requires_grad]
    wrt = ([x] if image_grad else []) + ins
    if not value.requires_grad:  # the unit does not depend on the image at all
        grads = [None] * len(wrt)
    else:
        grads = torch.autograd.grad(value.sum(), wrt, allow_unused=True)
    gi = None
    if image_grad:
        gi = (grads[0] if grads[0] is not None else torch.zeros_like(x)).reshape(len(x), -1)
        grads = grads[1:]
    parts = [channel_profile(g if g is not None else torch.zeros_like(t)) for g, t in zip(grads, ins)]
    if not parts:
        parts = [torch.zeros(len(x), 0, device=x.device)]
    return Probe(value.detach(), None if gi is None else gi.detach(), torch.cat(parts, 1).detach())


@contextlib.contextmanager
def frozen(model):
    """The model's parameters without gradients inside the block (gradients w.r.t. the inputs only); each
    parameter's requires_grad is restored on exit, exceptions included."""
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def probe(model, layer: str, images: torch.Tensor, units, *, image_grad: bool = True,
          batch_size: int = 256, readout: str = "output") -> Probe:
    """Probe images[i] on unit units[i] (see module doc), in batches; results on the CPU.

    readout "output": the layer's output; "pre-activation": the input of its final elementwise stage
    (`final_stage`; an error where the layer has none).
    """
    module = model.get_layer(layer)
    stage_module = _stage_for(model, layer, readout)
    units = torch.as_tensor(units, dtype=torch.long)
    if len(units) != len(images):
        raise FvtrustError("probe needs one unit per image")
    out = []
    with frozen(model):  # gradients w.r.t. inputs only
        for i in range(0, len(images), batch_size):
            xb = images[i:i + batch_size].to(model.device, torch.float32)
            pb = _probe_batch(model, module, xb, units[i:i + batch_size].to(model.device), image_grad, stage_module)
            out.append(Probe(pb.value.cpu(), None if pb.image_grad is None else pb.image_grad.cpu(),
                             pb.input_grad.cpu()))
    return Probe(torch.cat([p.value for p in out]),
                 torch.cat([p.image_grad for p in out]) if image_grad else None,
                 torch.cat([p.input_grad for p in out]))


@torch.no_grad()
def unit_activations(model, layer: str, images: torch.Tensor, units, *, batch_size: int = 256,
                     readout: str = "output") -> torch.Tensor:
    """(N, U): every listed unit's activation (`unit_value`: spatial mean) on every image, one forward each.

    readout as in `probe`.
    """
    module = model.get_layer(layer)
    units = torch.as_tensor(units, dtype=torch.long)
    store: dict = {}
    hooks = _readout_hooks(module, _stage_for(model, layer, readout), store)
    rows = []
    try:
        for i in range(0, len(images), batch_size):
            store.clear()
            try:
                model(images[i:i + batch_size].to(model.device, torch.float32))
            except _Reached:
                pass
            if "out" not in store or not isinstance(store["out"], torch.Tensor) or store["out"].dim() < 2:
                raise FvtrustError("the audited layer did not produce a tensor with a unit dimension")
            out = store["out"][:, units.to(store["out"].device)]
            rows.append(out.reshape(len(out), len(units), -1).mean(2).float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows)


READOUTS = ("output", "pre-activation")


def _stage_for(model, layer: str, readout: str):
    if readout not in READOUTS:
        raise FvtrustError(f"unknown readout {readout!r}; valid: {', '.join(READOUTS)}")
    if readout == "output":
        return None
    stage = final_stage(model, layer)
    if stage is None:
        raise FvtrustError(f"layer {layer!r} has no final elementwise stage (a parameter-free, shape-preserving "
                           "submodule that produces its output), so it has no pre-activation to read")
    return stage


def final_stage(model, layer: str):
    """The submodule that produces `layer`'s output elementwise (its activation function), or None.

    Found by one forward pass of a mid-grey image, from behaviour only: the
    last leaf submodule call of the layer whose output tensor *is* the
    layer's output, provided it has no parameters and its input has the
    output's shape. For fashion-cnn's Conv-BN-ReLU blocks that is the ReLU; for a
    torchvision Bottleneck or BasicBlock the ReLU after the residual sum (the
    same module is called several times: the last call counts); a plain conv
    or linear layer, or a layer whose activation is a function call
    (`F.relu`) rather than a module, has none. Why the audit wants it: a
    ReLU unit that is off (exactly 0, zero gradient) at the visualization's
    start hides whatever the pre-activation does there (a trench dug behind
    the ReLU; measured on fashion-cnn's block4 slingshots, their
    pre-activation at the start is the clean unit's, so this is not where
    those hide).
    """
    module = model.get_layer(layer)
    seen: list = []   # (submodule, input, output) in the order the calls finished: innermost first
    store: dict = {}

    def sub_post(m, args, out):
        seen.append((m, args, out))

    def post(_m, _args, out):
        store["out"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Reached

    hooks = [m.register_forward_hook(sub_post) for name, m in module.named_modules() if name]
    hooks.append(module.register_forward_hook(post))
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            try:
                model(torch.full((1, *model.input_shape), 0.5, device=dev))
            except _Reached:
                pass
    finally:
        for h in hooks:
            h.remove()
    out = store.get("out")
    for m, args, o in reversed(seen):
        if o is out and not any(True for _ in m.children()):
            # the last leaf call that returned the output tensor (not the first: an in-place activation returns
            # the very tensor the BatchNorm before it returned)
            ok = (not any(True for _ in m.parameters()) and len(args) >= 1 and isinstance(args[0], torch.Tensor)
                  and args[0].shape == out.shape)
            return m if ok else None
    return None


def strongest_images(model, layer: str, pool: torch.Tensor, units, r: int, *, batch_size: int = 256) -> torch.Tensor:
    """(U, r) indices into `pool` of the r images that drive each unit hardest (highest `unit_value`).

    The pool is every probe image the audit made (all units' visualizations, at
    several steps and parameterizations): a unit is then also examined on the
    images that *other* units' optimizations found, which reach regions of
    input space its own visualization may not (a dormant hidden branch).
    """
    acts = unit_activations(model, layer, pool, units, batch_size=batch_size)   # (P, U)
    r = min(r, len(pool))
    return acts.topk(r, dim=0).indices.T.contiguous()


def snapshot_steps(steps: int) -> tuple[int, ...]:
    """Where the probe visualizations are also kept: log-spaced, steps/16, /8, /4, /2 and all (128: 8 ... 128).

    Early snapshots matter: a detector-gated circuit whose picture looks natural
    once drawn closes its gate only while the image is still noise-like (fashion-cnn
    picture circuit: steps 1-16 of 128), yet the picture stays in the final image.
    """
    return tuple(sorted({max(1, steps // 2 ** i) for i in range(5)}))


def pixel_probe(model, layer: str, units, *, steps: int, seed: int, lr: float, desc: str | None = None):
    """A second visualization per unit in *pixel* space with a large step (Adam, lr `lr`), snapshots kept.

    Why: the standard fft visualization (lr 0.05) stays close to where its
    optimizer's tuning (and an attacker's detector or tunnel) expects it; a
    pixel-space optimization with a large step reaches other, higher-activation
    images. On fashion-cnn block3 it switched on 11 of 16 dormant silent units
    that the 128-step fft visualization left off (2 of 16), measured with
    the attack's own internals (not available to the audit) in the audit's notes.
    """
    from ..visualize import visualize

    return visualize(model, layer, units, steps=steps, objective="channel", seed=seed, param="pixel", lr=lr,
                     thresholds=snapshot_steps(steps), progress_desc=desc)


START_SD = 0.01          # the visualization's own start noise: `make_param`'s default sd (fft leaf, mid-grey image)
WIDER_STARTS = (10, 30)  # the comparison starts' sd, in multiples of START_SD


def start_images(shape, *, pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(standard starts (pairs, C, H, W), wider starts (len(WIDER_STARTS), pairs, C, H, W)), the same for every unit.

    The standard starts are drawn exactly as `fvtrust.visualize` draws its
    start (fft parameterization, decorrelated colour, noise sd START_SD: faint
    noise on mid-grey, image std ~0.004 on fashion-cnn). The wider starts are
    the same construction with 10x and 30x the noise (image std ~0.04 and
    ~0.11): still faint noise on grey, but outside any tunnel built for the
    standard start distribution. Pair s of every scale uses its own seed.
    """
    def draw(scale, i):
        return start_params(shape, pairs=pairs, seed=seed, scale=scale, stream=i).image().detach().float()

    std = draw(1, 0)
    wide = torch.stack([draw(m, i + 1) for i, m in enumerate(WIDER_STARTS)])
    return std, wide


def start_params(shape, *, pairs: int, seed: int, scale: float = 1, stream: int = 0):
    """The fft parameters (`ImageParam`) behind `start_images`: `pairs` starts of noise sd scale x START_SD.

    stream 0 is the standard starts, stream i + 1 the wider scale WIDER_STARTS[i]; start s of stream j is
    drawn from its own generator, seeded (seed, j, s), so every caller that needs the starts' parameters
    (not just their images) gets the very same draws.
    """
    from ..visualize.param import make_param

    gens = [torch.Generator().manual_seed(int(seed) * 100003 + 1000 * stream + s) for s in range(pairs)]
    return make_param("fft", (pairs, *shape), sd=START_SD * scale, generators=gens)
