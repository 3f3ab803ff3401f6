"""compare-methods end to end: render every method, measure (a)-(d), add the anchors, write one page.

Output folder::

    results.json        every number on the page, the command, the settings
    index.html          self-contained page: the methods' images side by side with their numbers
    <method>.png        units x replicates grid per method (anchors too)
    maco_alpha.png      MACO's transparency masks
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from ..errors import FvtrustError
from ..io import atomic_save_figure, atomic_write_json, atomic_write_text, staged_dir
from ..visualize.maco import Maco
from . import measures as Ms
from .methods import METHODS, MethodRun, check_methods, run_method


def _natural(model, data, data_dir, limit_fit, limit_heldout, class_index=None, natural_limit=None):
    """The fit part (MACO's spectrum, accentuation seeds) and the labelled held-out part (the measures)."""
    from ..data import natural

    nat = natural(data, model=model, data_dir=data_dir, class_index=class_index, limit=natural_limit)
    return nat.fit.nonempty(limit_fit)[0], nat.heldout.nonempty(limit_heldout)


def _describe_source(source, model=None) -> str:
    """How results.json names the natural data: "tensor" for images given in memory, else the source."""
    if source is None:
        source = getattr(model, "default_data", None)
    return "tensor" if isinstance(source, torch.Tensor) else str(source)


def measure(model, layer, units, run: MethodRun, heldout, natural_max, *, groups=None, per_class_natural=50,
            sanity_layers="all") -> dict:
    """(a)-(d) for one method's images."""
    vis = run.images
    row = {"method": run.name, "seconds": run.seconds, "image_steps": run.image_steps,
           "seconds_per_image_step": run.seconds_per_image_step,
           "seconds_per_unit": run.seconds / max(1, vis.shape[0] * vis.shape[1]),
           "diversity": Ms.diversity(vis),
           "activation_ratio": float((run.objective / natural_max.view(-1, 1)).mean()),
           "objective_mean": float(run.objective.mean()),
           "pixel_std": float(vis.flatten(2).std(2).mean())}
    if Ms.is_class_layer(model, layer):
        row["faithfulness"] = Ms.faithfulness(model, units, vis)
        row["sanity"] = Ms.class_sanity(model, units, vis, heldout, per_class_natural=per_class_natural,
                                        layers=sanity_layers)
    else:
        row["faithfulness"] = None
        row["sanity"] = Ms.grouped_sanity(model, groups, vis, layers=sanity_layers)
    return row


def compare_methods(model, layer: str, units, *, data=None, data_dir=None, methods=METHODS, steps: int = 512,
                    replicates: int = 4, seed: int = 0, objective="neuron", lr: float = 0.05,
                    accent_weight: float = 1.0, accent_layer: str | None = None, redirect_steps: int = 16,
                    fit_limit: int = 2000, heldout_limit: int = 2000, per_group_natural: int = 20,
                    per_class_natural: int = 50, sanity_layers="all", class_index=None, natural_limit=None, anchors=(), anchor_python: str | None = None,
                    out=None, command: str | None = None) -> dict:
    """Run `methods` (and `anchors`: 'horama', 'faccent') on the same model, layer, units and steps; measure all.

    `per_group_natural`: held-out natural images per hidden unit (its top
    activating ones); `per_class_natural`: per class for class units;
    `sanity_layers`: "all" (the paper's) or layer names for a cheaper check.
    Returns the result dict; with `out`, also writes the folder described in the module docstring.
    """
    from ..models.layers import layer_units, parse_units
    from ..visualize.accentuate import top_seeds

    t0 = time.time()
    methods = check_methods(methods)
    if replicates < 1:
        raise FvtrustError(f"replicates must be >= 1, got {replicates}")
    units = parse_units(units, layer_units(model, layer), layer)
    from ..models import as_model

    model = as_model(model)
    fit, heldout = _natural(model, data, data_dir, fit_limit, heldout_limit, class_index, natural_limit)
    spectrum = Maco(data=data if data is not None else getattr(model, "default_data", None), limit=fit_limit,
                    data_dir=data_dir, class_index=class_index)
    t_spec = time.perf_counter()
    spectrum.magnitude(tuple(model.input_shape))  # computed (or read from the cache) once, outside the timings
    spectrum_seconds = time.perf_counter() - t_spec
    # the natural maximum of each unit (held-out) and, for hidden units, its top natural group
    k_nat = min(per_group_natural, len(heldout[0]))
    top, top_v = top_seeds(model, layer, units, heldout[0], objective=objective, k=k_nat)
    natural_max = top_v.view(len(units), k_nat)[:, 0]
    groups = list(top.view(len(units), k_nat, *top.shape[1:]))

    from ..visualize import visualize

    visualize(model, layer, units[:1], steps=2, objective=objective)  # warm-up (thread pools, first-call costs): untimed
    runs, rows = {}, []
    common = dict(replicates=replicates, steps=steps, fit_images=fit, spectrum=spectrum, objective=objective, lr=lr,
                  seed=seed, accent_weight=accent_weight, accent_layer=accent_layer, redirect_steps=redirect_steps)
    for name in methods:
        runs[name] = run_method(name, model, layer, units, **common)
        rows.append(measure(model, layer, units, runs[name], heldout, natural_max, groups=groups,
                            per_class_natural=per_class_natural, sanity_layers=sanity_layers))
        rows[-1]["settings"] = runs[name].settings
    anchor_rows = []
    if anchors:
        from .anchors import run_anchors

        for name, arun in run_anchors(anchors, model, layer, units, replicates=replicates, steps=steps, seed=seed,
                                      objective=objective, spectrum=spectrum, python=anchor_python,
                                      proximity_layer=accent_layer, weight=accent_weight).items():
            if isinstance(arun, MethodRun):
                runs[name] = arun
                row = measure(model, layer, units, arun, heldout, natural_max, groups=groups,
                              per_class_natural=per_class_natural, sanity_layers=sanity_layers)
                row.update(settings=arun.settings, anchor=True)
            else:
                row = {"method": name, "anchor": True, "error": arun}
            anchor_rows.append(row)
    ranking = sorted((r for r in rows + anchor_rows if "sanity" in r), key=lambda r: -_nan0(r["sanity"]["mean"]))
    result = {
        "spec": getattr(model, "spec", None), "layer": layer, "units": units, "steps": steps,
        "replicates": replicates, "seed": seed, "sanity_layers": sanity_layers, "per_class_natural": per_class_natural,
        "per_group_natural": per_group_natural, "objective": str(objective), "lr": lr, "data": _describe_source(data, model),
        "fit_images": len(fit), "heldout_images": len(heldout[0]), "natural_max": natural_max.tolist(),
        "class_layer": Ms.is_class_layer(model, layer), "spectrum_seconds": spectrum_seconds,
        "methods": rows, "anchors": anchor_rows,
        "ranking": [{"method": r["method"], "sanity_mean": r["sanity"]["mean"]} for r in ranking],
        "ratios": _ratios(rows, anchor_rows),
        "command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "device": str(model.device),
        "runtime_s": None,
    }
    result["runtime_s"] = time.time() - t0
    if out is not None:
        _write(Path(out), result, runs, model)
    return result


def _nan0(v):
    return -1e9 if v is None or v != v else v


def _ratios(rows, anchor_rows) -> dict:
    """fvtrust's MACO vs Horama's: time per unit and sanity score, measured in this run."""
    by = {r["method"]: r for r in rows + anchor_rows if "error" not in r}
    out = {}
    if "maco" in by and "horama-maco" in by:
        out["horama_over_fvtrust_maco_seconds_per_unit"] = by["horama-maco"]["seconds_per_unit"] / by["maco"][
            "seconds_per_unit"]
        out["fvtrust_minus_horama_maco_sanity"] = by["maco"]["sanity"]["mean"] - by["horama-maco"]["sanity"]["mean"]
    if "accentuation" in by and "faccent" in by:
        out["faccent_over_fvtrust_accentuation_seconds_per_unit"] = by["faccent"]["seconds_per_unit"] / by[
            "accentuation"]["seconds_per_unit"]
    return out


def _write(out: Path, result: dict, runs: dict, model):
    import matplotlib.pyplot as plt

    from ..visualize.output import grid_figure
    from .html import render

    figures = {}
    with staged_dir(out) as stage:
        for name, r in runs.items():
            imgs = r.images.transpose(0, 1)  # replicates x units: one column per unit
            fig = grid_figure(imgs, [f"seed {i}" for i in range(imgs.shape[0])], [f"unit {u}" for u in result["units"]],
                              title=f"{name}: {result['spec']} {result['layer']}, {result['steps']} steps")
            fname = f"{name}.png"
            atomic_save_figure(fig, stage / fname, dpi=90)
            plt.close(fig)
            figures[name] = fname
            if r.alpha is not None:
                a = r.alpha.transpose(0, 1)
                fig = grid_figure(a, [f"seed {i}" for i in range(a.shape[0])], [f"unit {u}" for u in result["units"]],
                                  title=f"{name}: transparency (accumulated |d objective / d image|)")
                atomic_save_figure(fig, stage / f"{name}_alpha.png", dpi=90)
                plt.close(fig)
                figures[f"{name}_alpha"] = f"{name}_alpha.png"
        result["figures"] = figures
        atomic_write_json(stage / "results.json", result)
        atomic_write_text(stage / "index.html", render(stage, result))


__all__ = ["compare_methods", "measure"]
