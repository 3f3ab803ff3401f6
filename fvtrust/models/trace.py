"""Find Conv→BN→ReLU (and Conv→ReLU) sequences by watching one forward pass.

Module attributes say nothing about dataflow: a block may own ``conv``,
``bn`` and ``relu`` children yet add a residual between BN and ReLU
(torchvision's BasicBlock ``conv2``/``bn2``, the Bottleneck's ``conv3``/``bn3``),
and a plain ``nn.Sequential`` CNN has no block modules at all. Constructions
that rely on "a ReLU comes right after this BN" (silent units put their Δy
behind that ReLU) must know it for certain, so this module records, during one
probe forward, every torch function call (through a ``TorchFunctionMode``: it
sees ``F.relu``, ``torch.relu``, ``x.relu()``, ``+`` alike) and every
Conv2d / BatchNorm2d module call, and keeps a sequence only if

- the conv's output tensor is consumed by exactly one operation: the BN module
  (or, without BN, a ReLU);
- the BN's output is consumed first by a ReLU, and by nothing else unless that
  ReLU is in place (then later readers see the ReLU's result, as they should);
- each module runs once per forward (shared modules are ambiguous).

Names: a block is addressed by its conv's path; its BN's path and any module
whose output *is* the ReLU's output (fvtrust's ``block3``, an in-place
``features.2`` ReLU) are accepted as aliases when they point at one block only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_RELU_FUNCS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_,
               torch.Tensor.relu, torch.Tensor.relu_}


@dataclass
class ConvBlock:
    """One Conv→(BN→)ReLU sequence of a model; paths are module paths inside the model's network."""

    conv: str
    bn: str | None
    relu_inplace: bool
    aliases: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [self.conv] + ([self.bn] if self.bn else []) + self.aliases


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


class _Recorder(TorchFunctionMode):
    """Every torch call with tensor results: (function, input tensor ids, output tensor ids)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.alive: list = []  # hold every tensor so Python ids stay unique during the probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = _tensors(out, [])
        if outs:
            ins = _tensors((args, kwargs), [])
            self.calls.append((func, [id(t) for t in ins], [id(t) for t in outs]))
            self.alive.append((ins, outs))
        return out


@torch.no_grad()
def conv_bn_relu_blocks(model) -> list[ConvBlock]:
    """Every Conv→BN→ReLU / Conv→ReLU sequence of `model` (an FvModel), in execution order."""
    net = model.net
    named = [(n, m) for n, m in net.named_modules() if n]
    runs: dict[str, int] = {}
    io: dict[str, tuple[int, int]] = {}   # module path -> (id of first input, id of output)
    outputs: dict[int, list[str]] = {}
    alive = []
    handles = []

    def make(name):
        def hook(_m, inp, out):
            runs[name] = runs.get(name, 0) + 1
            first = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            if isinstance(out, torch.Tensor):
                io[name] = (id(first) if first is not None else -1, id(out))
                outputs.setdefault(id(out), []).append(name)
                alive.append((first, out))
        return hook

    for n, m in named:
        handles.append(m.register_forward_hook(make(n)))
    rec = _Recorder()
    try:
        with rec:
            model(torch.zeros((1, *model.input_shape), device=model.device))
    finally:
        for h in handles:
            h.remove()

    consumers: dict[int, list[int]] = {}
    for k, (_f, ins, _outs) in enumerate(rec.calls):
        for t in set(ins):
            consumers.setdefault(t, []).append(k)

    def after(tensor_id: int, start: int) -> list[int]:
        return [k for k in consumers.get(tensor_id, []) if k > start]

    def produced_at(tensor_id: int) -> int:
        # the first call that returned it: an in-place op (relu_) returns its input again later
        return min((k for k, (_f, _i, outs) in enumerate(rec.calls) if tensor_id in outs), default=-1)

    def relu_after(tid: int):
        """(relu call index, in place) if `tid` goes straight into a ReLU and nowhere else first."""
        uses = after(tid, produced_at(tid))
        if not uses or rec.calls[uses[0]][0] not in _RELU_FUNCS:
            return None
        k = uses[0]
        inplace = tid in rec.calls[k][2]
        if not inplace and len(uses) != 1:
            return None
        return k, inplace

    mods = dict(named)
    blocks: list[ConvBlock] = []
    for name, m in named:
        if type(m) is not nn.Conv2d or runs.get(name) != 1 or name not in io:
            continue
        t_conv = io[name][1]
        uses = after(t_conv, produced_at(t_conv))
        bn = next((b for b, (i, _o) in io.items() if i == t_conv and isinstance(mods[b], nn.BatchNorm2d)
                   and runs.get(b) == 1), None)
        if bn is not None:
            if len(uses) != 1:
                continue
            t_out = io[bn][1]
        else:
            t_out = t_conv
        hit = relu_after(t_out)
        if hit is None:
            continue
        k, inplace = hit
        relu_out = rec.calls[k][2][0]
        aliases = [a for a in outputs.get(relu_out, []) if a not in (name, bn) and runs.get(a) == 1]
        blocks.append(ConvBlock(name, bn, inplace, aliases))
    # an alias naming more than one block (a ReLU module reused in a Bottleneck) is dropped
    count: dict[str, int] = {}
    for b in blocks:
        for a in b.aliases:
            count[a] = count.get(a, 0) + 1
    for b in blocks:
        b.aliases = [a for a in b.aliases if count[a] == 1]
    return blocks


def resolve_conv_block(model, layer: str) -> ConvBlock:
    """The block `layer` names (conv path, BN path or alias); one line listing the valid names otherwise."""
    from ..errors import FvtrustError, nearest

    blocks = conv_bn_relu_blocks(model)
    for b in blocks:
        if layer in b.names:
            return b
    valid = [n for b in blocks for n in ([b.conv] + b.aliases)]
    if not valid:
        raise FvtrustError(f"{model.spec} has no Conv-BN-ReLU or Conv-ReLU sequence (a conv whose output goes "
                           "only into a BatchNorm and then straight into a ReLU)")
    why = ""
    if layer in dict(model.net.named_modules()):
        why = " (its output does not go straight into a ReLU, e.g. a residual addition comes first)"
    raise FvtrustError(f"{layer!r} is not a Conv-BN-ReLU block of {model.spec}{why}; valid: {nearest(layer, valid, 8)}")
