"""Visualizing many units as `fvtrust.scale` shards: one cached entry per group of units.

`visualize` is batch-invariant (each image has its own generator, keyed by
its unit; the transform draws are shared by every chunk), so visualizing
the units in groups gives the images one call gives. That makes the groups
independent shards: with ``--ray`` each runs on a worker, its images come
back to the driver and are written as a verified entry (`fvtrust.cache`),
so a rerun of an interrupted command visualizes only the missing groups.
A unit listed twice (replicates) is numbered within its call, so such a
request stays one shard.
"""
from __future__ import annotations

import json

import torch

SHARD_UNITS = 16  # units per shard: enough work per task to amortize shipping the model


def visualize_sharded(model, layer: str, units="all", *, shard_units: int = SHARD_UNITS, cache_dir=None,
                      alpha: bool = False, **options):
    """`fvtrust.visualize(model, layer, units, **options)` computed in shards of `shard_units` units.

    ``alpha=True`` uses `visualize_transparent` (adds ``result.alpha``).
    `cache_dir` keeps each finished shard (a rerun skips it). The shards run
    on the backend of `fvtrust.scale` (sequential unless inside
    ``fvtrust.scale.workers``). Returns the VisualizationResult one call returns.
    """
    from pathlib import Path

    from ..cache import fingerprint, locked, read_entry, write_entry
    from ..errors import FvtrustError
    from ..models import as_model
    from ..models.layers import layer_units, parse_units
    from ..sanity.analysis import weights_digest
    from ..scale import run_shards
    from .render import VisualizationResult

    if not isinstance(shard_units, int) or shard_units < 1:
        raise FvtrustError(f"shard_units must be a positive integer, got {shard_units!r}")
    model = as_model(model)
    n_units = layer_units(model, layer)
    units = parse_units(units, n_units, layer)
    distinct = len(set(units)) == len(units)
    plan = [units[i:i + shard_units] for i in range(0, len(units), shard_units)] if distinct else [units]
    key = fingerprint("visualize-v1", weights_digest(model), layer, alpha,
                      {k: repr(v) for k, v in sorted(options.items())})
    cache = None if cache_dir is None else Path(cache_dir)
    name = [f"vis-{key}-{ci:05d}-u{p[0]}-{p[-1]}.safetensors" for ci, p in enumerate(plan)]
    with locked(cache, what="visualization cache") if cache is not None else _nothing():
        parts = [None if cache is None else read_entry(cache / name[ci], "safetensors", f"{key}:{ci}")
                 for ci in range(len(plan))]

        def finished(ci, part):
            if cache is not None:
                write_entry(cache / name[ci], "safetensors", part, f"{key}:{ci}")
            parts[ci] = part

        run_shards(_visualize_shard, [(ci, (layer, plan[ci], alpha, options)) for ci in range(len(plan))
                                      if parts[ci] is None],
                   shared=(model,), on_result=finished, desc=f"visualize {layer}", unit="shard")
    settings = json.loads(bytes(parts[0]["settings_json"].tolist()).decode())
    return VisualizationResult(torch.cat([p["images"] for p in parts], 1), torch.cat([p["objective"] for p in parts], 1),
                               tuple(parts[0]["thresholds"].tolist()), list(units), layer, settings,
                               alpha=torch.cat([p["alpha"] for p in parts]) if alpha else None)


def _visualize_shard(model, layer, units, alpha, options) -> dict:
    """One shard's images (a `fvtrust.scale` shard: depends on its arguments only)."""
    if alpha:
        from .alpha import visualize_transparent as visualize
    else:
        from .render import visualize
    res = visualize(model, layer, units, **options)
    out = {"images": res.images.contiguous(), "objective": res.objective.contiguous(),
           "thresholds": torch.as_tensor(res.thresholds, dtype=torch.long),
           "settings_json": torch.frombuffer(bytearray(json.dumps(res.settings).encode()),
                                             dtype=torch.uint8).clone()}
    if alpha:
        out["alpha"] = res.alpha.contiguous()
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
