"""The detector's training set: visualization snapshots (label 0) and natural images (label 1).

Paper (App. C.1): for each of 1,000 last-layer units, 35 optimization runs,
15 snapshots per run sampled logarithmically over the 512 steps. Small
models have few last-layer units, so hidden-layer channels are added as
extra units (`detector_units`); the 90/10 split is by unit, so held-out
units are never seen in training.

Generation is long, so it is cached per chunk of units: each finished chunk
is one safetensors file written atomically, and `manifest.json` records the
plan. A rerun (after an interrupt, or with the same settings later) loads
finished chunks and generates only the missing ones; a damaged or foreign
chunk (checked by `fvtrust.cache`: fingerprint and checksum) is regenerated,
never loaded. One process at a time writes a cache folder (a lock; a second
one waits and then finds the work done). The cache directory is
keyed by a hash of everything that determines the images (model weights,
units, runs, steps, snapshots, seed).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import FvtrustError
from ...io import atomic_write_json

HIDDEN_SKIP = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.ReLU,
               nn.BatchNorm2d, nn.Flatten, nn.Identity)


def default_cache_root() -> Path:
    """$FVTRUST_CACHE/detector, else ~/.cache/fvtrust/detector: shared by every run on this machine."""
    root = os.environ.get("FVTRUST_CACHE") or Path.home() / ".cache" / "fvtrust"
    return Path(root) / "detector"


def snapshot_steps(steps: int, n: int = 15) -> tuple[int, ...]:
    """min(n, steps) distinct steps spaced logarithmically in 1..steps, always ending at `steps`.

    Rounding makes the first few log-spaced values collide (1, 1.6, 2.4, ...);
    a collision moves to the next free step, so 512 steps give 15 snapshots
    1, 2, 3, 4, 6, 9, 14, 23, 35, 55, 86, 134, 210, 328, 512.
    """
    if steps < 1 or n < 1:
        raise FvtrustError(f"need steps >= 1 and snapshots >= 1, got {steps}, {n}")
    n = min(n, steps)
    out: list[int] = []
    for i, v in enumerate(np.geomspace(1, steps, n)):
        out.append(min(max(round(v), out[-1] + 1 if out else 1), steps - (n - 1 - i)))
    return tuple(out)


def model_fingerprint(model) -> str:
    """sha256 of the model's weights and spec: cached images belong to exactly these weights."""
    h = hashlib.sha256(str(getattr(model, "base_spec", model.spec)).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hidden_layers(model, layer: str, min_units: int) -> list[str]:
    """`layer`, then earlier top-level conv-like layers until the units add up to `min_units`.

    Pooling, normalization, activation and dropout modules are skipped (their
    units are another layer's channels), as are 1x1 maps.
    """
    from ...models.layers import list_layers

    key = layer
    infos = list_layers(model)
    names = [i.name for i in infos]
    if key not in names:
        model.get_layer(layer)  # raises with the nearest names
    chosen, total = [key], next(i.units for i in infos if i.name == key)
    top = [i for i in infos if "." not in i.name and i.name != key and len(i.shape) == 3 and i.shape[1] > 1
           and not isinstance(model.get_layer(i.name), HIDDEN_SKIP)]
    before = [i for i in top if names.index(i.name) < names.index(key)]
    for info in reversed(before):
        if total >= min_units:
            break
        chosen.append(info.name)
        total += info.units
    return chosen


def detector_units(model, layer: str, *, layers=None, max_units: int | None = None, min_units: int = 200,
                   seed: int = 0) -> list[tuple[str, int]]:
    """(layer, unit) pairs whose visualizations make the training set.

    All units of `layer` come first; hidden-layer units fill up to
    `max_units` (a seeded sample when there are more).
    """
    from ...models.layers import layer_units

    layers = list(layers) if layers else hidden_layers(model, layer, min_units)
    pairs = [(lay, u) for lay in layers for u in range(layer_units(model, lay))]
    if max_units is not None and len(pairs) > max_units:
        if max_units < 2:
            raise FvtrustError(f"max_units must be >= 2 (a train and a test unit), got {max_units}")
        rng = np.random.default_rng(seed)
        first = [p for p in pairs if p[0] == layers[0]]
        rest = [p for p in pairs if p[0] != layers[0]]
        if len(first) >= max_units:
            return [first[i] for i in sorted(rng.choice(len(first), size=max_units, replace=False))]
        pick = rng.choice(len(rest), size=max_units - len(first), replace=False)
        pairs = first + [rest[i] for i in sorted(pick)]
    return pairs


def split_units(n_units: int, test_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and test units (at least one of each), seeded."""
    if n_units < 2:
        raise FvtrustError(f"need at least 2 units to split train/test by unit, got {n_units}")
    if not 0 < test_fraction < 1:
        raise FvtrustError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n_units)
    n_test = min(n_units - 1, max(1, round(test_fraction * n_units)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@dataclass
class VisSet:
    """Snapshots: images (N x C x H x W uint8), and per image its unit (index into `units`), step, run."""

    images: torch.Tensor
    unit: torch.Tensor
    step: torch.Tensor
    run: torch.Tensor
    units: list
    cache_dir: Path | None = None

    def select(self, unit_indices) -> VisSet:
        keep = torch.isin(self.unit, torch.as_tensor(np.asarray(unit_indices), dtype=torch.long))
        return VisSet(self.images[keep], self.unit[keep], self.step[keep], self.run[keep], self.units, self.cache_dir)

    def float_images(self) -> torch.Tensor:
        return self.images.float() / 255.0

    def __len__(self):
        return len(self.images)


def _plan(units, runs: int, chunk_runs: int) -> list[list[int]]:
    """Chunks of unit indices, each from one layer, with about `chunk_runs` optimization runs."""
    per = max(1, chunk_runs // runs)
    chunks, cur = [], []
    for i, (lay, _) in enumerate(units):
        if cur and (len(cur) >= per or units[cur[0]][0] != lay):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


def generate_visualizations(model, units, *, runs: int = 35, steps: int = 512, snapshots: int = 15,
                            seed: int = 0, cache_dir=None, chunk_runs: int = 256, chunk_size: int | None = None,
                            desc: str = "detector data") -> VisSet:
    """Visualize every (layer, unit) `runs` times; keep `snapshots` log-spaced steps of each run.

    Standard settings of `fvtrust.visualize` (FFT, decorrelation, standard
    transforms, neuron objective, Adam lr 0.05): the same visualizations the
    fooled model will be subjected to. Cached and resumable, see module doc.
    """
    from ...cache import locked

    if runs < 1:
        raise FvtrustError(f"runs must be >= 1, got {runs}")
    units = [(str(lay), int(u)) for lay, u in units]
    th = snapshot_steps(steps, snapshots)
    config = {"model": model_fingerprint(model), "units": units, "runs": runs, "steps": steps, "thresholds": th,
              "seed": seed, "chunk_runs": chunk_runs, "settings": "visualize defaults (fft, standard, neuron)"}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    out = root / f"vis-{key}"
    plan = _plan(units, runs, chunk_runs)
    with locked(out, what="detector cache"):  # a second process waits, then finds the chunks done
        parts = _generate_chunks(model, units, plan, out, key, config, runs=runs, steps=steps, th=th, seed=seed,
                                 chunk_size=chunk_size, desc=desc)
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("images", "unit", "step", "run")}
    return VisSet(cat["images"], cat["unit"], cat["step"], cat["run"], units, out)


def _generate_chunks(model, units, plan, out, key, config, *, runs, steps, th, seed, chunk_size, desc) -> list[dict]:
    """Load the verified chunks of `out` and generate the missing (or damaged, or foreign) ones.

    The missing chunks are `fvtrust.scale` shards (one process, or Ray workers
    with ``--ray``); each finished one is written here as soon as it arrives.
    """
    from ...cache import read_entry, write_entry
    from ...scale import run_shards

    manifest = out / "manifest.json"
    if not manifest.exists():
        atomic_write_json(manifest, {"config": config, "chunks": plan})
    parts = [read_entry(out / f"chunk-{ci:05d}.safetensors", "safetensors", f"{key}:{ci}") for ci in range(len(plan))]

    def finished(ci, part):
        write_entry(out / f"chunk-{ci:05d}.safetensors", "safetensors", part, f"{key}:{ci}")
        parts[ci] = part

    shards = [(ci, (units[plan[ci][0]][0], [units[i][1] for i in plan[ci]], plan[ci], runs, steps, th,
                    seed + 7919 * ci, chunk_size, f"{desc} {ci + 1}/{len(plan)}"))
              for ci in range(len(plan)) if parts[ci] is None]
    run_shards(_chunk_snapshots, shards, shared=(model,), on_result=finished, desc=desc, unit="chunk")
    atomic_write_json(manifest, {"config": config, "chunks": plan, "complete": True})
    return parts


def _chunk_snapshots(model, layer, layer_units, chunk, runs, steps, th, seed, chunk_size, desc) -> dict:
    """One chunk's snapshots (a shard: depends on its arguments only): `runs` runs of each unit of `layer`."""
    from ...visualize import visualize

    reps = [u for u in layer_units for _ in range(runs)]
    res = visualize(model, layer, reps, steps=steps, thresholds=th, seed=seed, chunk_size=chunk_size,
                    progress_desc=desc)
    t, n = res.images.shape[:2]
    idx = torch.as_tensor([i for i in chunk for _ in range(runs)], dtype=torch.long)
    run = torch.as_tensor([r for _ in chunk for r in range(runs)], dtype=torch.long)
    images = res.images.reshape(t * n, *res.images.shape[2:])
    return {"images": (images * 255).round().clamp(0, 255).to(torch.uint8),
            "unit": idx.repeat(t), "run": run.repeat(t),
            "step": torch.as_tensor(th, dtype=torch.long).repeat_interleave(n)}


def natural_sets(model, *, n_train: int | None = None, seed: int = 0, natural=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) natural images for the detector: the fit and held-out parts of the data source
    (`natural`, default the model's own; see fvtrust.data.natural). They are disjoint by construction."""
    from ...data import natural as resolve_natural

    data = resolve_natural(natural, model=model)
    train = data.fit.images()
    test = data.heldout.images()
    if n_train is not None and n_train < len(train):
        train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_train]]
    return train, test
