"""How much of the `pinning` probes' spread over a layer is draw noise, and what more draws would buy.

`pinning` reads each probe as a robust z-score among the layer's units. A probe averaged over few random draws
(weight-noise draws, seeds) carries per-unit draw noise on top of the real differences between units; that noise
widens the layer's MAD and blurs an outlier's z-score. This measures it, for one layer of one model:

* `seed_agreement` over `--seeds` seeds (the audit's seed, +1, ...): the layer's spread of the mean pairwise Pearson
  of the first 3 seeds (the audit's) and of the first 4, 5, ...;
* `gradient_coherence` over `--lines` start-to-visualization lines: each unit's per-line cosines, and the layer's
  spread of their median over the first 16 lines (the audit's) and over 32, 64, ...;
* `noise_agreement` (the weight-noise probe, no longer in the audit; `--noise-draws 0` skips it) over
  `--noise-draws` draws: each unit's SD across single draws, against the layer's spread of the 2-draw mean (what
  the audit used) and of 4- and 8-draw means, and its Spearman correlation with `seed_agreement` over the units;
* for `--unit` (if given), its z-score under each choice, and the highest z-score of any other unit.

The weight-noise probe was part of the audit's `pinning` for one session; this is the measurement that, among
others, dropped it (fvtrust/audit/pinning.py).

    python benchmarks/pinning_variance.py fashion-cnn --layer block4
    python benchmarks/pinning_variance.py .bench_cache/audit/slingshot-block4-seed3-model --layer block4 --unit 0

Seeds, lines, transform draws and weight-noise draws are the audit's own (`fvtrust.audit.pinning`): the first
seeds and lines are the ones the audit uses, so its values are the first column of each table.
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
from fvtrust.audit.pinning import LINE_POINTS, WEIGHT_NOISE, Lines, pearson_rows, perturbed_parameters, robust_z  # noqa: E402,E501
from fvtrust.audit.probes import frozen  # noqa: E402
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


def line_cosines(model, layer: str, visualization: torch.Tensor, units, *, lines: int, seed: int) -> np.ndarray:
    """(U, lines): the cosine `gradient_coherence` takes the median of, per line (NaN where a gradient vanishes)."""
    ln = Lines(model, visualization, units, pairs=lines, seed=seed)
    with frozen(model):
        a, b = (ln.gradients(model, layer, ln.at(p)) for p in LINE_POINTS)
    c = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    c = torch.where((a.norm(dim=1) > 0) & (b.norm(dim=1) > 0), c, torch.full_like(c, float("nan")))
    return c.reshape(len(units), lines).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a spec or a saved model directory")
    ap.add_argument("--layer", required=True)
    ap.add_argument("--unit", type=int, default=None, help="a unit to follow (e.g. the slung one)")
    ap.add_argument("--seeds", type=int, default=5, help="at least 3 (the audit's)")
    ap.add_argument("--lines", type=int, default=64, help="at least 16 (the audit's)")
    ap.add_argument("--noise-draws", type=int, default=0, help="0 (skip) or at least 4")
    ap.add_argument("--steps", type=int, default=128, help="visualization steps (the audit's default)")
    ap.add_argument("--seed", type=int, default=0, help="the audit seed")
    ap.add_argument("--weight-noise", type=float, default=WEIGHT_NOISE,
                    help="parameter noise as a fraction of each tensor's SD (what the audit used)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        if args.seeds < 3 or args.lines < 16 or args.noise_draws < 0 or args.noise_draws in (1, 2, 3):
            raise FvtrustError("--seeds must be at least 3, --lines at least 16, --noise-draws 0 or at least 4")
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

    print(f"{args.model} {args.layer} ({n} units, {args.steps} steps, audit seed {args.seed})")
    finals = [vis(args.seed + k) for k in range(args.seeds)]
    pair = {(i, j): pearson_rows(finals[i], finals[j]).numpy() for i in range(args.seeds) for j in range(i + 1, args.seeds)}
    seed_mean = {k: np.mean([v for (i, j), v in pair.items() if j < k], 0) for k in range(3, args.seeds + 1)}
    report("seed_agreement", {f"{k} seeds" + (" (audit)" if k == 3 else ""): v for k, v in seed_mean.items()},
           args.unit)

    cos = line_cosines(model, args.layer, finals[0], units, lines=args.lines, seed=args.seed)
    ks = sorted({16, *[k for k in (32, 64, 128) if k < args.lines], args.lines})
    print(f"\ngradient_coherence: median over units of the SD across single lines {np.nanmedian(np.nanstd(cos, 1, ddof=1)):.4f}")
    report("gradient_coherence", {f"median of {k} lines" + (" (audit)" if k == 16 else ""):
                                  np.nanmedian(cos[:, :k], 1) for k in ks}, args.unit)
    if args.unit is not None:
        for k in ks:
            zs = robust_z(seed_mean[3], min_units=1), robust_z(np.nanmedian(cos[:, :k], 1), min_units=1)
            pin = np.minimum(*zs)
            rest = np.delete(np.arange(n), args.unit)
            print(f"  pinning with 3 seeds and {k} lines: unit {args.unit} {pin[args.unit]:.3f}, "
                  f"highest other {np.nanmax(pin[rest]):.3f}")

    if args.noise_draws:
        per_draw = []
        for d in range(args.noise_draws):
            with perturbed_parameters(model, args.weight_noise, noise_generator(args.seed, d)):
                per_draw.append(pearson_rows(finals[0], vis(args.seed)).numpy())
        nd = np.stack(per_draw, 1)  # (U, draws)
        print(f"\nnoise_agreement (weight noise {args.weight_noise:g}): median over units of the SD across single "
              f"draws {np.median(nd.std(1, ddof=1)):.4f}; the SD of a k-draw mean is that / sqrt(k)")
        report("noise_agreement", {f"mean of {k} draws" + (" (the audit's until dropped)" if k == 2 else ""):
                                   nd[:, :k].mean(1) for k in (2, 4, 8) if k <= args.noise_draws}, args.unit)
        print(f"  Spearman over the layer's units between seed_agreement (3 seeds) and noise_agreement (2 draws): "
              f"{scipy.stats.spearmanr(seed_mean[3], nd[:, :2].mean(1)).statistic:.3f}")


if __name__ == "__main__":
    main()
