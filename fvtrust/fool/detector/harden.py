"""Harden E against the fooled model's own visualizations (the distribution π of Lemma 2).

Lemma 2 needs E to separate natural images from every image the
visualization of a *fooled* unit passes through. The detector's training
snapshots are visualizations of the original units; two kinds of images
are new to it: the trajectories of a target it never saw (a picture unit
D′ looks nothing like a unit visualization, and E happily calls a
binarized photo "natural"), and trajectories that strayed after a gate
error (once E says 1, the optimizer follows F and can settle on images
E keeps accepting). Hardening adds both as negatives:

* round 0: visualize the manipulated units with E forced to 0 — exactly
  the trajectories a perfect detector would produce (D's) — and keep the
  log-spaced snapshots;
* rounds 1..R: visualize with the live detector and keep every image on
  which E said "natural", on the clean image or on the transformed input
  it actually judged.

After each round E is fine-tuned (same SGD recipe) on the natural training
images, its original training snapshots and all negatives so far. Mining
uses seeds the report never uses, so the report's visualizations are
fresh runs, and natural *test* images are never touched.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .train import DetectorData, evaluate_detector, train_detector
from .data import snapshot_steps

SEED_OFFSET = 10007  # mining seeds: seed + SEED_OFFSET * (round + 1), never the report's seed


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8)


def _mine(fooled, units, *, runs: int, steps: int, seed: int, forced: bool, max_images: int) -> tuple:
    """(negatives as uint8, fraction of image-steps on which E said natural) from one visualization round."""
    from ...visualize import visualize

    layer = fooled.circuit_layer
    reps = [u for u in units for _ in range(runs)]
    found, opened = [], []
    rng = np.random.default_rng(seed)
    keep_p = min(1.0, max_images / max(1, len(reps) * steps))

    def on_step(step, img, _grad, sl):
        said_natural = fooled.detector.predict_natural(img).to(img.device)
        if fooled.last_gate is not None:
            said_natural |= fooled.last_gate.bool().to(img.device)
        opened.append(said_natural.float().mean().item())
        pick = said_natural & torch.from_numpy(rng.random(len(img)) < keep_p).to(img.device)
        if pick.any():
            found.append(_to_uint8(img[pick]))

    saved = fooled.force_gate
    fooled.force_gate = 0.0 if forced else None
    try:
        res = visualize(fooled, layer, reps, steps=steps, thresholds=snapshot_steps(steps), seed=seed,
                        on_step=None if forced else on_step, progress_desc=f"harden E ({'E=0' if forced else 'live E'})")
    finally:
        fooled.force_gate = saved
    if forced:
        found = [_to_uint8(res.images.flatten(0, 1))]
    neg = torch.cat(found) if found else torch.zeros(0, *fooled.input_shape, dtype=torch.uint8)
    return neg, (float(np.mean(opened)) if opened else 0.0)


def harden_detector(fooled, data: DetectorData, *, rounds: int = 2, runs: int = 2, steps: int | None = None,
                    max_units: int = 32, epochs: int = 1, natural_per_epoch: int = 5000, max_per_round: int = 3000,
                    seed: int = 0) -> dict:
    """Mine negatives from the fooled model's visualizations and fine-tune `fooled.detector` in place.

    Returns a JSON-able report: per round the negatives found and how often E
    said natural during the live visualizations, and held-out accuracy after
    hardening (natural test images; held-out units that are not a source of
    the circuit, since those were just mined).
    """
    det = fooled.detector
    steps = steps or data.budget.steps
    manip = [int(u) for u in fooled.circuit.units.tolist()]
    units = manip if len(manip) <= max_units else sorted(
        np.random.default_rng(seed).choice(manip, size=max_units, replace=False).tolist())
    base_vis = data.train_vis.images
    ft = replace(data.budget, epochs=epochs, natural_per_epoch=natural_per_epoch)
    negatives, log = [], []
    for r in range(rounds + 1):
        neg, open_frac = _mine(fooled, units, runs=runs, steps=steps, seed=seed + SEED_OFFSET * (r + 1),
                               forced=r == 0, max_images=max_per_round)
        log.append({"round": r, "gate": "forced 0" if r == 0 else "live", "negatives": len(neg),
                    "said_natural_fraction": None if r == 0 else open_frac})
        if len(neg) == 0:
            if r > 0:
                break
            continue
        negatives.append(neg)
        mined = torch.cat(negatives)
        reps = max(1, -(-len(base_vis) // (2 * len(mined))))  # mined images make up about a third of the pool
        pool = torch.cat([base_vis, mined.repeat(reps, 1, 1, 1)])
        det.train()
        train_detector(data.natural_train, pool, budget=ft, seed=seed + r, device=det.linear.weight.device,
                       init=det, desc=f"harden E round {r}")
        det.eval()
    sources = {int(s) for s in fooled.circuit.sources.tolist() if s >= 0}
    layer = fooled.circuit_layer
    clean_test = [i for i in data.test_units.tolist()
                  if not (data.units[i][0] == layer and data.units[i][1] in sources)]
    test_vis = data.vis.select(clean_test)
    heldout = evaluate_detector(det, data.natural_test, test_vis.images, steps=test_vis.step, seed=seed)
    return {"rounds": log, "units": units, "runs": runs, "steps": steps, "epochs_per_round": epochs,
            "natural_per_epoch": natural_per_epoch, "heldout_after": heldout,
            "heldout_units_after": [list(data.units[i]) for i in clean_test]}
