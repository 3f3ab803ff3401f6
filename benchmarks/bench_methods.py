"""The five visualization methods and the Horama / faccent anchors, side by side in one run.

    python benchmarks/bench_methods.py --model fashion-cnn --layer fc --units 0-4 --steps 64 \\
        --replicates 1 --anchors horama,faccent --time-anchors horama --out bench-methods/

1. One full `compare_methods` run (all measures (a)-(d), images, index.html) at `--steps`.
2. `--repeats` - 1 more timing runs (the full run is the first) of fvtrust's MACO and accentuation (batched over
   units x replicates) and of the `--time-anchors` (Horama's `maco`, faccent's `render_vis`: one image per call),
   same model, units, size and steps. Prints per repeat and as the median: seconds per unit and the ratios
   anchor / fvtrust (> 1: fvtrust faster).

The anchors run in this interpreter if importable, else in `--anchor-python` (default
$FVTRUST_ANCHORS_PYTHON or ~/.venvs/fvtrust-anchors/bin/python), see fvtrust/compare/anchors.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from common import load_model, model_arguments
from fvtrust.compare import compare_methods
from fvtrust.compare.anchors import run_anchors
from fvtrust.compare.methods import run_method
from fvtrust.models.layers import layer_units, parse_units
from fvtrust.visualize.maco import Maco
from fvtrust.data import natural


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, layer="fc", units="0-9")
    ap.add_argument("--time-anchors", default=None, help="anchors in the timing repeats (default: --anchors)")
    ap.add_argument("--methods", default=None, help="methods of the full run (default: all five)")
    ap.add_argument("--per-class-natural", type=int, default=50)
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--anchors", default="horama,faccent")
    ap.add_argument("--anchor-python", default=None)
    ap.add_argument("--accent-layer", default=None)
    ap.add_argument("--time-only", action="store_true", help="skip the full run: timing repeats only")
    ap.add_argument("--out", default="bench-methods")
    a = ap.parse_args(argv)
    model = load_model(a)
    units = parse_units(a.units, layer_units(model, a.layer), a.layer)
    anchors = [x for x in a.anchors.split(",") if x]
    out = Path(a.out)
    summary = {"command": "python benchmarks/bench_methods.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads()}
    from fvtrust.compare.methods import METHODS

    time_anchors = [x for x in (a.time_anchors or a.anchors).split(",") if x]
    reps = []
    if not a.time_only:
        res = compare_methods(model, a.layer, units, steps=a.steps, replicates=a.replicates, anchors=anchors,
                              methods=a.methods or METHODS, anchor_python=a.anchor_python, accent_layer=a.accent_layer,
                              per_class_natural=a.per_class_natural, out=out / "compare", command=summary["command"])
        summary["full"] = {"ranking": res["ranking"], "ratios": res["ratios"],
                           "rows": [{k: r.get(k) for k in ("method", "seconds_per_unit", "seconds_per_image_step",
                                                           "diversity", "activation_ratio", "faithfulness", "error")}
                                    | {"sanity_mean": r.get("sanity", {}).get("mean")} for r in res["methods"] + res["anchors"]]}
        for r in res["ranking"]:
            print(f"sanity {r['method']:>16}: {r['sanity_mean']:.3f}", flush=True)
        first = {r["method"]: r["seconds_per_unit"] for r in res["methods"] + res["anchors"] if "seconds_per_unit" in r}
        t = {k: first[k] for k in ("maco", "accentuation", "horama-maco", "faccent") if k in first}
        reps.append(_ratios(t))
        print("repeat 1 (the full run): " + _fmt(reps[-1]), flush=True)
    spectrum = Maco(data=model.default_data, limit=2000)
    spectrum.magnitude(tuple(model.input_shape))
    fit = natural(None, model=model).fit.nonempty(2000)[0]
    for i in range(len(reps), a.repeats):
        t = {}
        names = ["maco"] + (["accentuation"] if "faccent" in time_anchors else [])
        for name in names:
            r = run_method(name, model, a.layer, units, replicates=a.replicates, steps=a.steps, fit_images=fit,
                           spectrum=spectrum, accent_layer=a.accent_layer)
            t[name] = r.seconds / (len(units) * a.replicates)
        for name, r in run_anchors(time_anchors, model, a.layer, units, replicates=a.replicates, steps=a.steps,
                                   seed=0, objective="neuron", spectrum=spectrum, python=a.anchor_python,
                                   proximity_layer=a.accent_layer).items():
            t[name] = r if isinstance(r, str) else r.seconds / (len(units) * a.replicates)
        reps.append(_ratios(t))
        print(f"repeat {i + 1}: " + _fmt(reps[-1]), flush=True)
    keys = [k for k in reps[0] if isinstance(reps[0][k], float)]
    med = {k: statistics.median(r[k] for r in reps if isinstance(r.get(k), float)) for k in keys}
    print(f"median of {len(reps)} ({a.steps} steps, s per unit): " + _fmt(med))
    summary.update(repeats=reps, median=med)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))


def _ratios(t: dict) -> dict:
    t = dict(t)
    if isinstance(t.get("horama-maco"), float) and "maco" in t:
        t["horama/maco"] = t["horama-maco"] / t["maco"]
    if isinstance(t.get("faccent"), float) and "accentuation" in t:
        t["faccent/accentuation"] = t["faccent"] / t["accentuation"]
    return t


def _fmt(t: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items())


if __name__ == "__main__":
    main()
