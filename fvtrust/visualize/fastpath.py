"""Run a model faster for the length of a visualization, then hand it back untouched.

Two standard inference rewrites, both undone on exit:

- channels_last: oneDNN convolutions are faster in NHWC on large maps (~1.4x
  per image-step on googlenet-224, CPU, batch 10; slower on 28-px fashion-cnn,
  so `visualize` asks for it only at >= 64 px on CPU).
- Conv-BN folding: in eval mode a BatchNorm right after a conv is an affine map
  that can live in the conv's weights, which removes the BN forward *and*
  backward (~9 % of a googlenet step). A pair is folded only if a probe forward
  shows the BN's input *is* the conv's output, neither module is an objective
  layer, and the objective layers' outputs agree to float tolerance after
  folding (a conv output also used elsewhere, e.g. by a skip, fails that check
  and its pair stays unfolded).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.hooks import LayerTap


def _conv_bn_pairs(model, probe: torch.Tensor, keep: set[str]) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the BN consumed exactly the conv's output tensor during `probe`.

    Modules that run more than once per forward (shared weights) are left alone.
    """
    names = {m: n for n, m in model.net.named_modules()}
    produced: dict[int, tuple] = {}  # id -> (conv, output); holding the output keeps its id unique
    calls: dict[nn.Module, int] = {}
    fed: dict[nn.Module, nn.Module | None] = {}
    handles = []

    def conv_hook(mod, _inp, out):
        produced[id(out)] = (mod, out)
        calls[mod] = calls.get(mod, 0) + 1

    def bn_pre(mod, inp):
        calls[mod] = calls.get(mod, 0) + 1
        fed[mod] = produced.get(id(inp[0]), (None, None))[0]

    for m in model.net.modules():
        if type(m) is nn.Conv2d and names[m] not in keep:
            handles.append(m.register_forward_hook(conv_hook))
        elif (type(m) is nn.BatchNorm2d and not m.training and m.track_running_stats
              and m.running_mean is not None and names[m] not in keep):
            handles.append(m.register_forward_pre_hook(bn_pre))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for b, c in fed.items() if c is not None and calls[b] == 1 and calls[c] == 1]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """Fold bn into conv in place; return a function that restores both exactly."""
    w, b = conv.weight.data, (conv.bias.data if conv.bias is not None else None)
    scale = bn.weight.data / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.data if bn.affine else 0.0) - bn.running_mean * scale
    new_w = torch.empty_like(w).copy_(w * scale.reshape(-1, 1, 1, 1).to(w.dtype))  # keeps w's layout
    new_b = (shift + (b * scale if b is not None else 0.0)).to(w.dtype)
    had_bias = conv.bias is not None
    conv.weight.data = new_w
    if had_bias:
        conv.bias.data = new_b
    else:
        conv.bias = nn.Parameter(new_b, requires_grad=False)
    bn.forward = _identity  # instance attribute shadows the class method

    def restore():
        conv.weight.data = w
        if had_bias:
            conv.bias.data = b
        else:
            conv.bias = None
        del bn.forward

    return restore


def _identity(x):
    return x


@contextlib.contextmanager
def fast_inference(model, layers, probe: torch.Tensor, *, channels_last: bool = True, fold_bn: bool = True):
    """Within the block, `model` runs NHWC and with Conv-BN pairs folded (when verified exact)."""
    restores = []
    try:
        if channels_last:
            for p in model.parameters():
                if p.dim() == 4:
                    data = p.data
                    p.data = data.contiguous(memory_format=torch.channels_last)
                    restores.append(lambda p=p, data=data: setattr(p, "data", data))
        if fold_bn:
            keep = set(layers)
            probe = probe.contiguous(memory_format=torch.channels_last) if channels_last else probe
            pairs = _conv_bn_pairs(model, probe, keep)
            if pairs:
                with torch.no_grad(), LayerTap(model, list(layers)) as tap:
                    ref = tap(probe)

                    def same():
                        got = tap(probe)
                        return all(torch.allclose(got[k], ref[k], rtol=1e-3,
                                                  atol=1e-4 * float(ref[k].abs().max()) + 1e-6) for k in ref)

                    folded = [_fold(c, b) for c, b in pairs]
                    if not same():  # some conv output is used elsewhere too: fold pair by pair
                        for r in reversed(folded):
                            r()
                        folded = []
                        for c, b in pairs:
                            r = _fold(c, b)
                            if same():
                                folded.append(r)
                            else:
                                r()
                restores.extend(folded)
        yield
    finally:
        for r in reversed(restores):
            r()
