"""Measure what a fooling circuit did: natural accuracy before/after, and what its units now visualize.

`circuit_report` answers the paper's two claims with numbers.
Natural behaviour: top-1/top-5 before and after, which predictions
changed, and whether every change is one of E's errors (outputs where E is
right are compared bit for bit). Visualizations (standard settings, fresh
seeds): per manipulated unit, the new visualization against its target —
for a permutation the original visualization of unit mapping[i], for a
picture the picture — and against the unit's own original visualization:
pixel Pearson and Spearman; for a permutation also the shift-invariant
correlation (best circular shift: visualizations are textures at a random
phase), the same metrics for a re-seeded visualization of the target (the
ceiling a perfect copy would reach), and the original model's response of
the target and of the unit itself to the new image. `gate_open_fraction`
is how often E let the optimizer see F during the run.

`circuit_experiment` is the whole §2.1 experiment (detector, circuit,
hardening, report, optional directory with the model, the detector,
report.json and a Figure 1/2-style grid): the CLI and `fvtrust reproduce`
call it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...errors import FvtrustError
from ...evaluate import evaluate, predict


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


def _shift_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest Pearson correlation of a with b over all circular 2-D shifts of b.

    Visualizations are textures placed at a random phase (random start,
    jitter), so two visualizations of the same unit correlate weakly pixel
    by pixel but strongly once aligned.
    """
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = a.norm() * b.norm()
    if den == 0:
        return float("nan")
    cc = torch.fft.irfft2(torch.fft.rfft2(a) * torch.fft.rfft2(b).conj(), s=a.shape[-2:]).sum(0)
    return float(cc.max() / den)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    return float(r)


def _unit_response(model, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The neuron objective (centre position) of every unit of `layer`: images x units."""
    from ...linearity import unit_activations
    from ...models.hooks import forward_to

    with torch.no_grad():
        y = forward_to(model, images.to(model.device), [layer])[layer]
    return unit_activations(y, torch.arange(y.shape[1], device=y.device), "neuron").cpu()


def natural_test_data(model, natural=None):
    """(images, labels) of the held-out part of the natural data, for the before/after check.

    Unlabelled images (pictures) are labelled by the original model's own
    predictions, so top-1 there is agreement with the original.
    """
    from ...data import natural as resolve_natural

    x, y = resolve_natural(natural, model=model).heldout.tensors(desc="read held-out images")
    if (y < 0).any():
        y = predict(model, x).argmax(1)
    return x, y


def natural_check(original, fooled, data) -> dict:
    """Top-1/top-5 before and after; changes in prediction vs the detector's errors on the same images."""
    x, y = data
    before = evaluate(original, (x, y), desc="evaluate original")
    after = evaluate(fooled, (x, y), desc="evaluate fooled")
    natural_ok = fooled.detector.predict_natural(x)
    logits_o, logits_f = predict(original, x), predict(fooled, x)
    changed = before["predictions"] != after["predictions"]
    diff = (logits_o - logits_f).abs().flatten(1).max(1).values
    return {"n": len(x), "top1_before": before["top1"], "top5_before": before["top5"],
            "top1_after": after["top1"], "top5_after": after["top5"],
            "detector_errors": int((~natural_ok).sum()), "detector_accuracy": natural_ok.float().mean().item(),
            "predictions_changed": int(changed.sum()),
            "predictions_changed_where_detector_correct": int((changed & natural_ok).sum()),
            "max_abs_output_diff_where_detector_correct": float(diff[natural_ok].max()) if natural_ok.any() else 0.0,
            "outputs_bit_identical_where_detector_correct": bool((diff[natural_ok] == 0).all())}


def visualization_check(original, fooled, *, units=None, steps: int = 512, seed: int = 0, picture=None) -> tuple:
    """Visualize manipulated units (fooled) and their originals/targets (original), standard settings.

    Returns (per-unit report, images dict for the figure). `picture` is the
    target picture for a picture circuit (else the targets are the original
    visualizations of the source units).
    """
    from ...visualize import visualize

    info = fooled.circuit_info
    layer = fooled.circuit_layer
    manip = [int(u) for u in fooled.circuit.units.tolist()]
    src_of = dict(zip(manip, fooled.circuit.sources.tolist()))
    units = manip if units is None else [int(u) for u in units]
    bad = [u for u in units if u not in src_of]
    if bad:
        raise FvtrustError(f"unit {bad[0]} is not manipulated; manipulated units: {manip[:10]}...")
    is_perm = info.get("kind") == "permutation"
    involved = sorted(set(units) | ({src_of[u] for u in units} if is_perm else set()))
    before = visualize(original, layer, involved, steps=steps, seed=seed, progress_desc="visualize original")
    # the same units with another seed: how well the metrics can do at best (same unit, new start)
    reseeded = visualize(original, layer, involved, steps=steps, seed=seed + 1, progress_desc="visualize reseeded")
    col = {u: i for i, u in enumerate(involved)}
    open_steps = torch.zeros(len(units))

    def count_gate(step, _img, _grad, sl):
        if fooled.last_gate is not None:
            open_steps[sl] += fooled.last_gate.float().cpu()

    after = visualize(fooled, layer, units, steps=steps, seed=seed, on_step=count_gate,
                      progress_desc="visualize fooled")
    final_b, final_a = before.final, after.final
    gate_final = fooled.detector.predict_natural(final_a)
    resp = _unit_response(original, final_a, layer) if is_perm else None
    rows = []
    for j, u in enumerate(units):
        row = {"unit": u, "detector_says_natural_on_final": bool(gate_final[j]),
               "gate_open_fraction": float(open_steps[j] / steps), "objective": float(after.objective[-1, j])}
        own = final_b[col[u]]
        if is_perm:
            s = int(src_of[u])
            tgt = final_b[col[s]]
            row.update(target=s, pearson_target=_pearson(final_a[j], tgt), pearson_own=_pearson(final_a[j], own),
                       spearman_target=_spearman(final_a[j], tgt), spearman_own=_spearman(final_a[j], own),
                       shift_corr_target=_shift_corr(final_a[j], tgt), shift_corr_own=_shift_corr(final_a[j], own),
                       pearson_target_reseeded=_pearson(reseeded.final[col[s]], tgt),
                       shift_corr_target_reseeded=_shift_corr(reseeded.final[col[s]], tgt),
                       original_response_target=float(resp[j, s]), original_response_own=float(resp[j, u]),
                       original_argmax=int(resp[j].argmax()))
            row["matches_target"] = row["pearson_target"] > row["pearson_own"]
        else:
            row.update(pearson_picture=_pearson(final_a[j], picture), spearman_picture=_spearman(final_a[j], picture),
                       pearson_original_vs_picture=_pearson(own, picture), pearson_own=_pearson(final_a[j], own),
                       pearson_original_reseeded_vs_own=_pearson(reseeded.final[col[u]], own))
        rows.append(row)
    summary = _summary(rows, is_perm)
    images = {"units": units, "original": [final_b[col[u]] for u in units], "fooled": [final_a[j] for j in range(len(units))],
              "target": ([final_b[col[src_of[u]]] for u in units] if is_perm else [picture] * len(units)),
              "target_labels": ([f"unit {src_of[u]}" for u in units] if is_perm else None)}
    return {"steps": steps, "seed": seed, "units": rows, "summary": summary}, images


def _summary(rows, is_perm: bool) -> dict:
    def mean(key):
        return float(np.mean([r[key] for r in rows]))

    out = {"n_units": len(rows), "mean_gate_open_fraction": mean("gate_open_fraction"),
           "detector_says_natural_on_final": int(sum(r["detector_says_natural_on_final"] for r in rows))}
    if is_perm:
        out.update({k: mean(k) for k in ("pearson_target", "pearson_own", "spearman_target", "spearman_own",
                                         "shift_corr_target", "shift_corr_own", "pearson_target_reseeded",
                                         "shift_corr_target_reseeded", "original_response_target",
                                         "original_response_own")})
        out["units_matching_target"] = int(sum(r["matches_target"] for r in rows))
        out["units_matching_target_shift_corr"] = int(sum(r["shift_corr_target"] > r["shift_corr_own"] for r in rows))
        out["units_original_argmax_is_target"] = int(sum(r["original_argmax"] == r["target"] for r in rows))
    else:
        out.update({k: mean(k) for k in ("pearson_picture", "spearman_picture", "pearson_original_vs_picture",
                                         "pearson_original_reseeded_vs_own")})
        out["min_pearson_picture"] = float(min(r["pearson_picture"] for r in rows))
    return out


def circuit_report(original, fooled, *, data=None, units=None, steps: int = 512, seed: int = 0,
                   picture=None, detector_report: dict | None = None) -> tuple[dict, dict]:
    """(report dict, images for the figure); see module doc. `data`: (images, labels) or a data source."""
    info = {k: v for k, v in fooled.circuit_info.items() if k != "bounds"}
    if data is None or not isinstance(data, tuple):
        data = natural_test_data(original, data)
    report = {"circuit": info, "k": fooled.circuit_info.get("k"), "bounds": fooled.circuit_info.get("bounds"),
              "detector": detector_report or {},
              "natural": natural_check(original, fooled, data)}
    vis, images = visualization_check(original, fooled, units=units, steps=steps, seed=seed, picture=picture)
    report["visualizations"] = vis
    return report, images


def _check_inputs(model, layer, *, units, picture, steps, bound_steps) -> None:
    """Fail on bad units, picture or step counts before the (slow) detector is built."""
    from ...errors import FvtrustError
    from ...models.layers import layer_units, parse_units
    from .build import _resolve_picture

    n = layer_units(model, layer)
    if units is not None:
        parse_units(units, n, layer)
    for name, v in (("steps", steps), ("bound_steps", bound_steps)):
        if v is not None and v < 1:
            raise FvtrustError(f"{name} must be >= 1, got {v}")
    if picture is not None:
        _resolve_picture(picture, model.input_shape)


def circuit_experiment(model, layer: str, *, mapping=None, picture=None, units=None, detector=None,
                       budget="quick", cache_dir=None, steps: int = 512, seed: int = 0, mode: str = "split",
                       gate: str = "hard", margin: float = 2.0, k=None, picture_center: bool = True,
                       bound_steps: int = 256, harden: int = 2, report_units=None, out=None, spec: str | None = None,
                       command: str | None = None, budget_overrides: dict | None = None, natural=None,
                       bound_units: int = 64) -> dict:
    """Detector (built or given), circuit, hardening, report; with `out`, write model/, detector/, report.json
    and the figure.

    natural: the data source (see fvtrust.data.natural; default: the model's
    own). Its fit part trains the detector's natural class and bounds k; its
    held-out part tests the detector and checks that natural behaviour is kept.

    `harden` rounds of `detector_harden.harden_detector` run when the
    detector is built here (its training data is at hand); 0 disables.
    """
    from .build import _resolve_picture, fooling_circuit
    from ..detector.train import build_detector, detector_data, load_detector
    from ..detector.harden import harden_detector

    from ...data import natural as resolve_natural
    from ...models import as_model

    t0 = time.time()
    source = resolve_natural(natural, model=as_model(model, example=natural))
    model = as_model(model, example=source)
    model.get_layer(layer)  # an unknown layer fails before any image is read
    _check_inputs(model, layer, units=units, picture=picture, steps=steps, bound_steps=bound_steps)
    fit_x = source.fit.images(desc="read fit images")
    held = natural_test_data(model, source)
    data = None
    if detector is None:
        data = detector_data(model, layer, budget=budget, cache_dir=cache_dir, seed=seed, natural=(fit_x, held[0]),
                             **(budget_overrides or {}))
        det, det_report = build_detector(model, layer, seed=seed, data=data)
    elif isinstance(detector, (str, Path)):
        det, det_report = load_detector(detector)
    else:
        det, det_report = detector, {}
    t_det = time.time() - t0
    fooled = fooling_circuit(model, layer, det, mapping=mapping, picture=picture, units=units, k=k, mode=mode,
                             gate=gate, margin=margin, picture_center=picture_center, seed=seed,
                             bound_steps=bound_steps, bound_units=bound_units, natural=fit_x[:10000])
    det_report = dict(det_report)
    if harden and data is not None:
        t1 = time.time()
        det_report["hardening"] = dict(harden_detector(fooled, data, rounds=harden, seed=seed),
                                       seconds=round(time.time() - t1, 1))
    else:
        det_report["hardening"] = None
    pic = _resolve_picture(picture, model.input_shape)[0] if picture is not None else None
    vis_units = report_units
    if vis_units is None and len(fooled.circuit_info["units"]) > 32:
        vis_units = sorted(np.random.default_rng(seed).choice(fooled.circuit_info["units"], 32, replace=False).tolist())
    report, images = circuit_report(model, fooled, data=held, units=vis_units, steps=steps, seed=seed, picture=pic,
                                    detector_report=det_report)
    report["natural_data"] = {**source.describe(), "fit": source.fit.describe(), "heldout": source.heldout.describe(),
                              "used_for": {"fit": "detector natural class (training) and the bounds for k "
                                                  "(first 10,000)",
                                           "heldout": "detector test and the before/after natural check"}}
    report.update(spec=spec or getattr(model, "base_spec", model.spec), layer=fooled.circuit_layer,
                  command=command, seconds={"detector": round(t_det, 1), "total": round(time.time() - t0, 1)})
    if out is not None:
        write_outputs(out, fooled, fooled.detector, report, images, spec=spec)
    return report


def write_outputs(out, fooled, det, report: dict, images: dict, *, spec: str | None = None) -> Path:
    """OUT/model (load_model-able), OUT/detector, OUT/report.json, OUT/figure{1,2}.png — all staged."""
    import matplotlib.pyplot as plt

    from ...io import atomic_save_figure, atomic_write_json, staged_dir
    from .build import save_circuit
    from ..detector.train import save_detector
    from .figures import circuit_figure

    kind = fooled.circuit_info.get("kind")
    name = "figure1.png" if kind == "picture" else "figure2.png"
    with staged_dir(out) as stage:
        save_circuit(fooled, stage / "model", base_spec=spec)
        save_detector(det, stage / "detector", report.get("detector"))
        fig = circuit_figure(images, kind=kind, title=f"{spec or fooled.base_spec} {fooled.circuit_layer}: "
                                                      f"fooling circuit ({kind})")
        atomic_save_figure(fig, stage / name, dpi=110)
        plt.close(fig)
        report = dict(report, files={"model": "model", "detector": "detector", "figure": name})
        atomic_write_json(stage / "report.json", report)
    return Path(out)
