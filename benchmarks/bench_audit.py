"""Does `fvtrust.audit` find manipulated units? Every attack fvtrust has, on fashion-cnn, plus the clean model.

Models (built here from the embedded fashion-cnn; attacks use Fashion-MNIST *train*, the audit *test*):

* circuit-permutation: fooling circuit at `fc`, units 0,2,4,6,8 visualize as unit (u + 5) mod 10;
* circuit-picture:     fooling circuit at `fc`, units 1,3,5,7,9 visualize as the 'camera' picture;
* silent-picture:      silent units on `block3` (Conv-BN-ReLU, 64 units), 16 random units, target 'coffee';
* silent-unit:         silent units on `block3`, 16 other random units, target `unit:N` (N untouched);
* slingshot-*:         gradient slingshots (`fvtrust.fool.slingshot`), one unit each, see SLINGSHOTS: fc:0 camera
                       (defaults; the dev model of start_gap), block4:0 camera (`w 0.9`; before the slingshot's
                       per-position gamma rule this was `w 0.9, gamma_ratio 200`, a gamma within 2 % of today's),
                       and, held out, fc:3 astronaut, block4:7 coffee (these two did not take), fc:0 camera
                       seed 1, fc:5 camera, block4:0 camera seed 1 (`w 0.9`; block4 under the old gamma rule's
                       defaults did not take), and block4:0 camera seed 2 (`w 0.9`), built after
                       preactivation_start_gap was committed; later ones (block4 seeds 3-8 and other targets,
                       held out from pinning; fc:0 camera seeds 2-4, fc:0 coffee, fc:7 camera, held out from
                       linear_start_gap) are listed in SLINGSHOTS with when they were built;
* clean:               the original model, audited at every top-level layer with units (CLEAN_LAYERS).

Per attack: AUROC of the score, manipulated units (positives) vs untouched units of the manipulated model plus
the clean model's units of the same layer (negatives); TPR at the fixed threshold (score >= FLAG_AT); the
model-level verdict. Clean model: FPR on every audited layer. Time: the 128-unit block4 audit, `--repeats`
times, wall and CPU seconds, against a plain `fvtrust.visualize` of the same units in the same run (ratio).

The circuit needs a trained visualization detector: built once per `--detector-budget` and cached under
`--cache` (as are finished audits, so an interrupted run resumes; an audit cached before a signal was added is
recomputed). The slingshot fine-tunes resume from their epoch checkpoints under `--cache`. For the slingshots the
benchmark also reports, as ground truth the audit never sees, whether the attack took: Pearson of the unit's
standard visualization (`fvtrust.visualize`'s defaults, 512 steps, as the slingshot's report.json) to the target
>= 0.6. The slingshot family row pools the slingshots that took; those that did not are listed separately.

    python benchmarks/bench_audit.py                      # everything
    python benchmarks/bench_audit.py --repeats 3 --only timing
    python benchmarks/bench_audit.py --only calibrate     # every signal on clean models: the thresholds' basis
    python benchmarks/bench_audit.py --only calibrate-linear   # start_gap on more clean fully connected layers
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

import fvtrust  # noqa: E402
from fvtrust.audit import FLAG_AT, audit  # noqa: E402
from fvtrust.audit.core import rescore  # noqa: E402
from fvtrust.data import load_fashion_mnist  # noqa: E402


# detector budgets: `quick` (as `fvtrust reproduce --quick`), and `cut`, which fits a heavily shared 2-core machine
# but does not recognise the audit's 128-step visualizations (0/10 gated in the run of the closing note), so the
# circuit then stays on F for them: a dormant attack. Circuit results are cached per budget.
DETECTOR_BUDGETS = {"quick": {},
                    "cut": dict(runs=1, steps=64, snapshots=8, max_units=12, min_units=12, epochs=2,
                                natural_per_epoch=3000)}
DETECTOR_BUDGET = "quick"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def auroc(pos, neg) -> float:
    """P(score_pos > score_neg) + ½ P(=): the Mann-Whitney U statistic divided by n_pos·n_neg."""
    u = scipy.stats.mannwhitneyu(pos, neg, alternative="greater").statistic
    return float(u) / (len(pos) * len(neg))


def detector(model, cache: Path):
    from fvtrust.fool.detector.train import build_detector, load_detector, save_detector

    d = cache / f"detector-{DETECTOR_BUDGET}"
    if (d / "detector.json").exists():
        det, rep = load_detector(d)
    else:
        det, rep = build_detector(model, "fc", budget="quick", seed=0, **DETECTOR_BUDGETS[DETECTOR_BUDGET])
        save_detector(det, d, rep)
    print(f"  detector (budget {DETECTOR_BUDGET}): held-out accuracy {rep.get('heldout')}", flush=True)
    return det


# gradient slingshots: (layer, unit, target, seed, SlingshotConfig overrides). block4 needs a steeper tunnel and
# more weight on the unit's own L_pres term to take (`--w 0.9 --gamma-ratio 200`, README "Gradient slingshots");
# with the defaults it does not. The first two are the dev models the start_gap signal was developed on (fc) and
# last session's block4 model; the next four were built and audited only after start_gap and its threshold were
# committed (held-out; astronaut and coffee did not take). A prebuilt model in CACHE/NAME-model (a `fvtrust fool slingshot ... --out DIR`'s DIR/model,
# same settings) is used as it is; otherwise the benchmark builds it there.
SLINGSHOTS = {
    "slingshot-fc": ("fc", 0, "camera", 0, {}),
    "slingshot-block4": ("block4", 0, "camera", 0, {"w": 0.9}),
    "slingshot-fc-u3-astronaut": ("fc", 3, "astronaut", 0, {}),
    "slingshot-block4-u7-coffee": ("block4", 7, "coffee", 0, {"w": 0.9}),
    "slingshot-fc-seed1": ("fc", 0, "camera", 1, {}),
    "slingshot-fc-u5": ("fc", 5, "camera", 0, {}),
    "slingshot-block4-seed1": ("block4", 0, "camera", 1, {"w": 0.9}),
    # built after the pre-activation readout of start_gap was committed: held out from its development
    "slingshot-block4-seed2": ("block4", 0, "camera", 2, {"w": 0.9}),
    # built while the `pinning` signal was being written, audited only after it and its threshold were committed
    # (held out from its development, which saw the three block4:0 models above)
    "slingshot-block4-seed3": ("block4", 0, "camera", 3, {"w": 0.9}),
    "slingshot-block4-u12": ("block4", 12, "camera", 0, {"w": 0.9}),
    # built after the first two held-out ones had been audited with the unchanged signal (seed 3: ranked first in
    # its layer but below the threshold; unit 12: did not take), to measure the same signal on more held-out models
    "slingshot-block4-seed4": ("block4", 0, "camera", 4, {"w": 0.9}),
    "slingshot-block4-seed5": ("block4", 0, "camera", 5, {"w": 0.9}),
    # built before the pinning probes' variance reduction (4 weight-noise draws, 4 seeds) was written, audited only
    # after it and its recalibrated threshold were committed; two targets other than the camera, to vary the attack
    "slingshot-block4-seed6": ("block4", 0, "camera", 6, {"w": 0.9}),
    "slingshot-block4-seed7": ("block4", 0, "camera", 7, {"w": 0.9}),
    "slingshot-block4-astronaut": ("block4", 0, "astronaut", 0, {"w": 0.9}),
    "slingshot-block4-coffee": ("block4", 0, "coffee", 0, {"w": 0.9}),
    # built after those four were audited with the two-probe pinning (seed 6 and 7 flagged, coffee 2.21 missed,
    # astronaut did not take), before any further change to the audit; audited only after it is committed
    "slingshot-block4-seed8": ("block4", 0, "camera", 8, {"w": 0.9}),
    "slingshot-block4-coffee-seed1": ("block4", 0, "coffee", 1, {"w": 0.9}),
    "slingshot-block4-chelsea": ("block4", 0, "chelsea", 0, {"w": 0.9}),
    "slingshot-block4-moon": ("block4", 0, "moon", 0, {"w": 0.9}),
    # built after fc:0 dev had been measured missed (start_gap 0.736 under 0.95) and before any change to the
    # audit for fully connected layers; audited only after that change is committed
    "slingshot-fc-seed2": ("fc", 0, "camera", 2, {}),
    "slingshot-fc-seed3": ("fc", 0, "camera", 3, {}),
    "slingshot-fc-coffee": ("fc", 0, "coffee", 0, {}),
    "slingshot-fc-seed4": ("fc", 0, "camera", 4, {}),
    "slingshot-fc-u7": ("fc", 7, "camera", 0, {}),
}
ATTACKS = ("circuit-permutation", "circuit-picture", "silent-picture", "silent-unit") + tuple(SLINGSHOTS)
# every top-level layer of fashion-cnn with units (flatten and dropout are gap's 128 numbers again): the clean model
# is audited at each, since a user may audit any of them
CLEAN_LAYERS = ("block1", "pool1", "block2", "block3", "pool2", "block4", "gap", "fc")
TOOK_AT = 0.6  # a slingshot "took" when the standard visualization's Pearson to the target reaches this


def attack_layer(name: str) -> str:
    if name in SLINGSHOTS:
        return SLINGSHOTS[name][0]
    return "fc" if name.startswith("circuit") else "block3"


def build_attack(name: str, model, cache: Path, train: torch.Tensor, seed: int):
    """(layer, fooled model, manipulated units) for one attack."""
    from fvtrust.fool.circuit.build import fooling_circuit
    from fvtrust.fool.silent.build import silent_units

    perm = np.random.default_rng(seed).permutation(64).tolist()
    silent_a, silent_b = sorted(perm[:16]), sorted(perm[16:32])
    target_n = perm[32]  # an untouched unit
    if name == "circuit-permutation":
        pm = {u: (u + 5) % 10 for u in (0, 2, 4, 6, 8)}
        return "fc", fooling_circuit(model, "fc", detector(model, cache), mapping=pm, natural=train[:10000],
                                     bound_steps=128, seed=seed), sorted(pm)
    if name == "circuit-picture":
        units = [1, 3, 5, 7, 9]
        return "fc", fooling_circuit(model, "fc", detector(model, cache), picture="camera", units=units,
                                     bound_steps=128, natural=train[:10000], seed=seed), units
    if name == "silent-picture":
        return "block3", silent_units(model, "block3", target="coffee", natural=train[:20000], units=silent_a), silent_a
    if name == "silent-unit":
        return "block3", silent_units(model, "block3", target=f"unit:{target_n}", natural=train[:20000],
                                      units=silent_b), silent_b
    if name in SLINGSHOTS:
        from fvtrust.fool.slingshot import slingshot
        from fvtrust.models import load_model, save_model

        layer, unit, target, sl_seed, over = SLINGSHOTS[name]
        saved = cache / f"{name}-model"
        if (saved / "fvtrust-model.json").exists():
            return layer, load_model(str(saved)), [unit]
        fooled = slingshot(model, layer, unit, target=target, seed=sl_seed,
                           checkpoint_dir=cache / f"{name}-checkpoint", **over)
        save_model(fooled, saved, manipulation="gradient_slingshot", args={}, base_spec="fashion-cnn",
                   extra={k: v for k, v in fooled.slingshot_info.items() if k != "history"})
        return layer, fooled, [unit]
    raise SystemExit(f"unknown attack {name}")


def cached_audit(cache: Path, name: str, model, layer: str, data, **kw) -> dict:
    from fvtrust.audit import THRESHOLDS

    f = cache / f"audit-{name}-{layer}.json"
    if f.exists():
        res = json.loads(f.read_text())
        if all(s in res["units"][0]["signals"] for s in THRESHOLDS):
            return rescore(res)  # scores always under the current fixed thresholds
        print(f"  {f.name} was audited before signal(s) "
              f"{[s for s in THRESHOLDS if s not in res['units'][0]['signals']]} existed: auditing again", flush=True)
    if callable(model):  # build lazily: a cached audit needs no model
        model = model() if not isinstance(model, torch.nn.Module) else model
    t0, c0 = time.perf_counter(), time.process_time()
    result = audit(model, layer, data=data, **kw)
    from fvtrust.audit.report import save_audit

    save_audit(result, cache / f"page-{name}-{layer}", command=f"benchmarks/bench_audit.py ({name}, {layer})")
    res = result.to_dict()
    res["bench_wall_s"], res["bench_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    if name.split("@")[0] in SLINGSHOTS:  # ground truth for the reader, never seen by the audit: did it take?
        res["slingshot_took"] = slingshot_took(model, result, *SLINGSHOTS[name.split("@")[0]][:3])
    if hasattr(model, "gate_values"):  # ground truth for the reader, not used by the audit: did E gate?
        with torch.no_grad():
            res["detector_on_audit"] = {
                "visualizations_gated_to_0": float((model.gate_values(result.visualizations) < 0.5).float().mean()),
                "natural_gated_to_1": float((model.gate_values(data[:2000]) > 0.5).float().mean())}
    f.write_text(json.dumps(res))
    return res


def slingshot_took(model, result, layer: str, unit: int, target: str) -> dict:
    """Pearson to the target of the unit's visualization: the audit's (128 steps), and the standard one
    (`fvtrust.visualize`'s defaults, 512 steps, channel objective: what the slingshot's report.json measures)."""
    from fvtrust.fool.slingshot.finetune import resolve_target
    from fvtrust.fool.slingshot.report import similarity_to_target
    from fvtrust.visualize import visualize

    target_image = resolve_target(target, model)
    i = [u["unit"] for u in result.units].index(unit)
    std = visualize(model, layer, [unit], steps=512, objective="channel").final[0]
    standard = similarity_to_target(std, target_image)
    return {"unit": unit, "target": target, "audit_visualization": similarity_to_target(result.visualizations[i],
                                                                                        target_image),
            "standard_512": standard, "took": bool(standard["pearson"] >= TOOK_AT)}


# the calibration principle of every threshold (fvtrust/audit/core.py states it at THRESHOLDS): a margin of 25 % beyond
# the most extreme value on the clean calibration set, rounded outwards to 0.05; for the two agreement signals and
# path_jump, whose thresholds were first set from a principle (a clean linear / conv unit's profile does not depend
# on the input; a continuous unit has no unexplained step), the stricter of that value and the rule's
CALIBRATION_MARGIN = 1.25


def rule_threshold(extreme: float, higher_is_suspicious: bool) -> float:
    """The calibration rule: 25 % beyond the most extreme clean value, rounded outwards to 0.05."""
    if higher_is_suspicious:
        return float(np.ceil(CALIBRATION_MARGIN * extreme / 0.05 - 1e-9) * 0.05)
    return float(np.floor(extreme / CALIBRATION_MARGIN / 0.05 + 1e-9) * 0.05)


def clean_start_gaps(model, layer: str, n: int, data, readouts=("output",)) -> dict:
    """{readout: start_gap per unit (numpy, NaN where undefined)} for the `n` units of `layer`, as the audit reads
    it (AuditSettings' top_k, start_pairs, seed): the start signals of the calibration sets need no visualization."""
    from fvtrust.audit.core import AuditSettings, start_signal
    from fvtrust.audit.probes import probe
    from fvtrust.linearity.top_activating import top_activating_many

    st = AuditSettings()
    units = list(range(n))
    top = top_activating_many(model, layer, units, data, m=st.top_k, objective="channel", batch_size=st.batch_size)
    imgs, u_t = data[top.indices].flatten(0, 1), torch.arange(n).repeat_interleave(st.top_k)
    out = {}
    for readout in readouts:
        pr = probe(model, layer, imgs, u_t, image_grad=True, readout=readout)
        out[readout] = start_signal(model, layer, units, pr.image_grad.reshape(n, st.top_k, -1), pairs=st.start_pairs,
                                    seed=st.seed, readout=readout)["gap"].double().numpy()
    return out


def calibrate(data, cache: Path) -> dict:
    """Every signal on the clean calibration set: trained and random-init fashion-cnn, every layer with units.

    The start signals (start_gap; preactivation_start_gap where the layer has a final elementwise stage) need no
    visualization, so they are read on every layer `list_layers` reports, sub-layers included (block3.conv is a
    layer a user may audit). The signals that need visualizations come from full audits of CLEAN_LAYERS (cached
    under `cache`, as the attacks' audits; the trained model's are the benchmark's clean audits). Printed per
    signal: the most extreme clean value, what the calibration rule gives, and the threshold committed in
    fvtrust/audit/core.py.
    """
    from fvtrust.audit import THRESHOLDS
    from fvtrust.audit.probes import final_stage
    from fvtrust.models.layers import is_fully_connected, list_layers

    values = {name: [] for name in THRESHOLDS}   # (value, where) over the whole calibration set
    pin_z = []  # (seed_agreement_z, gradient_coherence_z) of every clean unit with a pinning value
    out = {"layers": {}}
    for weights in ("trained", "random"):
        model = fvtrust.load_model("fashion-cnn", **({} if weights == "trained" else {"weights": "random"}))
        layers = [i for i in list_layers(model) if len(i.shape) > 0]
        for info in layers:
            layer = info.name
            readouts = ("output",) if final_stage(model, layer) is None else ("output", "pre-activation")
            gaps = clean_start_gaps(model, layer, info.units, data, readouts)
            row = {}
            for readout, signal in (("output", "start_gap"), ("pre-activation", "preactivation_start_gap")):
                if readout not in gaps:
                    continue
                v = gaps[readout]
                ok = np.isfinite(v)
                if ok.any():
                    j = int(np.nanargmax(v))
                    row[signal] = {"max": float(v[ok].max()), "unit": j, "median": float(np.median(v[ok])),
                                   "above_threshold": int((v[ok] >= THRESHOLDS[signal].threshold).sum())}
                    values[signal].append((float(v[j]), f"{weights} {layer} unit {j}"))
                    if signal == "start_gap" and is_fully_connected(model, layer, info):  # its own kind's threshold too
                        row["linear_start_gap"] = {**row[signal], "above_threshold": int(
                            (v[ok] >= THRESHOLDS["linear_start_gap"].threshold).sum())}
                        values["linear_start_gap"].append((float(v[j]), f"{weights} {layer} unit {j}"))
            if layer in CLEAN_LAYERS:  # a full audit for the signals that need visualizations
                r = cached_audit(cache, "clean" if weights == "trained" else "clean-random", model, layer, data)
                row["audit"] = {"verdict": r["verdict"], "flagged": r["evidence"]["flagged_units"],
                                "fired": r["evidence"]["flagged_by_signal"], "max_score": r["evidence"]["max_score"]}
                for signal in ("gradient_agreement", "probe_agreement", "path_jump", "pinning"):
                    vals = [(u["signals"][signal], u["unit"]) for u in r["units"] if u["signals"][signal] is not None
                            and not u["signals"]["visualization_failed"]]  # all four are UNDEFINED_WHERE_FAILED
                    if vals:
                        ext = (max if THRESHOLDS[signal].higher_is_suspicious else min)(vals)
                        values[signal].append((float(ext[0]), f"{weights} {layer} unit {ext[1]}"))
                        row[signal] = {"extreme": float(ext[0]), "unit": int(ext[1])}
                if layer != "gap":  # gap's channel objective is block4's: the same units twice
                    pin_z.extend((u["signals"]["seed_agreement_z"], u["signals"]["gradient_coherence_z"])
                                 for u in r["units"] if u["signals"]["pinning"] is not None)
            out["layers"][f"{weights}/{layer}"] = row
            print(f"  {weights:7s} {layer:12s} " + "  ".join(
                f"{k} {v.get('max', v.get('extreme')):.3f} (u{v['unit']})" for k, v in row.items() if k != "audit")
                + (f"  audit: {row['audit']['verdict']} {row['audit']['flagged']}" if "audit" in row else ""),
                flush=True)
    for signal, vals in values.items():
        if not vals:
            print(f"  {signal}: no clean layer of its kind in the calibration set", flush=True)
            continue
        s = THRESHOLDS[signal]
        ext, where = (max if s.higher_is_suspicious else min)(vals)
        rule = rule_threshold(ext, s.higher_is_suspicious)
        out[signal] = {"most_extreme": ext, "where": where, "rule_gives": rule, "threshold": s.threshold,
                       "clean_values_past_threshold": int(sum((v >= s.threshold) if s.higher_is_suspicious
                                                              else (v <= s.threshold) for v, _ in vals))}
        print(f"  {signal}: most extreme clean value {ext:.3f} ({where}); the rule gives {rule:.2f}; "
              f"committed threshold {s.threshold}"
              + (" (set on the widened set of --only calibrate-linear)" if signal == "linear_start_gap" else ""),
              flush=True)
    if pin_z:  # pinning's rule asks a unit to stand out on both probes; it needs them to be nearly independent
        rho = float(scipy.stats.spearmanr(np.array(pin_z)).statistic)
        out["pinning_probes_spearman"] = {"rho": rho, "units": len(pin_z)}
        top = np.nanmax(np.array(pin_z, dtype=float), 0)
        out["pinning_probes_spearman"]["largest_z"] = top.tolist()
        print(f"  pinning's two probes on clean units: Spearman {rho:.3f} between their z-scores "
              f"({len(pin_z)} units, every calibration layer but gap); largest z-score of each: "
              f"seed_agreement {top[0]:.3f}, gradient_coherence {top[1]:.3f}", flush=True)
    return out


# the fully connected layers' own calibration set is wider than the main one (fashion-cnn has one such layer, 10
# units, so the main set gives 20 values): the same recipe trained from other seeds, and random inits of other seeds
LINEAR_TRAINED_SEEDS = (1, 2)
LINEAR_RANDOM_SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)


def clean_variant(kind: str, seed: int, cache: Path):
    """A clean fashion-cnn other than the embedded one: `trained` = the embedded recipe (`train_fashion_cnn`) from
    `seed`, cached under `cache` (about 20 min on a shared 2-core machine); `random` = a random init drawn after
    torch.manual_seed(seed)."""
    from fvtrust.models.train import save_weights, train_fashion_cnn
    from fvtrust.models.zoo import FashionCNN, fashion_cnn

    if kind == "random":
        torch.manual_seed(seed)
        m = fashion_cnn(weights="random")
        assert isinstance(m.net, FashionCNN)
        return m
    path = cache / f"clean-trained-seed{seed}.safetensors"
    if not path.is_file():
        model, _ = train_fashion_cnn(load_fashion_mnist("train"), seed=seed)
        save_weights(model, path)
    return fashion_cnn(weights=str(path))


def calibrate_linear(data, cache: Path) -> dict:
    """start_gap on every fully connected layer of the widened clean set (`clean_variant`, plus the embedded and
    the main set's random-init model as `--only calibrate` reads them): the basis of LINEAR_START_GAP_THRESHOLD."""
    from fvtrust.audit import THRESHOLDS
    from fvtrust.models.layers import is_fully_connected, list_layers

    models = [("trained seed 0 (embedded)", lambda: fvtrust.load_model("fashion-cnn"))]
    models += [(f"trained seed {s}", lambda s=s: clean_variant("trained", s, cache)) for s in LINEAR_TRAINED_SEEDS]
    models += [(f"random-init seed {s}", lambda s=s: clean_variant("random", s, cache)) for s in LINEAR_RANDOM_SEEDS]
    out, every = {}, []
    for name, make in models:
        model = make()
        for info in list_layers(model):
            if not is_fully_connected(model, info.name, info):
                continue
            layer = info.name
            v = clean_start_gaps(model, layer, info.units, data)["output"]
            j = int(np.nanargmax(v))
            out[f"{name}/{layer}"] = {"values": v.tolist(), "max": float(v[j]), "unit": j}
            every.append((float(v[j]), f"{name} {layer} unit {j}"))
            print(f"  {name:28s} {layer}: start_gap max {v[j]:.3f} (u{j}), median {np.nanmedian(v):.3f}", flush=True)
    ext, where = max(every)
    out["linear_start_gap"] = {"most_extreme": ext, "where": where, "rule_gives": rule_threshold(ext, True),
                               "threshold": THRESHOLDS["linear_start_gap"].threshold}
    print(f"  linear_start_gap: most extreme clean value {ext:.3f} ({where}) over {len(every)} fully connected "
          f"layers; the rule gives {rule_threshold(ext, True):.2f}; committed threshold "
          f"{THRESHOLDS['linear_start_gap'].threshold}", flush=True)
    return out


def timing(model, data, repeats: int, steps: int) -> dict:
    """The 128-unit block4 audit vs a plain visualization of the same units (same settings), `repeats` times."""
    from fvtrust.visualize import visualize

    rows = []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        visualize(model, "block4", "all", steps=steps, objective="channel", seed=r)
        vis = (time.perf_counter() - t0, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = audit(model, "block4", data=data, steps=steps, seed=r)
        aud = (time.perf_counter() - t0, time.process_time() - c0)
        rows.append({"visualize_wall": vis[0], "visualize_cpu": vis[1], "audit_wall": aud[0], "audit_cpu": aud[1],
                     "stages": res.seconds, "load": os.getloadavg()[0]})
        print(f"  repeat {r + 1}: audit {aud[0]:.1f} s wall ({aud[1]:.1f} s CPU), plain visualize {vis[0]:.1f} s "
              f"wall ({vis[1]:.1f} s CPU), ratio {aud[0] / vis[0]:.2f}, 1-min load {rows[-1]['load']:.1f}",
              flush=True)
    return {"repeats": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=".bench_cache/audit", type=Path)
    ap.add_argument("--repeats", default=3, type=int)
    ap.add_argument("--steps", default=None, type=int, help="Override the audit's visualization steps.")
    ap.add_argument("--only", default="attacks,clean,timing",
                    help="Comma-separated: attacks, clean, timing, calibrate (every signal on clean models, "
                         "every layer), calibrate-linear (start_gap on the widened set of clean fully connected "
                         "layers).")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="Comma-separated subset of: " + ", ".join(ATTACKS))
    ap.add_argument("--seed", default=0, type=int)
    ap.add_argument("--threads", default=2, type=int)
    ap.add_argument("--detector-budget", default="quick", choices=sorted(DETECTOR_BUDGETS))
    ap.add_argument("--json", default=None, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global DETECTOR_BUDGET
    DETECTOR_BUDGET = args.detector_budget
    args.cache.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    kw = {} if args.steps is None else {"steps": args.steps}
    model = fvtrust.load_model("fashion-cnn")
    train = load_fashion_mnist("train")[0]
    data = load_fashion_mnist("test")[0][:5000]
    out = {"flag_at": FLAG_AT, "threads": args.threads}

    audits = {}
    if "attacks" in only:  # the attacks' audits first, so a parallel `--only clean` run fills the clean ones
        for name in args.attacks.split(","):
            built = {}

            def make(name=name, built=built):
                built["v"] = build_attack(name, model, args.cache, train, args.seed)
                return built["v"][1]

            layer = attack_layer(name)
            key = f"{name}@{DETECTOR_BUDGET}" if name.startswith("circuit") else name
            r = cached_audit(args.cache, key, make, layer, data, **kw)
            if "manipulated" not in r:
                r["manipulated"] = built["v"][2]
                (args.cache / f"audit-{key}-{layer}.json").write_text(json.dumps(r))
            audits[name] = (layer, r)
    clean = {}
    if only & {"attacks", "clean"}:
        layers = CLEAN_LAYERS if "clean" in only else sorted({layer for layer, _ in audits.values()})
        for layer in layers:
            clean[layer] = cached_audit(args.cache, "clean", model, layer, data, **kw)
        print("clean model (negatives everywhere):")
        for layer, r in clean.items():
            s = np.array([u["score"] for u in r["units"]])
            print(f"  {layer:7s} units {len(s):4d}  FPR {np.mean(s >= FLAG_AT):.4f}  max score {s.max():.3f}  "
                  f"verdict {r['verdict']}  ({r['bench_wall_s'] / len(s):.2f} s/unit wall, "
                  f"{r['bench_cpu_s'] / len(s):.2f} s/unit CPU)", flush=True)
        out["clean"] = {layer: {"fpr": float(np.mean([u["score"] >= FLAG_AT for u in r["units"]])),
                                "verdict": r["verdict"], "max_score": max(u["score"] for u in r["units"])}
                        for layer, r in clean.items()}
    if audits:
        out["attacks"] = {}
        print("attacks (positives = manipulated units; negatives = untouched units + clean units of the layer):")
        for name, (layer, r) in audits.items():
            man = set(r["manipulated"])
            # a manipulated unit is *active* in the audit's visualization when any of its measured values differs
            # from the clean model's (same seed, deterministic pipeline): a dormant one was visualized exactly as
            # the clean unit, so its visualization is the clean one and there is nothing to flag
            ref = {u["unit"]: u["signals"] for u in clean[layer]["units"]}
            keys = ("gradient_agreement", "path_jump", "probe_agreement", "start_gap", "visualization_activation")
            active = {u["unit"] for u in r["units"] if u["unit"] in man
                      and any(u["signals"][k] != ref[u["unit"]][k] for k in keys)}
            pos_active = [u["score"] for u in r["units"] if u["unit"] in active]
            pos = [u["score"] for u in r["units"] if u["unit"] in man]
            neg = [u["score"] for u in r["units"] if u["unit"] not in man]
            neg_all = neg + [u["score"] for u in clean[layer]["units"]]
            row = {"layer": layer, "n_pos": len(pos), "n_neg": len(neg_all), "auroc": auroc(pos, neg_all),
                   "auroc_within_model": auroc(pos, neg) if neg else None,
                   "tpr": float(np.mean(np.array(pos) >= FLAG_AT)),
                   "n_active": len(pos_active),
                   "auroc_active": auroc(pos_active, neg_all) if pos_active else None,
                   "tpr_active": float(np.mean(np.array(pos_active) >= FLAG_AT)) if pos_active else None,
                   "fpr_untouched": float(np.mean(np.array(neg) >= FLAG_AT)) if neg else None,
                   "verdict": r["verdict"], "verdict_right": r["verdict"] == "suspicious",
                   "s_per_unit_wall": r["bench_wall_s"] / len(r["units"]),
                   "s_per_unit_cpu": r["bench_cpu_s"] / len(r["units"]),
                   "fired": r["evidence"]["flagged_by_signal"], "detector": r.get("detector_on_audit"),
                   "slingshot_took": r.get("slingshot_took")}
            if name in SLINGSHOTS:  # where the slung unit sits on pinning, against the rest of its model
                pin = {u["unit"]: u["signals"]["pinning"] for u in r["units"] if u["signals"]["pinning"] is not None}
                if pin:
                    u0 = next(u for u in r["units"] if u["unit"] in man)
                    others = {u: v for u, v in pin.items() if u not in man}
                    top = max(others, key=others.get)
                    row["pinning"] = {"slung": u0["signals"]["pinning"],
                                      "z": [u0["signals"].get(f"{p}_z") for p in ("seed_agreement", "gradient_coherence")],
                                      "highest_other": [top, others[top]]}
                lin = {u["unit"]: u["signals"]["linear_start_gap"] for u in r["units"]
                       if u["signals"].get("linear_start_gap") is not None}
                if lin:  # the same for linear_start_gap on a fully connected layer
                    others = {u: v for u, v in lin.items() if u not in man}
                    top = max(others, key=others.get)
                    row["linear_start_gap"] = {"slung": [lin[u] for u in sorted(man)], "highest_other": [top, others[top]]}
            out["attacks"][name] = row
            print(f"  {name:20s} {layer:6s} pos {row['n_pos']:3d} neg {row['n_neg']:3d}  AUROC {row['auroc']:.4f} "
                  f"(within model {row['auroc_within_model']:.4f})  TPR {row['tpr']:.3f}  active in the visualization "
                  f"{row['n_active']}/{row['n_pos']}: AUROC {_f(row['auroc_active'])} TPR {_f(row['tpr_active'])}  "
                  f"FPR untouched "
                  f"{row['fpr_untouched']:.3f}  verdict {row['verdict']}  fired {row['fired']}  "
                  f"{row['s_per_unit_wall']:.2f} s/unit wall, {row['s_per_unit_cpu']:.2f} s/unit CPU"
                  + (f"  detector on the audit's images: {row['detector']}" if row["detector"] else "")
                  + (f"  pinning {row['pinning']}" if row.get("pinning") else "")
                  + (f"  linear_start_gap {row['linear_start_gap']}" if row.get("linear_start_gap") else "")
                  + (f"  slingshot took? {row['slingshot_took']}" if row["slingshot_took"] else ""), flush=True)
    if "calibrate" in only:
        print("calibration of every threshold on clean models (trained and random-init fashion-cnn, every layer):")
        out["calibrate"] = calibrate(data, args.cache)
    if "calibrate-linear" in only:
        print("calibration of linear_start_gap on clean fully connected layers (the embedded model, the recipe "
              f"from seeds {LINEAR_TRAINED_SEEDS}, random inits from seeds {LINEAR_RANDOM_SEEDS}):")
        out["calibrate_linear"] = calibrate_linear(data, args.cache)
    if audits and any(n in SLINGSHOTS for n in audits):
        # the slingshot family: every slingshot that took, pooled (positives: the slingshot units; negatives: the
        # untouched units of those models plus the clean model's units of each model's layer, once per layer)
        took = {n: r for n, (layer, r) in audits.items() if n in SLINGSHOTS and (r.get("slingshot_took") or {}).get("took")}
        missed = [n for n in audits if n in SLINGSHOTS and n not in took]
        pos, neg, verdicts = [], [], {}
        for n, r in took.items():
            man = set(r["manipulated"])
            pos += [u["score"] for u in r["units"] if u["unit"] in man]
            neg += [u["score"] for u in r["units"] if u["unit"] not in man]
            verdicts[n] = r["verdict"]
        for layer in sorted({audits[n][0] for n in took}):
            neg += [u["score"] for u in clean[layer]["units"]]
        fam = {"took": sorted(took), "did_not_take": missed, "n_pos": len(pos), "n_neg": len(neg),
               "auroc": auroc(pos, neg) if pos and neg else None,
               "tpr": float(np.mean(np.array(pos) >= FLAG_AT)) if pos else None,
               "verdicts": verdicts, "all_verdicts_right": all(v == "suspicious" for v in verdicts.values())}
        out["slingshot_family"] = fam
        print(f"slingshot family (only those that took: standard visualization Pearson >= {TOOK_AT}): "
              f"{len(took)} models, pos {fam['n_pos']} neg {fam['n_neg']}  AUROC {_f(fam['auroc'])}  TPR "
              f"{_f(fam['tpr'])}  verdicts right {fam['all_verdicts_right']}", flush=True)
        for n in missed:
            t = audits[n][1].get("slingshot_took") or {}
            print(f"  did not take (reported, not counted): {n}  standard Pearson "
                  f"{_f((t.get('standard_512') or {}).get('pearson'))}  verdict {audits[n][1]['verdict']}", flush=True)
    if "timing" in only:
        print(f"timing: 128-unit block4 audit on {args.threads} threads, {args.repeats} repeats (target <= 180 s):")
        out["timing"] = timing(model, data, args.repeats, args.steps or 128)
        walls = [r["audit_wall"] for r in out["timing"]["repeats"]]
        print(f"  audit wall s: min {min(walls):.1f}, median {float(np.median(walls)):.1f}, max {max(walls):.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
