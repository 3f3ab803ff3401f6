"""lucid's gradient-redirected ReLU: let a visualization start when its unit is dead.

From random noise, a ReLU unit may not fire at all; its gradient is then
exactly zero and the image never leaves grey (lucent #9, #34; lucid #68).
lucid (`lucid/misc/redirected_relu_grad.py`) overrides the ReLU gradient for
the first 16 optimization steps. With g = dL/dy the incoming gradient of the
*loss* (descent convention, L = -objective) and x the ReLU's input:

* relu_grad = g where x >= 0, else 0 (the true gradient, lucid's `x < 0` mask);
* redirected = g except where x < 0 and g > 0 (those would push an already
  negative input lower), i.e. let through only gradient that pushes x up;
* per batch entry b: if ||relu_grad[b]|| > 0 use relu_grad[b], else
  redirected[b]. The true gradient is replaced only for images whose whole
  gradient would be blocked at this ReLU.

The forward pass is the ordinary ReLU. fvtrust's batches hold one image per
unit, so "per batch entry" is per visualization and the result does not depend
on which other units share the batch. ReLU6 gets lucid's analogue (gradient
pushing x > 6 down is let through too).

What is overridden: every `nn.ReLU` / `nn.ReLU6` module of the model, for the
length of a `redirect_relus` block (their `forward` is replaced on the
instance and restored after). ReLUs called functionally (`F.relu` inside a
`forward`) are not modules and keep their true gradient: :func:`count_relus`
lets callers warn when a model has none.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

REDIRECT_STEPS = 16  # lucid: the override returns the true gradient once global_step > 16


def _per_image_fallback(true_grad: torch.Tensor, redirected: torch.Tensor) -> torch.Tensor:
    if true_grad.dim() < 2:
        raise ValueError("redirected ReLU needs a batch dimension")
    alive = true_grad.reshape(true_grad.shape[0], -1).norm(dim=1) > 0
    return torch.where(alive.view(-1, *([1] * (true_grad.dim() - 1))), true_grad, redirected)


class _RedirectedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        neg = x < 0
        true_grad = torch.where(neg, torch.zeros_like(g), g)
        redirected = torch.where(neg & (g > 0), torch.zeros_like(g), g)
        return _per_image_fallback(true_grad, redirected)


class _RedirectedReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        low, high = x < 0, x > 6
        true_grad = torch.where(low | high, torch.zeros_like(g), g)
        blocked = (low & (g > 0)) | (high & (g < 0))
        redirected = torch.where(blocked, torch.zeros_like(g), g)
        return _per_image_fallback(true_grad, redirected)


def redirected_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU forward, lucid's redirected gradient backward."""
    return _RedirectedReLU.apply(x)


def redirected_relu6(x: torch.Tensor) -> torch.Tensor:
    return _RedirectedReLU6.apply(x)


def count_relus(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())


class RedirectSwitch:
    """Handle returned by :func:`redirect_relus`; set `active` per step (render does, for steps 1..N)."""

    def __init__(self):
        self.active = True
        self.n_modules = 0


@contextlib.contextmanager
def redirect_relus(model: nn.Module):
    """Within the block, the model's ReLU modules use the redirected gradient while `switch.active`.

    Inactive, they run their own forward (so in-place ReLUs stay in place and
    results are bit-identical to the plain model). Restored on exit, even on error.
    """
    switch = RedirectSwitch()
    patched = []
    for mod in model.modules():
        if isinstance(mod, (nn.ReLU, nn.ReLU6)):
            original = mod.forward
            fn = redirected_relu6 if isinstance(mod, nn.ReLU6) else redirected_relu

            def forward(x, _orig=original, _fn=fn):
                return _fn(x) if switch.active and torch.is_grad_enabled() else _orig(x)

            mod.forward = forward  # instance attribute shadows the class method; deleted on exit
            patched.append(mod)
    switch.n_modules = len(patched)
    try:
        yield switch
    finally:
        for mod in patched:
            del mod.forward


__all__ = ["redirected_relu", "redirected_relu6", "redirect_relus", "count_relus", "REDIRECT_STEPS"]
