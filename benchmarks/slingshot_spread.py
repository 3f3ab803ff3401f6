"""How much one start decides a slingshot's success: the standard visualization from N starts.

For each saved slingshot model (`fvtrust fool slingshot ... --out DIR` writes DIR/model), the unit's
standard visualization (fvtrust.visualize defaults, 512 steps, channel objective) is run from N starts in
one batched call, on the original model and on the slingshot, and the Pearson of each image to the
slingshot's target is printed with the median. report.json's `visualization.across_starts` is the same
measure with N = 4.

    python benchmarks/slingshot_spread.py OUT1/model OUT2/model --starts 8
"""
from __future__ import annotations

import argparse

import numpy as np

from common import saved_slingshots
from fvtrust.fool.slingshot.finetune import resolve_target
from fvtrust.fool.slingshot.report import defense_settings, standard_across_starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="saved slingshot models (DIR/model)")
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.starts < 1 or args.steps < 1:
        ap.error("--starts and --steps must be >= 1")
    for path, fooled, original, layer, unit, info in saved_slingshots(args.models, "slingshot_spread"):
        target = resolve_target(info["target"], original)
        standard = defense_settings(original, layer, unit, info.get("param", "fft"), args.seed)[0]
        for name, model in (("original", original), ("slingshot", fooled)):
            r = standard_across_starts(model, layer, unit, standard, args.steps, args.seed, args.starts, target)
            print(f"{path} {layer}:{unit} {name:9s} Pearson to {info['target']}: "
                  f"{' '.join(f'{v:.2f}' for v in r)}  median {np.median(r):.3f}", flush=True)


if __name__ == "__main__":
    main()
