"""Train and evaluate the visualization detector E (paper §2.1, App. C.1).

`build_detector(model, layer)` is the whole pipeline: pick units (the
layer's, plus hidden-layer channels when it has few), generate their
visualization snapshots (cached, resumable: `detector_data`), split 90/10
by unit, train the Table 3 CNN (`model`) on natural training
images (label 1) and the training units' snapshots (label 0) with SGD
lr 0.01, momentum 0.9, weight decay 5e-5, and report held-out accuracy on
natural test images and on the held-out units' snapshots separately.

Training sees each batch both as it is and, for a random half, through one
draw of the visualization transforms (pad, jitter, scale, rotate): inside a
fooled model E judges the *transformed* images the optimizer feeds the
network, and transforming natural images too keeps the transform itself
from becoming the cue.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import FvtrustError
from ...io import atomic_write_bytes, atomic_write_json
from ...progress import event, progress
from .data import (
    detector_units,
    generate_visualizations,
    natural_sets,
    split_units,
)
from .model import Detector


@dataclass(frozen=True)
class DetectorBudget:
    """How much work the detector gets. `paper` is App. C.1; `quick` runs in minutes on 2 CPU cores."""

    runs: int = 35               # optimization runs per unit
    steps: int = 512             # visualization steps per run
    snapshots: int = 15          # log-spaced snapshots per run
    max_units: int | None = None  # cap on units (target layer first, hidden channels fill up)
    min_units: int = 200         # add hidden layers until this many units exist
    epochs: int = 8
    natural_per_epoch: int = 20000  # natural images drawn per epoch (visualizations are oversampled to match)
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    test_fraction: float = 0.1


BUDGETS = {
    "paper": DetectorBudget(),
    "standard": DetectorBudget(runs=5, max_units=None),
    "quick": DetectorBudget(runs=2, max_units=60, epochs=4, natural_per_epoch=10000),
    "tiny": DetectorBudget(runs=1, steps=16, snapshots=5, max_units=6, epochs=1, natural_per_epoch=256),
}


def resolve_budget(budget, **overrides) -> DetectorBudget:
    """A budget name, a DetectorBudget or a dict, with keyword overrides (None = keep)."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise FvtrustError(f"unknown detector budget {budget!r}; choose one of: {', '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    elif isinstance(budget, dict):
        budget = DetectorBudget(**budget)
    elif not isinstance(budget, DetectorBudget):
        raise FvtrustError(f"budget must be a name ({', '.join(BUDGETS)}), a dict or a DetectorBudget")
    return replace(budget, **{k: v for k, v in overrides.items() if v is not None})


def _augment(x: torch.Tensor, rng: np.random.Generator, spec) -> torch.Tensor:
    """One visualization-transform draw applied to a random half of the batch."""
    from ...visualize import transforms as T

    pick = torch.from_numpy(rng.random(len(x)) < 0.5).to(x.device)
    if not pick.any():
        return x
    x = x.clone()
    x[pick] = T.apply(x[pick], spec, T.draw(spec, rng), out_hw=tuple(x.shape[-2:]))
    return x


def train_detector(natural: torch.Tensor, visual: torch.Tensor, *, input_shape=None, budget="quick",
                   seed: int = 0, device=None, augment: bool = True, init: Detector | None = None,
                   desc: str = "train detector", checkpoint=None) -> Detector:
    """Fit E on natural images (label 1) vs visualization images (label 0), both [0, 1] NCHW (or uint8).

    Classes are balanced per epoch: `natural_per_epoch` natural images (a new
    random draw each epoch) and as many visualization images (oversampled).
    `init` continues training that detector (in place) instead of a new one.
    `checkpoint` (a `fvtrust.checkpoint.EpochCheckpoint`) is written after
    every epoch and resumed from, so a killed training loses at most one
    epoch and ends with the same weights as an uninterrupted one.
    """
    from ...visualize import transforms as T

    b = resolve_budget(budget)
    if len(natural) == 0 or len(visual) == 0:
        raise FvtrustError("the detector needs natural and visualization images to train on")
    shape = tuple(input_shape or natural.shape[1:])
    if tuple(natural.shape[1:]) != shape or tuple(visual.shape[1:]) != shape:
        raise FvtrustError(f"natural {tuple(natural.shape[1:])} and visualization {tuple(visual.shape[1:])} "
                           f"images must both have shape {shape}")
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    det = init if init is not None else Detector(shape).to(device)
    opt = torch.optim.SGD(det.parameters(), lr=b.lr, momentum=b.momentum, weight_decay=b.weight_decay)
    rng = np.random.default_rng(seed)
    spec = T.resolve_transforms("standard", shape[-1]) if augment else None
    n = max(len(visual), min(len(natural), b.natural_per_epoch))
    per_epoch = (2 * n + b.batch_size - 1) // b.batch_size
    done = checkpoint.load(det, opt, {"rng": rng})[0] if checkpoint is not None else 0
    bar = progress(total=b.epochs * per_epoch, desc=desc, unit="batch")
    bar.update(done * per_epoch)
    det.train()
    try:
        for epoch in range(done, b.epochs):
            nat = rng.choice(len(natural), size=n, replace=n > len(natural))
            vis = np.concatenate([rng.permutation(len(visual)) for _ in range(-(-n // len(visual)))])[:n]
            order = rng.permutation(2 * n)
            for i in range(0, 2 * n, b.batch_size):
                o = order[i:i + b.batch_size]
                is_nat = o < n
                x = torch.cat([_as_float(natural[nat[o[is_nat]]]), _as_float(visual[vis[o[~is_nat] - n]])]).to(device)
                y = torch.cat([torch.ones(int(is_nat.sum())), torch.zeros(int((~is_nat).sum()))]).to(device)
                if spec is not None:
                    x = _augment(x, rng, spec)
                loss = F.binary_cross_entropy_with_logits(det(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if checkpoint is not None and epoch + 1 < b.epochs:  # the last epoch's result is the detector itself
                checkpoint.save(epoch + 1, det, opt, {"rng": rng})
    finally:
        bar.close()
        det.eval()
    return det


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def evaluate_detector(det: Detector, natural: torch.Tensor, visual: torch.Tensor, *, steps=None,
                      seed: int = 0) -> dict:
    """Accuracy on natural images and on visualizations, separately (and per snapshot step if given).

    `visualization_transformed` is the accuracy on the visualizations after
    one transform draw per batch, as E sees them during optimization.
    """
    from ...visualize import transforms as T

    nat_ok = det.predict_natural(_as_float(natural))
    vis_pred = det.predict_natural(_as_float(visual))
    spec = T.resolve_transforms("standard", det.input_shape[-1])
    rng = np.random.default_rng(seed)
    vis_t = torch.cat([det.predict_natural(T.apply(_as_float(visual[i:i + 512]), spec, T.draw(spec, rng)))
                       for i in range(0, len(visual), 512)]) if len(visual) else vis_pred
    out = {"natural": nat_ok.float().mean().item() if len(natural) else float("nan"),
           "visualization": (~vis_pred).float().mean().item() if len(visual) else float("nan"),
           "visualization_transformed": (~vis_t).float().mean().item() if len(visual) else float("nan"),
           "n_natural": len(natural), "n_visualization": len(visual)}
    out["overall"] = (nat_ok.sum().item() + (~vis_pred).sum().item()) / max(1, len(natural) + len(visual))
    if steps is not None and len(visual):
        steps = torch.as_tensor(steps)
        out["visualization_by_step"] = {str(int(s)): (~vis_pred[steps == s]).float().mean().item()
                                        for s in torch.unique(steps).tolist()}
    return out


def save_detector(det: Detector, directory, report: dict | None = None, key: str = "") -> Path:
    """DIR/detector.safetensors + DIR/detector.json (structure + report); reload with `load_detector`.

    The weights file carries a checksum (and `key`, the fingerprint of its
    training inputs, when it is a cache entry), so a damaged file is caught.
    """
    from ...cache import encode

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in det.state_dict().items()}
    atomic_write_bytes(directory / "detector.safetensors", encode("safetensors", state, key))
    atomic_write_json(directory / "detector.json", {"config": det.config(), "report": report or {}})
    return directory


def load_detector(directory, key: str | None = None) -> tuple[Detector, dict]:
    """(detector, its training report) from a directory written by `save_detector`.

    Raises FvtrustError if it is missing, damaged (checksum) or, with `key`,
    trained on other inputs. Files saved before checksums existed still load.
    """
    from safetensors.torch import load

    from ...cache import BadEntry, decode, safetensors_metadata
    from ...models.saved import load_state_checked

    directory = Path(directory)
    weights = directory / "detector.safetensors"
    try:
        meta = json.loads((directory / "detector.json").read_text())
        raw = weights.read_bytes()
        if "fvtrust.sha256" in safetensors_metadata(raw) or key is not None:
            state = decode("safetensors", raw, key)
        else:
            state = load(raw)
        det = Detector(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError, BadEntry) as e:
        raise FvtrustError(f"not a readable detector directory {directory}: {e}") from None
    load_state_checked(det, state, str(weights))
    det.eval()
    return det, meta.get("report", {})


@dataclass
class DetectorData:
    """Everything the detector trains and is tested on: units, their split, snapshots, natural images."""

    units: list
    train_units: np.ndarray
    test_units: np.ndarray
    vis: object  # detector_data.VisSet
    natural_train: torch.Tensor
    natural_test: torch.Tensor
    budget: DetectorBudget
    natural_key: str

    @property
    def train_vis(self):
        return self.vis.select(self.train_units)

    @property
    def test_vis(self):
        return self.vis.select(self.test_units)


def detector_data(model, layer: str, *, budget="quick", layers=None, natural=None, cache_dir=None, seed: int = 0,
                  chunk_size: int | None = None, **overrides) -> DetectorData:
    """Units (split 90/10 by unit), their snapshots (cached, resumable) and natural train/test images.

    natural: (train, test) image tensors, or a data source whose fit / held-out
    parts become train / test (default: the model's own data source).
    """
    from ...models import as_model

    model = as_model(model, example=natural if not isinstance(natural, tuple) else natural[0])
    b = resolve_budget(budget, **overrides)
    units = detector_units(model, layer, layers=layers, max_units=b.max_units, min_units=b.min_units, seed=seed)
    train_u, test_u = split_units(len(units), b.test_fraction, seed)
    vis = generate_visualizations(model, units, runs=b.runs, steps=b.steps, snapshots=b.snapshots, seed=seed,
                                  cache_dir=cache_dir, chunk_size=chunk_size)
    if natural is None or not isinstance(natural, tuple):
        nat_train, nat_test = natural_sets(model, seed=seed, natural=natural)
        nat_key = hashlib.sha256(nat_train.numpy().tobytes() + nat_test.numpy().tobytes()).hexdigest()[:16]
    else:
        nat_train, nat_test = natural
        nat_key = hashlib.sha256(nat_train.numpy().tobytes() + nat_test.numpy().tobytes()).hexdigest()[:16]
    return DetectorData(units, train_u, test_u, vis, nat_train, nat_test, b, nat_key)


def build_detector(model, layer: str, *, budget="quick", layers=None, natural=None, cache_dir=None,
                   seed: int = 0, chunk_size: int | None = None, data: DetectorData | None = None,
                   **overrides) -> tuple[Detector, dict]:
    """The whole pipeline (see module doc): returns the trained E and a JSON-able report.

    `natural` = (train, test) images overrides the default natural data.
    Both the snapshots and the trained detector are cached under
    `cache_dir` (default `detector_data.default_cache_root()`), so a second
    call with the same settings returns at once.
    """
    from ...models import as_model

    t0 = time.time()
    model = as_model(model, example=natural if not isinstance(natural, tuple) else natural[0])
    if data is None:
        data = detector_data(model, layer, budget=budget, layers=layers, natural=natural, cache_dir=cache_dir,
                             seed=seed, chunk_size=chunk_size, **overrides)
    b, units = data.budget, data.units
    train_vis, test_vis = data.train_vis, data.test_vis
    tkey = hashlib.sha256(json.dumps({"budget": asdict(b), "seed": seed, "natural": data.natural_key,
                                      "train_units": data.train_units.tolist()}, sort_keys=True).encode()).hexdigest()[:16]
    det_dir = data.vis.cache_dir / f"detector-{tkey}"
    from ...cache import locked, warn

    with locked(det_dir, what="detector cache"):  # a second process waits, then loads the trained E
        if (det_dir / "detector.json").exists():
            try:
                det, report = load_detector(det_dir, key=tkey)
                event("cache-hit", str(det_dir))
                return det.to(model.device), dict(report, cached=True)
            except FvtrustError as e:
                warn(f"cached detector is unusable ({e}); retraining it")
        from ...checkpoint import EpochCheckpoint

        ckpt = EpochCheckpoint(det_dir.with_name(det_dir.name + ".training"), tkey)
        det = train_detector(data.natural_train, train_vis.images, input_shape=model.input_shape, budget=b,
                             seed=seed, device=model.device, checkpoint=ckpt)
        heldout = evaluate_detector(det, data.natural_test, test_vis.images, steps=test_vis.step, seed=seed)
        counts: dict[str, int] = {}
        for lay, _ in units:
            counts[lay] = counts.get(lay, 0) + 1
        report = {"heldout": heldout, "budget": asdict(b), "seed": seed, "layer": layer, "units_per_layer": counts,
                  "n_units": len(units), "train_units": len(data.train_units),
                  "test_units": [list(units[i]) for i in data.test_units.tolist()],
                  "n_train_visualizations": len(train_vis), "n_train_natural": len(data.natural_train),
                  "snapshot_steps": sorted(set(data.vis.step.tolist())), "architecture": det.config(),
                  "seconds": round(time.time() - t0, 1), "cache": str(det_dir)}
        save_detector(det, det_dir, report, key=tkey)
        event("cache-write", str(det_dir))
        ckpt.clear()
    return det, dict(report, cached=False)
