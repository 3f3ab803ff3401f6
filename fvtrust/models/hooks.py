"""Read layer outputs with forward hooks, stopping the forward pass early.

Visualizing an intermediate layer needs nothing after it: `forward_to`
raises out of the network as soon as every requested layer has produced its
output, which saves the rest of the forward *and* backward pass (lucent runs
the whole network every step). Hooks are always removed, even on error.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class _Reached(Exception):
    """Raised inside a hook once all requested layers have fired."""


@contextlib.contextmanager
def capture(model, layers, *, stop: bool = False, detach: bool = False):
    """Context manager yielding a dict {layer name: output} filled during forward calls."""
    layers = [layers] if isinstance(layers, str) else list(layers)
    mods = {name: model.get_layer(name) for name in layers}
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(_mod, _inp, out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            store[name] = out.detach() if detach else out
            if stop and len(store) == len(mods):
                raise _Reached

        return hook

    for name, mod in mods.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_to(model: nn.Module, x: torch.Tensor, layers, *, stop: bool = True, detach: bool = False) -> dict:
    """Run `model(x)` until every layer in `layers` has fired; return their outputs."""
    names = [layers] if isinstance(layers, str) else list(layers)
    with capture(model, names, stop=stop, detach=detach) as store:
        try:
            model(x)
        except _Reached:
            pass
        store = dict(store)
    missing = [n for n in names if n not in store]
    if missing:
        from ..errors import FvtrustError

        raise FvtrustError(f"layer(s) {', '.join(missing)} did not run in the forward pass")
    return store


class LayerTap:
    """Hooks registered once for many forward passes (an optimization loop).

    `tap(x)` runs the model up to the deepest requested layer and returns
    {layer: output}. Use as a context manager so the hooks are removed.
    """

    def __init__(self, model, layers, stop: bool = True):
        self.model = model
        self.names = [layers] if isinstance(layers, str) else list(layers)
        self._cm = capture(model, self.names, stop=stop)
        self.store = None

    def __enter__(self):
        self.store = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def __call__(self, x):
        self.store.clear()
        try:
            self.model(x)
        except _Reached:
            pass
        out = dict(self.store)
        self.store.clear()
        if len(out) != len(self.names):
            from ..errors import FvtrustError

            missing = [n for n in self.names if n not in out]
            raise FvtrustError(f"layer(s) {', '.join(missing)} did not run in the forward pass")
        return out


def layer_output(model, x, layer, **kw) -> torch.Tensor:
    return forward_to(model, x, [layer], **kw)[layer]
