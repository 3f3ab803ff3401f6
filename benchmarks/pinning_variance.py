"""How much of the `pinning` probes' spread over a layer is draw noise, and what more draws would buy.

`pinning` reads each probe as a robust z-score among the layer's units. A probe averaged over few random draws
(weight-noise draws, seeds) carries per-unit draw noise on top of the real differences between units; that noise
widens the layer's MAD and blurs an outlier's z-score. This measures it, for one layer of one model:

* `noise_agreement` over `--noise-draws` draws (the audit's generator seeds, draw 0, 1, ...): each unit's SD across
  single draws, against the layer's spread (1.4826 MAD) of the audit's 2-draw mean and of 4- and 8-draw means;
* `seed_agreement` over `--seeds` seeds (the audit's seed, +1, ...): the layer's spread of the mean pairwise Pearson
  of the first 3 seeds (the audit's) and of the first 4 and 5;
* for `--unit` (if given), its z-score under each choice, and the highest z-score of any other unit;
* the Spearman correlation over the layer's units between the two probes (the audit's 3 seeds and 2 draws).

The weight-noise probe was part of the audit's `pinning` for one session; this is the measurement that, among
others, dropped it (fvtrust/audit/pinning.py).

    python benchmarks/pinning_variance.py fashion-cnn --layer block4
    python benchmarks/pinning_variance.py .bench_cache/audit/slingshot-block4-seed3-model --layer block4 --unit 0

Seeds and draws are the audit's own (`fvtrust.audit.pinning`), so the audit's values are the first columns here.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

import fvtrust  # noqa: E402
from fvtrust.audit.pinning import WEIGHT_NOISE, pearson_rows, perturbed_parameters, robust_z  # noqa: E402
from fvtrust.errors import FvtrustError  # noqa: E402
from fvtrust.models.layers import layer_units  # noqa: E402
from fvtrust.visualize import visualize  # noqa: E402


def noise_generator(seed: int, draw: int) -> torch.Generator:
    """The generator `pinning_probes` uses for weight-noise draw `draw` at audit seed `seed`."""
    return torch.Generator().manual_seed(int(seed) * 1000003 + 7919 + draw)


def spread(v: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def report(name: str, columns: dict, unit: int | None) -> None:
    print(f"\n{name}: layer spread (1.4826 MAD) of the probe, by how many draws it averages")
    for label, v in columns.items():
        z = robust_z(v, min_units=1)
        line = f"  {label:>24}: spread {spread(v):.4f}"
        if unit is not None:
            line += f"   unit {unit} z {z[unit]:.2f}"
        rest = np.arange(len(z)) if unit is None else np.delete(np.arange(len(z)), unit)
        top = rest[np.nanargmax(z[rest])]
        line += f"   highest {'other ' if unit is not None else ''}z {z[top]:.2f} (unit {int(top)})"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a spec or a saved model directory")
    ap.add_argument("--layer", required=True)
    ap.add_argument("--unit", type=int, default=None, help="a unit to follow (e.g. the slung one)")
    ap.add_argument("--noise-draws", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=128, help="visualization steps (the audit's default)")
    ap.add_argument("--seed", type=int, default=0, help="the audit seed")
    ap.add_argument("--weight-noise", type=float, default=WEIGHT_NOISE,
                    help="parameter noise as a fraction of each tensor's SD (the audit's by default)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        if args.noise_draws < 4 or args.seeds < 3:
            raise FvtrustError("--noise-draws must be at least 4 and --seeds at least 3")
        if not args.weight_noise > 0:
            raise FvtrustError(f"--weight-noise must be positive, got {args.weight_noise}")
        model = fvtrust.load_model(args.model)
        n = layer_units(model, args.layer)
        if args.unit is not None and not 0 <= args.unit < n:
            raise FvtrustError(f"unit {args.unit} out of range for {args.layer}: valid units are 0..{n - 1}")
    except FvtrustError as e:
        raise SystemExit(f"pinning_variance: {e}")
    units = list(range(n))

    def vis(seed):
        return visualize(model, args.layer, units, steps=args.steps, objective="channel", seed=seed,
                         progress_desc=None).final.detach().float().cpu()

    finals = [vis(args.seed + k) for k in range(args.seeds)]
    per_draw = []
    for d in range(args.noise_draws):
        with perturbed_parameters(model, args.weight_noise, noise_generator(args.seed, d)):
            per_draw.append(pearson_rows(finals[0], vis(args.seed)).numpy())
    nd = np.stack(per_draw, 1)  # (U, draws)
    within = nd.std(1, ddof=1)
    print(f"{args.model} {args.layer} ({n} units, {args.steps} steps, audit seed {args.seed}, "
          f"weight noise {args.weight_noise:g})")
    print(f"noise_agreement: median over units of the SD across single draws {np.median(within):.4f}; "
          f"the SD of a k-draw mean is that / sqrt(k)")
    report("noise_agreement", {f"mean of {k} draws" + (" (audit)" if k == 2 else ""): nd[:, :k].mean(1)
                               for k in (2, 4, 8) if k <= args.noise_draws}, args.unit)
    pair = {(i, j): pearson_rows(finals[i], finals[j]).numpy() for i in range(args.seeds) for j in range(i + 1, args.seeds)}
    seed3 = np.mean([v for (i, j), v in pair.items() if j < 3], 0)
    print(f"\nSpearman over the layer's units between seed_agreement (3 seeds) and noise_agreement (2 draws): "
          f"{scipy.stats.spearmanr(seed3, nd[:, :2].mean(1)).statistic:.3f}")
    report("seed_agreement", {f"{k} seeds" + (" (audit)" if k == 3 else ""):
                              np.mean([v for (i, j), v in pair.items() if j < k], 0) for k in range(3, args.seeds + 1)},
           args.unit)


if __name__ == "__main__":
    main()
