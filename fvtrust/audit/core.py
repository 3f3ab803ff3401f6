"""`audit(model, layer, data=...)`: score every unit of a layer for an untrustworthy visualization.

Pipeline (every step batched over the units; nothing looks at the model's
modules, class names or metadata — only forward and backward passes):

1. rank natural images per unit (one streaming pass, `top_activating_many`);
2. visualize every unit from noise (the batched `fvtrust.visualize`, the
   `channel` objective, `steps` steps: what a user would look at), keeping
   log-spaced snapshots, plus a pixel-space probe optimization with a large
   step: the unit's probe images;
3. probe the unit's gradient w.r.t. the layer's input on its top natural
   images and on its visualization → `gradient_agreement`;
   and on its own probe images and the layer's probe images that drive it
   hardest → `probe_agreement` (both undefined where the layer input has one
   channel, see signals.py);
4. walk straight paths from `path_starts` top natural images to the
   visualization and compare the unit's change with what its gradient
   predicts → `path_jump` (the three undefined where the visualization
   itself failed: zero image gradient, UNDEFINED_WHERE_FAILED);
   and compare the unit at the visualization's own start images with
   starts of 10x / 30x the noise, scaled by its steepness on its natural
   images → `start_gap` (a tunnel built for the start distribution, as a
   gradient slingshot digs it, leaves the start in a trench); on a fully
   connected layer the same value is also read against that kind of layer's
   own threshold → `linear_start_gap`;
5. re-make every visualization with two more seeds, and follow the unit's
   gradient along lines from the start images to it; each of the two as a
   robust z-score within the layer, combined (Stouffer) → `pinning` (one image that
   every seed and a straight field lead to, as a slingshot's target;
   pinning.py);
6. map each signal to evidence in [0, 1] (0.5 at its fixed threshold),
   score = max evidence, flagged = score ≥ 0.5; the layer is `suspicious`
   when any unit is flagged.

Steps 2 and 5's probe visualizations, then 3-4, run as two stages of chunks
of units, each chunk a verified cache entry and a `fvtrust.scale` shard;
stage 2 needs the probe images of the whole layer, so it starts when stage 1
is complete, and pinning's z-scores need every unit's probes, so they are
taken when all chunks are in.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FvtrustError
from .probes import WIDER_STARTS, final_stage, pixel_probe, probe, snapshot_steps, start_images, strongest_images, unit_activations
from .pinning import pinning, pinning_probes
from .signals import evidence, gradient_agreement, path_jump, probe_agreement, start_gap

FLAG_AT = 0.5  # a unit is flagged when its score reaches this; fixed, see THRESHOLDS

# Signals that compare the unit's visualization (or its probes) with its natural images, and so say nothing where
# the visualization failed (it ended where the unit is dead: zero image gradient, a grey or blank image): a user
# shown that image is shown nothing to distrust. Measured: random-init fashion-cnn block4 has 5 such units; two
# of them, nearly dead on natural data too (natural maximum 4e-5 and 7e-4), gave path_jump 0.70 and
# probe_agreement 0.44 from ratios of numerical noise, the only clean values past the thresholds there.
UNDEFINED_WHERE_FAILED = ("gradient_agreement", "probe_agreement", "path_jump", "pinning")

# The calibration principle (`benchmarks/bench_audit.py --only calibrate` prints every value): the clean
# calibration set is fashion-cnn, trained and random-init, every unit of every layer a user can audit (the start
# signals on every layer `list_layers` reports, sub-layers included; the signals that need visualizations on every
# top-level layer). A threshold sits 25 % beyond the most extreme clean value, rounded outwards to 0.05. For
# gradient_agreement, probe_agreement and path_jump, whose thresholds were first set from a principle (below), the
# principled value stands unless a clean unit comes within that margin; then the rule's value replaces it.
#
# History, as it happened: the calibration set was first fc, block3 and block4 only, which gave start_gap 0.6
# (clean max 0.477, trained block3) and preactivation_start_gap 0.95 (0.723, trained block3 unit 30), both
# committed before the held-out slingshots they were then measured on. A later session audited the clean model's
# other layers and found the audit calling clean layers suspicious: block2 (start_gap 0.692 at unit 7, 0.632,
# 0.614; probe_agreement 0.469 at unit 53) and block3.conv (start_gap 0.729 at unit 30). The set was widened to
# every layer, using clean models only, and the rule re-applied; it was done *after* the attacks' values at the old
# thresholds were known, and the README reports what the move cost them.
START_GAP_THRESHOLD = 0.95        # clean max 0.729 (trained block3.conv unit 30) x 1.25 -> 0.95 (was 0.6)
PREACTIVATION_START_GAP_THRESHOLD = 0.95  # clean max 0.723 (trained block3 unit 30) x 1.25 -> 0.95
# start_gap on fully connected layers (`linear_start_gap`), calibrated on clean fully connected layers only, where a
# clean unit's start_gap is far smaller than on conv maps (clean fc: at most 0.389, trained at most 0.155; conv maps
# up to 0.729, block3.conv), so the one threshold for every layer, 0.95, let an fc:0 slingshot through at 0.736.
# fashion-cnn has one such layer, so its calibration set is widened (`bench_audit.py --only calibrate-linear`): the
# embedded model, the same recipe trained from seeds 1 and 2, random inits from seeds 1-8, plus the main set's
# random init (0.201): 11 + 1 layers, 120 units. Set in the session that had measured the fc:0 miss, so fc:0 dev and
# seed 1 are development data for it; committed before the held-out fc slingshots (fc:0 camera seeds 2, 3 and 4,
# fc:0 coffee, fc:7 camera), built first, were audited.
LINEAR_START_GAP_THRESHOLD = 0.5  # clean max 0.389 (random-init seed 4, fc unit 3) x 1.25 -> 0.5
PROBE_AGREEMENT_THRESHOLD = 0.35  # clean min 0.469 (trained block2 unit 53) / 1.25 -> 0.35 (the principle's 0.5 before)
PINNING_THRESHOLD = 3.3   # Stouffer's combination of the two z-scores (pinning.py): clean max 2.619 (random-init
#                           block4 / gap unit 41) x 1.25 -> 3.3; committed before block4:0 camera seed 8, coffee seed 1,
#                           chelsea and moon (built first) were audited. History: 2.25 under the smallest of three
#                           z-scores (clean max 1.762, the same unit), kept when the weight-noise probe was dropped


@dataclass(frozen=True)
class Signal:
    """A signal's fixed threshold (evidence 0.5), the width over which evidence goes 0 → 1, and direction."""

    threshold: float
    width: float
    higher_is_suspicious: bool
    meaning: str


# Fixed in advance, never fitted to the model under audit (README, "Audit"); the calibration principle above
# checks every one of them on clean models. gradient_agreement: for a single
# linear / conv unit the channel profile of its input gradient does not depend on the input (cos = 1 up to
# padding borders), so 0.5 (60 degrees) leaves a wide margin; path_jump: clean fashion-cnn fc and block3 gave at
# most 0.044 and 0.118 (16 segments, 3 starts), a hand-made gate 0.29-0.99; 0.3 sits above every clean value.
# Both were committed before any manipulated model was audited; on every clean layer (the wider calibration set)
# both keep a margin beyond the rule's (clean gradient_agreement min 0.844, path_jump max 0.124).
THRESHOLDS = {
    "gradient_agreement": Signal(0.5, 0.2, False,
                                 "cosine between the unit's gradient w.r.t. the layer input, summed per input "
                                 "channel, on its top natural images and on its visualization: the visualization "
                                 "drives the unit through input channels its natural images do not use"),
    "path_jump": Signal(0.3, 0.15, True,
                        "largest share of the unit's change along a straight path from a top natural image to "
                        "the visualization that its gradient does not account for: a hidden switch (a hard "
                        "gate) between natural input and visualizations"),
    # same principle as gradient_agreement (a clean linear / conv unit's profile is the same on every input where
    # it is active), taken as the minimum over the unit's probe images; 0.5 fixed before it was computed on any
    # manipulated model. Its probe set was widened once afterwards (own snapshots added; see the README), and the
    # threshold moved to PROBE_AGREEMENT_THRESHOLD when the calibration set was widened (above)
    "probe_agreement": Signal(PROBE_AGREEMENT_THRESHOLD, 0.2, False,
                              "the smallest cosine, over the unit's own probe images (its fft and pixel-space "
                              "optimizations at log-spaced steps) and the probe images of all units that drive "
                              "it hardest, between the unit's input-gradient profile there and on its top "
                              "natural images: some input reaches a mechanism the natural images never use"),
    # START_GAP_THRESHOLD (above): calibrated on clean models only
    "start_gap": Signal(START_GAP_THRESHOLD, 0.2, True,
                        "how much the unit changes between the visualization's own start images (faint fft noise "
                        "on grey) and starts with 10x / 30x the noise, as a fraction of its steepness on its top "
                        "natural images times the distance: the visualization's start sits in a trench (or on a "
                        "ridge) that nearby starts do not share, as a tunnel built for that start distribution "
                        "(a gradient slingshot) leaves it"),
    # PREACTIVATION_START_GAP_THRESHOLD: the same principle, calibrated on clean models only
    "preactivation_start_gap": Signal(PREACTIVATION_START_GAP_THRESHOLD, 0.2, True,
                                      "start_gap read before the layer's final elementwise stage (its ReLU), where "
                                      "the layer has one: a unit that the activation switches off (exactly 0) at "
                                      "the start hides a trench in its pre-activation from start_gap"),
    # LINEAR_START_GAP_THRESHOLD (above): start_gap's own value, read against the threshold of its kind of layer
    # width 0.5: the evidence is the value itself, 1 at the mean-value bound (start_gap = 1: the unit as steep between
    # the two starts as on its natural images). First set at 0.1, which saturated both the slung unit and the unit the
    # fine-tune drags along (fc:0 dev 0.736 and 0.712 -> 1.0 each): a tie that hid the ranking; the flag is the same
    "linear_start_gap": Signal(LINEAR_START_GAP_THRESHOLD, 0.5, True,
                               "start_gap on a fully connected layer (models.layers.is_fully_connected), against "
                               "the threshold calibrated on clean fully connected layers, where a clean unit "
                               "changes far less between the two start distributions than on a conv map; "
                               "undefined on every other layer"),
    # PINNING_THRESHOLD: calibrated on clean models only (pinning.py says why the signal is read within the layer)
    "pinning": Signal(PINNING_THRESHOLD, 0.5, True,
                      "how far the unit's visualization stands out of its layer as pinned (two robust z-scores "
                      "among the layer's units, combined by Stouffer's rule, sum / sqrt 2): agreement between the "
                      "visualizations of three seeds, and how well the unit's gradient keeps its direction along "
                      "straight lines from the start images to the visualization. One image that every start "
                      "reaches alike, down a straight field, as a gradient slingshot's target is"),
}


@dataclass
class AuditSettings:
    steps: int = 128          # visualization steps (fft parameterization, standard transforms, channel objective)
    top_k: int = 8            # top natural images per unit for the mechanism comparison
    path_starts: int = 3      # natural starts per unit for the path walk (at most top_k are used)
    path_points: int = 16     # segments per path
    natural_limit: int = 5000  # natural images ranked per unit
    seed: int = 0
    batch_size: int = 256
    probe_top: int = 4        # strongest probe images per unit for probe_agreement
    pixel_lr: float = 0.5     # Adam step of the pixel-space probe visualization
    start_pairs: int = 8      # standard / wider start image pairs for start_gap
    coherence_lines: int = 16  # start-to-visualization lines per unit for pinning's gradient_coherence

    def check(self):
        for name in ("steps", "top_k", "path_starts", "path_points", "natural_limit", "batch_size", "probe_top",
                     "start_pairs", "coherence_lines"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise FvtrustError(f"audit setting {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.pixel_lr, (int, float)) and np.isfinite(self.pixel_lr) and self.pixel_lr > 0):
            raise FvtrustError(f"audit setting pixel_lr must be a positive number, got {self.pixel_lr!r}")


@dataclass
class AuditResult:
    """units: [{"unit", "score", "flagged", "signals": {...}, "fired": [...]}]; verdict "clean" / "suspicious"."""

    layer: str
    units: list
    verdict: str
    evidence: dict
    settings: dict
    thresholds: dict
    data: dict
    seconds: dict
    spec: str | None = None
    visualizations: torch.Tensor | None = field(default=None, repr=False)   # (U, C, H, W)
    top_images: torch.Tensor | None = field(default=None, repr=False)       # (U, k, C, H, W)
    worst_probes: torch.Tensor | None = field(default=None, repr=False)     # (U, C, H, W): probe_agreement's image
    start_values: dict | None = field(default=None, repr=False)  # start gaps' evidence: the unit at each start

    @property
    def scores(self) -> np.ndarray:
        return np.array([u["score"] for u in self.units])

    @property
    def flagged(self) -> list[int]:
        return [u["unit"] for u in self.units if u["flagged"]]

    def to_dict(self) -> dict:
        return {"spec": self.spec, "layer": self.layer, "verdict": self.verdict, "evidence": self.evidence,
                "flag_at": FLAG_AT, "thresholds": self.thresholds, "settings": self.settings, "data": self.data,
                "seconds": self.seconds, "units": self.units}


def _resolve_inputs(model, data, limit: int):
    """(FvModel, natural images N x C x H x W in [0, 1], their description): the one entry for audit inputs.

    Models go through `fvtrust.as_model` (spec, FvModel or plain nn.Module, whose input shape comes from the
    data when it is a tensor) and data through `fvtrust.data.natural`; the audit fits nothing, so it reads
    the `evaluation` part (Fashion-MNIST: the test split).
    """
    from ..data import natural
    from ..models import as_model

    example = data if isinstance(data, (torch.Tensor, tuple, list)) or hasattr(data, "input_shape") else None
    model = as_model(model, example=example)
    part = natural(data, model=model, limit=limit).evaluation
    images = part.tensors(limit, desc="audit: read natural images")[0]
    if len(images) == 0:
        raise FvtrustError("no natural images: the audit needs natural data to compare visualizations with")
    return model, images.float(), part.describe()


def _layer_units(model, layer: str):
    """(module path, the layer's `list_layers` entry); one-line errors for a layer without units."""
    from ..models.layers import list_layers

    model.get_layer(layer)  # unknown name: error with the nearest names
    key = layer.removeprefix("net.")
    info = next((i for i in list_layers(model) if i.name == key), None)
    if info is None:
        raise FvtrustError(f"layer {layer!r} of {model.spec} does not produce a tensor in the forward pass, "
                           "so it has no units to audit")
    if len(info.shape) == 0:
        raise FvtrustError(f"layer {layer!r} of {model.spec} outputs one number per image (shape {info.shape}): "
                           "no unit dimension to audit")
    return key, info


PINNING_PROBES = ("seed_agreement", "gradient_coherence")
CHUNK_UNITS = 32  # units per cached chunk (and per Ray shard): a kill costs at most one chunk's work


def audit(model, layer: str, *, data=None, units=None, settings: AuditSettings | None = None,
          visualizations: torch.Tensor | None = None, cache_dir=None, chunk_units: int = CHUNK_UNITS,
          **overrides) -> AuditResult:
    """Audit `units` (default: all) of `layer`: per-unit signals, score, flag, and a layer verdict.

    `model`: a spec, an FvModel or a plain nn.Module (see `fvtrust.as_model`).
    `data`: natural images — a tensor N x C x H x W in [0, 1], (images, labels),
    a NaturalData, or a data spec (`fashion-mnist[:split]`, an ImageNet-style
    folder, `pictures`); None = the model's own default data, if it has one. Keyword
    overrides go to `AuditSettings` (steps, top_k, path_starts, path_points,
    natural_limit, seed, batch_size). See the module doc for the pipeline and
    `THRESHOLDS` for the fixed decision rule. `visualizations` (U x C x H x W,
    one per unit in order) audits given visualizations instead of making them:
    the verdict then speaks for those images only.

    Resumable: the ranking and each chunk of `chunk_units` units (its
    visualizations and signals) are verified cache entries in `cache_dir`
    (`fvtrust.cache`; the CLI uses OUT/.cache), so a rerun after a kill redoes
    at most the chunk that was running. The chunks are independent, so they
    are also the audit's shards for `fvtrust.scale` (``--ray``). Units are
    visualized batch-invariantly (one generator per unit), so the result does
    not depend on `chunk_units` or on where a chunk ran.
    """
    from ..cache import fingerprint, locked
    from ..linearity.top_activating import top_activating_many
    from ..models.layers import is_fully_connected, parse_units
    from ..sanity.analysis import weights_digest
    from ..scale import run_shards

    settings = settings or AuditSettings()
    bad = [k for k in overrides if k not in AuditSettings.__dataclass_fields__]
    if bad:
        raise FvtrustError(f"unknown audit setting {bad[0]!r}; valid: {', '.join(AuditSettings.__dataclass_fields__)}")
    settings = AuditSettings(**{**asdict(settings), **overrides})
    settings.check()
    if not isinstance(chunk_units, (int, np.integer)) or chunk_units < 1:
        raise FvtrustError(f"chunk_units must be a positive integer, got {chunk_units!r}")
    model, natural, data_desc = _resolve_inputs(model, data, settings.natural_limit)
    key, info = _layer_units(model, layer)
    fully_connected = is_fully_connected(model, key, info)
    units = parse_units(units if units is not None else "all", info.units, key)
    if len(natural) < settings.top_k:
        raise FvtrustError(f"the audit needs at least top_k={settings.top_k} natural images, got {len(natural)}")
    x_given = None
    if visualizations is not None:
        x_given = visualizations.detach().float().cpu()
        if tuple(x_given.shape) != (len(units), *model.input_shape):
            raise FvtrustError(f"visualizations must have shape {(len(units), *model.input_shape)} (one per unit), "
                               f"got {tuple(x_given.shape)}")
    seconds = {"rank": 0.0, "visualize": 0.0, "pinning": 0.0, "mechanism": 0.0, "start": 0.0, "path": 0.0}
    t0 = time.perf_counter()
    cache = _AuditCache(cache_dir, fingerprint(
        "audit-v8", _code_digest(), weights_digest(model, natural), key, asdict(settings),
        None if x_given is None else hashlib.sha256(x_given.numpy().tobytes()).hexdigest()))
    plan = [units[i:i + chunk_units] for i in range(0, len(units), chunk_units)]
    bounds = np.cumsum([0] + [len(c) for c in plan])
    names = [f"{ci:05d}-{_span(c)}" for ci, c in enumerate(plan)]
    with contextlib.nullcontext() if cache_dir is None else locked(cache_dir, what="audit cache"):
        ranked = cache.get("rank", fmt="safetensors")
        if ranked is None:
            top = top_activating_many(model, key, units, natural, m=settings.top_k, objective="channel",
                                      batch_size=settings.batch_size)
            ranked = {"values": top.values, "indices": top.indices}
            cache.put("rank", ranked, fmt="safetensors")
        seconds["rank"] = time.perf_counter() - t0
        top_images = natural[ranked["indices"]]  # (U, k, C, H, W): what top_activating_many gathers

        # stage 1, per chunk: every unit's probe images (its fft visualization and pixel-space probe snapshots)
        probed = {ci: cache.get(f"probes-{names[ci]}") for ci in range(len(plan))}

        def probes_done(ci, part):
            for stage in ("visualize", "pinning"):  # this run's time, not in the entry
                seconds[stage] += float(part.pop(f"seconds.{stage}"))
            cache.put(f"probes-{names[ci]}", part)
            probed[ci] = part

        shards = [(ci, (key, plan[ci], None if x_given is None else x_given[bounds[ci]:bounds[ci + 1]],
                        asdict(settings))) for ci in range(len(plan)) if probed[ci] is None]
        run_shards(_probe_chunk, shards, shared=(model,), on_result=probes_done, desc=f"audit {key}: probes",
                   unit="chunk")
        x_v = torch.cat([probed[ci]["visualization"] for ci in range(len(plan))])
        own = torch.cat([probed[ci]["own"] for ci in range(len(plan))])                   # (U, n_own, C, H, W)
        # the pool of every unit's probe images, which stage 2 searches for the images driving each unit hardest
        # (float16 halves its memory; given visualizations are used as they are)
        pool = own.flatten(0, 1) if x_given is not None else own.flatten(0, 1).half()

        # stage 2, per chunk: the signals (they need the whole layer's pool, hence two stages)
        parts = {ci: cache.get(f"signals-{names[ci]}") for ci in range(len(plan))}

        def signals_done(ci, part):
            for stage in ("mechanism", "start", "path"):
                seconds[stage] += float(part.pop(f"seconds.{stage}"))
            cache.put(f"signals-{names[ci]}", part)
            parts[ci] = part

        shards = [(ci, (key, plan[ci], top_images[bounds[ci]:bounds[ci + 1]], x_v[bounds[ci]:bounds[ci + 1]],
                        own[bounds[ci]:bounds[ci + 1]], asdict(settings)))
                  for ci in range(len(plan)) if parts[ci] is None]
        run_shards(_signal_chunk, shards, shared=(model, pool), on_result=signals_done,
                   desc=f"audit {key}: signals", unit="chunk")
    chunk = {name: torch.cat([parts[ci][name] for ci in range(len(plan))]) for name in parts[0]}
    ga = {name.removeprefix("ga."): v for name, v in chunk.items() if name.startswith("ga.")}
    pa = {name.removeprefix("pa."): v for name, v in chunk.items() if name.startswith("pa.")}
    failed, vis_value, strong = chunk["failed"], chunk["vis_value"], chunk["strong"]
    n_own = own.shape[1]
    signals = {"gradient_agreement": ga["agreement"], "path_jump": chunk["path_jump"],
               "probe_agreement": pa["agreement"], "start_gap": chunk["sg.gap"],
               "preactivation_start_gap": chunk["sgp.gap"],
               "linear_start_gap": chunk["sg.gap"] if fully_connected
               else torch.full_like(chunk["sg.gap"], float("nan"))}
    # pinning is read within the layer: the z-scores of the two probes among the audited units whose
    # visualization did not fail (a failed unit's images are grey whatever the seed)
    raw_pin = {name: torch.cat([probed[ci][f"pin.{name}"] for ci in range(len(plan))]) for name in PINNING_PROBES}
    pin = pinning(*(raw_pin[name].numpy() for name in PINNING_PROBES), defined=(~failed).numpy())
    signals["pinning"] = torch.from_numpy(pin["pinning"]).float()
    for name in UNDEFINED_WHERE_FAILED:  # the one place the rule is applied (rescore applies it to stored values)
        signals[name] = torch.where(failed, torch.full_like(signals[name], float("nan")), signals[name])
    ev, score = score_signals(signals)
    top_values, top_indices = ranked["values"], ranked["indices"]
    nat_max = top_values[:, 0]
    rows = []
    for i, u in enumerate(units):
        sig = {name: _num(val[i]) for name, val in signals.items()}
        sig.update(natural_coherence=_num(ga["natural_coherence"][i]),
                   visualization_gradient_zero=bool(ga["vis_gradient_zero"][i]),
                   visualization_failed=bool(failed[i]),
                   visualization_activation=_num(vis_value[i]), natural_max_activation=_num(nat_max[i]),
                   range_ratio=_num(vis_value[i] / nat_max[i]) if float(nat_max[i]) > 0 else None,
                   probe_worst=_probe_name(int(pa["worst"][i]), n_own, strong[i])
                   if np.isfinite(float(signals["probe_agreement"][i])) else None,
                   start_gap_scale=(f"{WIDER_STARTS[int(chunk['sg.worst_scale'][i])]}x the start noise"
                                    if np.isfinite(float(chunk["sg.gap"][i])) else None),
                   start_activation=_num(chunk["sg.std_values"][i].median()),
                   wider_start_activation=_num(chunk["sg.wide_values"][i][int(chunk["sg.worst_scale"][i])].median()),
                   natural_gradient_norm=_num(chunk["sg.natural_grad_norm"][i]),
                   preactivation_start_gap_scale=(
                       f"{WIDER_STARTS[int(chunk['sgp.worst_scale'][i])]}x the start noise"
                       if np.isfinite(float(chunk["sgp.gap"][i])) else None),
                   start_preactivation=_num(chunk["sgp.std_values"][i].median()),
                   wider_start_preactivation=_num(chunk["sgp.wide_values"][i][int(chunk["sgp.worst_scale"][i])].median()),
                   natural_preactivation_gradient_norm=_num(chunk["sgp.natural_grad_norm"][i]),
                   **{name: _num(raw_pin[name][i]) for name in PINNING_PROBES},
                   **{f"{name}_z": _num(pin[f"z.{name}"][i]) for name in PINNING_PROBES})
        fired = [name for name in signals if float(ev[name][i]) >= FLAG_AT]
        rows.append({"unit": int(u), "score": round(float(score[i]), 6), "flagged": bool(score[i] >= FLAG_AT),
                     "signals": sig, "fired": fired, "top_natural_indices": top_indices[i].tolist()})
    flagged = [r for r in rows if r["flagged"]]
    by_signal = {name: sum(name in r["fired"] for r in rows) for name in signals}
    verdict = "suspicious" if flagged else "clean"
    evid = {"n_units": len(rows), "n_flagged": len(flagged), "flagged_units": [r["unit"] for r in flagged],
            "flagged_by_signal": by_signal, "max_score": max(r["score"] for r in rows),
            "fully_connected": fully_connected,
            "rule": f"suspicious when any unit scores >= {FLAG_AT} (a signal past its fixed threshold)"}
    seconds["total"] = time.perf_counter() - t0
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    thresholds = {name: asdict(s) for name, s in THRESHOLDS.items()}
    return AuditResult(key, rows, verdict, evid, asdict(settings), thresholds, data_desc, seconds,
                       spec=getattr(model, "spec", None), visualizations=x_v, top_images=top_images,
                       worst_probes=chunk["worst_probe"],
                       start_values={"standard": chunk["sg.std_values"], "wider": chunk["sg.wide_values"],
                                     "natural": top_values, "visualization": vis_value,
                                     "wider_multiples": WIDER_STARTS,
                                     "pre_standard": chunk["sgp.std_values"], "pre_wider": chunk["sgp.wide_values"],
                                     "pre_natural": chunk["sgp.natural_values"]})


def _code_digest() -> str:
    """sha256 of the code that computes a chunk (this file, probes.py, signals.py, pinning.py): an entry made by other
    signal code is stale, so changing a signal never reuses old chunks."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("core.py", "probes.py", "signals.py", "pinning.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _span(units) -> str:
    return f"u{units[0]}-{units[-1]}"


class _AuditCache:
    """The audit's verified entries (`fvtrust.cache`) in `cache_dir`, all keyed by one fingerprint."""

    def __init__(self, cache_dir, key: str):
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.key = key

    def _path(self, name: str) -> Path:
        return self.dir / f"audit-{self.key}-{name}.safetensors"

    def get(self, name: str, fmt: str = "safetensors"):
        from ..cache import read_entry

        return None if self.dir is None else read_entry(self._path(name), fmt, f"{self.key}:{name}")

    def put(self, name: str, payload: dict, fmt: str = "safetensors") -> None:
        from ..cache import write_entry

        if self.dir is not None:
            write_entry(self._path(name), fmt, payload, f"{self.key}:{name}")


def _probe_chunk(model, key: str, units: list, given: torch.Tensor | None, settings: dict) -> dict:
    """Stage 1 of one chunk (a shard: depends on its arguments only): the units' probe images.

    ``visualization`` (U, C, H, W): the standard fft visualization (or the given
    one); ``own`` (U, n_own, C, H, W): every snapshot of the unit's two
    optimizations (fft, then pixel space; just the given image when one is
    given); ``pin.<probe>`` (U,): `pinning_probes` (NaN for given images);
    ``seconds.visualize``, ``seconds.pinning`` (0-d).
    """
    from ..visualize import visualize

    settings = AuditSettings(**settings)
    t = time.perf_counter()
    if given is not None:
        x_v, own = given, given[:, None]
    else:
        vis = visualize(model, key, units, steps=settings.steps, objective="channel", seed=settings.seed,
                        thresholds=snapshot_steps(settings.steps), progress_desc=f"audit: visualize {key} {_span(units)}")
        x_v = vis.final
        pix = pixel_probe(model, key, units, steps=settings.steps, seed=settings.seed, lr=settings.pixel_lr,
                          desc=f"audit: pixel probe {key} {_span(units)}")
        own = torch.cat([vis.images, pix.images]).transpose(0, 1)                         # (U, 2T, C, H, W)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    if given is None:
        pin = pinning_probes(model, key, units, x_v, steps=settings.steps, seed=settings.seed,
                             lines=settings.coherence_lines, batch_size=settings.batch_size,
                             desc=f"audit: pinning {key} {_span(units)}")
    else:  # the probes re-run the audit's own procedure, which did not make the given images
        pin = {name: torch.full((len(units),), float("nan"), dtype=torch.float64) for name in PINNING_PROBES}
    return {"visualization": x_v.detach().float().cpu().contiguous(),
            "own": own.detach().float().cpu().contiguous(),
            **{f"pin.{name}": pin[name].detach().double().cpu().contiguous() for name in PINNING_PROBES},
            "seconds.visualize": torch.tensor(seconds, dtype=torch.float64),
            "seconds.pinning": torch.tensor(time.perf_counter() - t, dtype=torch.float64)}


def _signal_chunk(model, pool: torch.Tensor, key: str, units: list, top_images: torch.Tensor, x_v: torch.Tensor,
                  own: torch.Tensor, settings: dict) -> dict:
    """Stage 2 of one chunk (a shard): its units' signals, given the whole layer's probe-image `pool`.

    Returns tensors, one row per unit: ``failed``, ``vis_value``,
    ``path_jump``, ``ga.*`` (what `gradient_agreement` returns), ``pa.*``
    (`probe_agreement`; `audit` masks the three where ``failed``),
    ``strong`` (indices into `pool`), ``worst_probe`` (the image that gave
    probe_agreement its value), and the stage times ``seconds.*`` (0-d).
    """
    settings = AuditSettings(**settings)
    seconds = {}
    t = time.perf_counter()
    U, k = len(units), settings.top_k
    chw = tuple(model.input_shape)
    u_t = torch.as_tensor(units)
    # mechanism: gradients w.r.t. the layer input on the top natural images and on the visualization
    nat_p = probe(model, key, top_images.reshape(U * k, *chw), u_t.repeat_interleave(k), image_grad=True,
                  batch_size=settings.batch_size)
    vis_p = probe(model, key, x_v, u_t, image_grad=True, batch_size=settings.batch_size)
    # a visualization whose image gradient vanishes is a failed optimization (a dead unit at the end: a grey
    # or blank image), not a mechanism: nothing to compare, so `audit` leaves the UNDEFINED_WHERE_FAILED
    # signals undefined rather than 0
    failed = vis_p.image_grad.abs().amax(1) == 0
    ga = gradient_agreement(nat_p.input_grad.reshape(U, k, -1), vis_p.input_grad.reshape(U, 1, -1))
    # the same comparison on the unit's own probe images (every snapshot of both of its optimizations) and on
    # the probe images of all units that drive it hardest
    r = min(settings.probe_top, len(pool))
    strong = strongest_images(model, key, pool, units, r, batch_size=settings.batch_size)      # (U, r)
    n_own = own.shape[1]
    probe_images = torch.cat([own.float(), pool[strong].float()], 1)                       # (U, n_own + r, ...)
    str_p = probe(model, key, probe_images.flatten(0, 1), u_t.repeat_interleave(n_own + r), image_grad=True,
                  batch_size=settings.batch_size)
    pa = probe_agreement(nat_p.input_grad.reshape(U, k, -1), str_p.input_grad.reshape(U, n_own + r, -1),
                         str_p.image_grad.reshape(U, n_own + r, -1))
    seconds["mechanism"] = time.perf_counter() - t

    t = time.perf_counter()
    sg = start_signal(model, key, units, nat_p.image_grad.reshape(U, k, -1), pairs=settings.start_pairs,
                      seed=settings.seed, batch_size=settings.batch_size)
    # the same, read before the layer's final elementwise stage (its ReLU) where it has one: a unit that is off
    # (exactly 0) at the start shows nothing of a trench in its pre-activation
    if final_stage(model, key) is not None:
        nat_pre = probe(model, key, top_images.reshape(U * k, *chw), u_t.repeat_interleave(k), image_grad=True,
                        batch_size=settings.batch_size, readout="pre-activation")
        sg_pre = start_signal(model, key, units, nat_pre.image_grad.reshape(U, k, -1), pairs=settings.start_pairs,
                              seed=settings.seed, batch_size=settings.batch_size, readout="pre-activation")
        sg_pre["natural_values"] = nat_pre.value.reshape(U, k)
    else:
        nan = torch.full((U,), float("nan"))
        sg_pre = {"gap": nan, "worst_scale": torch.zeros(U, dtype=torch.long), "std_values": nan[:, None],
                  "wide_values": nan[:, None, None].expand(U, len(WIDER_STARTS), 1).contiguous(),
                  "natural_grad_norm": nan, "natural_values": nan[:, None].expand(U, k).contiguous()}
    seconds["start"] = time.perf_counter() - t

    t = time.perf_counter()
    P, T = min(settings.path_starts, k), settings.path_points
    ts = torch.linspace(0, 1, T + 1).view(1, 1, T + 1, 1, 1, 1)
    per = max(1, settings.batch_size // (P * (T + 1)))  # units per probe batch: paths never all in memory
    jumps = []
    for c0 in range(0, U, per):
        starts = top_images[c0:c0 + per, :P]                              # (u, P, C, H, W)
        d = x_v[c0:c0 + per, None] - starts                                # (u, P, C, H, W)
        path = (starts[:, :, None] + ts * d[:, :, None]).clamp(0, 1)       # (u, P, T+1, C, H, W)
        n = len(starts)
        pp = probe(model, key, path.reshape(-1, *chw), u_t[c0:c0 + per].repeat_interleave(P * (T + 1)),
                   image_grad=True, batch_size=settings.batch_size)
        jumps.append(path_jump(pp.value.reshape(n, P, T + 1), pp.image_grad.reshape(n, P, T + 1, -1),
                               d.reshape(n, P, -1)))
    seconds["path"] = time.perf_counter() - t
    out = {"failed": failed.cpu(), "vis_value": vis_p.value.detach().cpu(),
           "path_jump": torch.cat(jumps).detach().cpu(), "strong": strong.cpu(),
           "worst_probe": probe_images[torch.arange(U), pa["worst"]].detach().float().cpu().contiguous()}
    out.update({f"ga.{name}": v.detach().cpu() for name, v in ga.items()})
    out.update({f"pa.{name}": v.detach().cpu() for name, v in pa.items()})
    out.update({f"sg.{name}": v.detach().cpu() for name, v in sg.items()})
    out.update({f"sgp.{name}": sg_pre[name].detach().cpu().clone()  # clone: the NaN fill shares one buffer
                for name in ("gap", "worst_scale", "std_values", "wide_values", "natural_grad_norm", "natural_values")})
    out.update({f"seconds.{name}": torch.tensor(v, dtype=torch.float64) for name, v in seconds.items()})
    return out


def start_signal(model, key: str, units, natural_image_grads: torch.Tensor, *, pairs: int, seed: int,
                 batch_size: int = 256, readout: str = "output") -> dict:
    """`start_gap` for `units` given their image gradients on their top natural images (U, k, D).

    One forward pass of the shared start images (`start_images`: `pairs`
    standard and `pairs` per wider scale, the same for every unit, so a unit's
    value does not depend on which chunk it is in) gives every unit's
    activation there. Returns the `start_gap` dict plus ``std_values`` (U, S),
    ``wide_values`` (U, W, S) and ``natural_grad_norm`` (U,), the evidence.
    `readout` as in `probe` ("pre-activation": the natural image gradients
    must be the pre-activation's too).
    """
    std, wide = start_images(tuple(model.input_shape), pairs=pairs, seed=seed)
    W, S = wide.shape[:2]
    acts = unit_activations(model, key, torch.cat([std, wide.flatten(0, 1)]), units, batch_size=batch_size,
                            readout=readout)  # (N, U)
    std_values, wide_values = acts[:S].T, acts[S:].T.reshape(len(units), W, S)
    distances = (wide - std[None]).flatten(2).norm(dim=2)                                          # (W, S)
    g = natural_image_grads.norm(dim=-1).median(dim=1).values                                      # (U,)
    out = start_gap(std_values, wide_values, distances, g)
    out.update(std_values=std_values.contiguous(), wide_values=wide_values.contiguous(), natural_grad_norm=g)
    return out


def score_signals(signals: dict) -> tuple[dict, torch.Tensor]:
    """({signal: evidence per unit}, score per unit) from {signal: value per unit} under the fixed THRESHOLDS."""
    ev = {name: evidence(torch.as_tensor(val, dtype=torch.float64), THRESHOLDS[name].threshold,
                         THRESHOLDS[name].width, THRESHOLDS[name].higher_is_suspicious)
          for name, val in signals.items()}
    return ev, torch.stack(list(ev.values())).amax(0)


def rescore(result: dict) -> dict:
    """An audit.json dict with score / flagged / fired / verdict recomputed from its stored signal values."""
    rows = result["units"]
    vals = {name: [float("nan") if r["signals"].get(name) is None or (name in UNDEFINED_WHERE_FAILED and
                                                                       r["signals"].get("visualization_failed"))
                   else r["signals"][name] for r in rows] for name in THRESHOLDS}
    ev, score = score_signals(vals)
    for i, r in enumerate(rows):
        r["score"] = round(float(score[i]), 6)
        r["flagged"] = bool(score[i] >= FLAG_AT)
        r["fired"] = [name for name in THRESHOLDS if float(ev[name][i]) >= FLAG_AT]
    flagged = [r["unit"] for r in rows if r["flagged"]]
    result["verdict"] = "suspicious" if flagged else "clean"
    result["evidence"].update(n_flagged=len(flagged), flagged_units=flagged,
                              flagged_by_signal={n: sum(n in r["fired"] for r in rows) for n in THRESHOLDS},
                              max_score=max(r["score"] for r in rows))
    result["thresholds"] = {name: asdict(s) for name, s in THRESHOLDS.items()}
    return result


def _probe_name(j: int, n_own: int, strong: torch.Tensor) -> str:
    """Which probe image gave the worst agreement, in words (own snapshot j, or the pool image of another unit)."""
    if j < n_own:
        return f"own probe image {j}"
    p = int(strong[j - n_own])
    return f"probe image {p % n_own} of the unit at index {p // n_own}" if n_own > 1 else f"visualization {p}"


def _num(v) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 6)
