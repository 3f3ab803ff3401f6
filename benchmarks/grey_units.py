"""Find units whose standard visualization stays grey, and show what relu="redirect" does to them.

    python benchmarks/grey_units.py --model fashion-cnn --weights random --layer block1 --steps 512

Grey: pixel std of the final image < 0.02 (issue 16's measure). Prints one
line per grey unit (std standard -> std redirect, objective before -> after)
and a JSON summary with --json.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import load_model, model_arguments
from fvtrust.visualize import visualize

GREY = 0.02


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, layer="block1", units="all")
    ap.add_argument("--objective", default="neuron")
    ap.add_argument("--redirect-steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summary here")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    model = load_model(a)
    kw = dict(steps=a.steps, objective=a.objective, seed=a.seed)
    t0 = time.time()
    std = visualize(model, a.layer, a.units, **kw)
    s_std = std.final.flatten(1).std(1)
    grey = [u for u, s in zip(std.units, s_std.tolist()) if s < GREY]
    out = {"model": a.model, "weights": a.weights, "layer": a.layer, "steps": a.steps, "objective": a.objective,
           "redirect_steps": a.redirect_steps, "n_units": len(std.units), "grey_units": grey, "units": []}
    if grey:
        red = visualize(model, a.layer, grey, relu="redirect", redirect_steps=a.redirect_steps, **kw)
        s_red = red.final.flatten(1).std(1)
        idx = [std.units.index(u) for u in grey]
        for j, u in enumerate(grey):
            row = {"unit": u, "std_standard": float(s_std[idx[j]]), "std_redirect": float(s_red[j]),
                   "objective_standard": float(std.objective[-1, idx[j]]), "objective_redirect": float(red.objective[-1, j])}
            out["units"].append(row)
            print(f"unit {u:4d}: pixel std {row['std_standard']:.4f} -> {row['std_redirect']:.4f}   "
                  f"objective {row['objective_standard']:.4g} -> {row['objective_redirect']:.4g}")
        out["fixed"] = sum(r["std_redirect"] >= GREY for r in out["units"])
    print(f"{len(grey)} of {len(std.units)} units grey (std < {GREY}) after {a.steps} steps; "
          f"redirect un-greys {out.get('fixed', 0)}; {time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
