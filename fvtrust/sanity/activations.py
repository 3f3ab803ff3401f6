"""Per-layer activations for the sanity check, straight into the engine's prepared form.

Which layers ("the x-axis"): every module inside ``model.net`` whose output is
a tensor, in **execution order** (the order forward hooks fire, not the order
modules were defined). A module called several times in one forward pass
(torchvision ResNet reuses one ``relu`` per bottleneck) gives one layer per
call: ``layer1.0.relu``, ``layer1.0.relu#2``, ``layer1.0.relu#3``. With
``layers="all"``, a layer whose flattened output equals that of an earlier one
on probe images is the same activation under another name (``block1`` is the
output of ``block1.relu``; ``flatten`` and eval-mode ``dropout`` repeat
``gap``): only the first to fire is kept and the others are listed as its
aliases. Named layers are never merged.

How activations are held: each hook flattens its output and immediately
ranks/normalises it with :func:`fvtrust.sanity.similarity.prepare`, so raw
activations never pile up; only the prepared rows are kept (float32 by
default: half the memory, ~3e-8 from scipy). Layers are processed in groups
whose prepared rows fit ``budget_bytes``: one forward pass over all images per
group, stopping at the group's deepest layer. A single layer larger than the
budget is spilled to a temporary :class:`~fvtrust.sanity.rowfile.RowFile`
(the same out-of-core store the streamed similarity spills to), written batch
by batch on its background thread, and the analysis then reads it one class
block at a time through :meth:`~fvtrust.sanity.rowfile.RowFile.as_array` (see
:mod:`fvtrust.sanity.analysis`).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FvtrustError, nearest
from ..progress import progress
from .rowfile import RowFile
from .similarity import METRICS, Prepared, _new_shift, prepare

# Prepared rows held in memory at once across a group of layers.
BUDGET_BYTES = 2 * 2**30


class _Stop(Exception):
    """Raised by a hook once every layer of the current group has fired."""


@dataclass
class Layer:
    """One point on the x-axis: a module's output at one call of the forward pass."""

    name: str  # "block1.relu", or "layer1.0.relu#2" for a module's second call
    module: str  # path inside model.net
    call: int  # 0-based call index within one forward pass
    shape: tuple  # output shape without the batch dimension
    aliases: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def to_dict(self) -> dict:
        return {"name": self.name, "module": self.module, "call": self.call, "shape": list(self.shape),
                "values": self.numel, "aliases": list(self.aliases)}


def _layer_name(module: str, call: int) -> str:
    return module if call == 0 else f"{module}#{call + 1}"


def _as_tensor(out):
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


@torch.no_grad()
def discover_layers(model, probe: torch.Tensor, layers="all") -> list[Layer]:
    """The layers to analyse, in execution order; see the module docstring.

    ``probe`` is a few real images (natural and visualizations): with
    ``layers="all"``, layers whose flattened outputs are equal on all of them
    are merged. ``layers`` may also be a list of layer names (or one
    comma-separated string); unknown names raise :class:`FvtrustError`.
    """
    fired: list[tuple[str, int, tuple, torch.Tensor]] = []
    calls: dict[str, int] = {}
    handles = []

    def make(name):
        def hook(_m, _i, out):
            out = _as_tensor(out)
            if out is None:
                return
            call = calls.get(name, 0)
            calls[name] = call + 1
            # Clone now: an in-place op later in the pass (ReLU(inplace=True)) would overwrite it.
            fired.append((name, call, tuple(out.shape[1:]), out.detach().reshape(out.shape[0], -1).clone()))

        return hook

    for name, mod in model.net.named_modules():
        if name:
            handles.append(mod.register_forward_hook(make(name)))
    try:
        model(probe.to(model.device))
    finally:
        for h in handles:
            h.remove()
    found = [Layer(_layer_name(n, c), n, c, tuple(int(s) for s in shape)) for n, c, shape, _ in fired]
    values = {lay.name: v for lay, (*_, v) in zip(found, fired)}
    if isinstance(layers, str) and layers != "all":
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if layers == "all":
        kept: list[Layer] = []
        for lay in found:
            v = values[lay.name]
            twin = next((k for k in kept if values[k.name].shape == v.shape and torch.equal(values[k.name], v)), None)
            if twin is None:
                kept.append(lay)
            else:
                twin.aliases.append(lay.name)
        return kept
    layers = list(layers)
    if not layers:
        raise FvtrustError("no layers given; use 'all' or a list of layer names")
    by_name = {lay.name: lay for lay in found}
    for name in layers:
        key = name
        if key not in by_name:
            raise FvtrustError(f"unknown layer {name!r} in {model.spec}; nearest: {nearest(name, list(by_name))}")
    wanted = set(layers)
    return [lay for lay in found if lay.name in wanted]  # execution order, whatever order they were named in


@dataclass
class LayerRows:
    """One layer's prepared rows (all images, in the order given) per metric."""

    layer: Layer
    prepared: dict  # metric -> Prepared
    spilled: bool = False


class _Sink:
    """Where the hooks put one layer's prepared rows for one metric: a tensor,
    or a :class:`RowFile` under ``spill_dir`` (rows arrive in order, batch by batch)."""

    def __init__(self, n: int, d: int, metric: str, dtype: torch.dtype, device, spill_dir: Path | None):
        self.metric = metric
        self.file = self.vectors = None
        if spill_dir is None:
            self.vectors = torch.empty((n, d), dtype=dtype, device=device)
        else:
            fd, name = tempfile.mkstemp(dir=spill_dir, suffix=".rows")
            os.close(fd)
            self.file = RowFile(name, d, np.float32 if dtype == torch.float32 else np.float64, "w")
            device = "cpu"
        self.shift = _new_shift(metric, dtype, n, device)

    def put(self, rows: slice, p: Prepared) -> None:
        if self.file is None:
            self.vectors[rows] = p.vectors.to(self.vectors.device)
        else:
            assert rows.start == len(self.file), "spilled rows must arrive in order"
            self.file.append(p.vectors)  # p is fresh: the write may still be running when the next batch comes
        if self.shift is not None:
            self.shift[rows] = p.shift.to(self.shift.device)

    def prepared(self) -> Prepared:
        vectors = self.vectors if self.file is None else torch.from_numpy(self.file.as_array())
        return Prepared(vectors, self.metric, self.shift)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _bytes_per_value(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 8


def plan_groups(layers: list[Layer], n_images: int, n_metrics: int, dtype: torch.dtype,
                budget_bytes: int) -> list[list[Layer]]:
    """Consecutive layers packed into groups whose prepared rows fit the budget (a too-big layer stands alone)."""
    groups: list[list[Layer]] = []
    used = 0
    for lay in layers:
        size = n_images * lay.numel * n_metrics * _bytes_per_value(dtype)
        if groups and used + size <= budget_bytes:
            groups[-1].append(lay)
            used += size
        else:
            groups.append([lay])
            used = size
    return groups


@torch.no_grad()
def collect(model, images: torch.Tensor, layers: list[Layer], metrics=METRICS, *, batch_size: int = 128,
            dtype: torch.dtype = torch.float32, budget_bytes: int = BUDGET_BYTES, spill_dir=None,
            skip=None, desc: str = "activations") -> Iterator[LayerRows]:
    """Yield every layer's prepared rows (one row per image), group by group.

    ``images`` ([0, 1], N x C x H x W) are run through the model once per
    group of layers, ``batch_size`` at a time; the hooks prepare each batch's
    flattened outputs for every metric. ``skip(layer) -> bool`` leaves out
    layers whose results are already known (resumed runs): a group with
    nothing left runs no forward pass. Memory: the current group's prepared
    rows (<= ``budget_bytes`` unless one layer alone is larger, which then
    goes to a :class:`RowFile` under ``spill_dir``, default the system temp
    folder, read back through a memory map and deleted once the caller moves
    to the next layer).
    """
    metrics = list(metrics)
    todo = [lay for lay in layers if not (skip and skip(lay))]
    n = len(images)
    device = model.device
    for group in plan_groups(todo, n, len(metrics), dtype, budget_bytes):
        spill = None
        if len(group) == 1 and n * group[0].numel * len(metrics) * _bytes_per_value(dtype) > budget_bytes:
            spill = tempfile.TemporaryDirectory(prefix="fvtrust-sanity-", dir=spill_dir)
        where = None if spill is None else Path(spill.name)
        sinks = {}
        try:
            for lay in group:
                sinks[lay.name] = {m: _Sink(n, lay.numel, m, dtype, device, where) for m in metrics}
            _fill(model, images, group, metrics, sinks, batch_size, dtype, device, desc)
            for lay in group:
                yield LayerRows(lay, {m: sink.prepared() for m, sink in sinks[lay.name].items()},
                                spilled=spill is not None)
        finally:
            for per_metric in sinks.values():
                for sink in per_metric.values():
                    sink.close()
            del sinks
            if spill is not None:
                spill.cleanup()


def _fill(model, images, group, metrics, sinks, batch_size, dtype, device, desc):
    wanted = {(lay.module, lay.call): lay for lay in group}
    modules = dict(model.net.named_modules())
    state = {"calls": {}, "fired": 0, "rows": slice(0, 0)}

    def make(module_name):
        def hook(_m, _i, out):
            call = state["calls"].get(module_name, 0)
            state["calls"][module_name] = call + 1
            lay = wanted.get((module_name, call))
            if lay is None:
                return
            out = _as_tensor(out)
            flat = out.detach().reshape(out.shape[0], -1)
            if flat.shape[1] != lay.numel:
                raise FvtrustError(f"layer {lay.name} changed size: {flat.shape[1]} values, expected {lay.numel}")
            rows = state["rows"]
            for m in metrics:
                sinks[lay.name][m].put(rows, prepare(flat, m, dtype=dtype))
            state["fired"] += 1
            if state["fired"] == len(wanted):
                raise _Stop  # nothing after the group's deepest layer is needed

        return hook

    handles = [modules[name].register_forward_hook(make(name)) for name in {lay.module for lay in group}]
    try:
        label = f"{desc} {group[0].name}" + (f"..{group[-1].name}" if len(group) > 1 else "")
        for i in progress(range(0, len(images), batch_size), total=(len(images) + batch_size - 1) // batch_size,
                          desc=label, unit="batch"):
            state.update(calls={}, fired=0, rows=slice(i, min(i + batch_size, len(images))))
            try:
                model(images[i:i + batch_size].to(device))
            except _Stop:
                pass
            if state["fired"] != len(wanted):
                raise FvtrustError(f"layer(s) of {[lay.name for lay in group]} did not run in the forward pass")
    finally:
        for h in handles:
            h.remove()
