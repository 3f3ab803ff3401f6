"""What a gradient slingshot changes about its unit, with ground truth the audit never sees (the target picture).

The README's audit section quotes these numbers for the block4:0 camera slingshot against the clean model:

    python benchmarks/slingshot_anatomy.py .bench_cache/audit/slingshot-block4-model --layer block4 --unit 0

Everything is measured on the model and then, in the same run, on `--reference` (default: the clean
fashion-cnn), the baseline each number is read against.

Printed, for the unit:
* the target picture's activation over the unit's natural maximum, and the visualization's activation;
* agreement of the gradient channel profile (as the audit's `gradient_agreement`, but w.r.t. the inputs of the
  `--at` layers, further up) between its top-8 natural images and its 3 seed visualizations;
* agreement between visualizations: of seeds 0-2, and of seed 0 with the same seed under 2 %, 5 % and 10 % weight
  noise (`fvtrust.audit.pinning.perturbed_parameters`, 2 draws);
* Pearson to the target of the 128-step visualization under other procedures (SGD, gradient clipping, no
  transforms, pixel space at lr 0.05 and 0.5, fft at lr 0.2);
* Spearman, over 2000 natural images, between the unit's responses to x and to 0.5 + c (x - 0.5).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import fvtrust
from fvtrust.audit.pinning import pearson_rows, perturbed_parameters
from fvtrust.audit.probes import unit_activations, unit_value
from fvtrust.data import natural
from fvtrust.errors import FvtrustError
from fvtrust.fool.slingshot.finetune import resolve_target
from fvtrust.linearity.top_activating import top_activating_many
from fvtrust.models.layers import layer_units
from fvtrust.visualize import visualize

PROCEDURES = {"sgd lr 1": dict(optimizer="sgd", lr=1.0), "gradient clip 0.01": dict(grad_clip=0.01),
              "no transforms": dict(transforms=None), "pixel lr 0.05": dict(param="pixel", lr=0.05),
              "pixel lr 0.5": dict(param="pixel", lr=0.5), "fft lr 0.2": dict(lr=0.2)}


def profile_at(model, layer: str, at: str, x: torch.Tensor, unit: int) -> torch.Tensor:
    """(N, C) gradient of the unit's channel objective w.r.t. the input of layer `at`, summed over positions."""
    store = {}

    class Stop(Exception):
        pass

    def pre(_m, args):
        args[0].retain_grad()
        store["in"] = args[0]

    def post(_m, _a, out):
        store["out"] = out
        raise Stop

    hooks = [model.get_layer(at).register_forward_pre_hook(pre), model.get_layer(layer).register_forward_hook(post)]
    try:
        with torch.enable_grad():
            try:
                model(x.clone().requires_grad_(True))
            except Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    v = unit_value(store["out"], torch.full((len(x),), unit))
    g = torch.autograd.grad(v.sum(), store["in"])[0]
    return g.flatten(2).sum(2).double()


def spearman_columns(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def load_checked(spec: str, args):
    """The model, after checking the layer, unit, `--at` layers and target exist (FvtrustError otherwise)."""
    m = fvtrust.load_model(spec)
    n = layer_units(m, args.layer)
    if not 0 <= args.unit < n:
        raise FvtrustError(f"unit {args.unit} out of range for {args.layer}: valid units are 0..{n - 1}")
    for at in args.at.split(","):
        m.get_layer(at)
    resolve_target(args.target, m)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a spec or a saved model directory")
    ap.add_argument("--reference", default="fashion-cnn",
                    help="the clean model measured the same way in the same run, as the baseline ('none': skip)")
    ap.add_argument("--layer", required=True)
    ap.add_argument("--unit", type=int, default=0)
    ap.add_argument("--target", default="camera", help="the slingshot's target picture (ground truth)")
    ap.add_argument("--at", default="pool2,block3,block2", help="layers whose inputs the gradient profile is read at")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = [args.model] + ([] if args.reference == "none" else [args.reference])
    try:
        models = [(spec, load_checked(spec, args)) for spec in specs]  # every input checked before any work
    except FvtrustError as e:
        raise SystemExit(f"slingshot_anatomy: {e}")
    for spec, m in models:
        anatomy(spec, m, args)


def anatomy(spec: str, m, args) -> None:
    """Print the module docstring's measurements for `args.unit` of `args.layer` of model `m`."""
    target = resolve_target(args.target, m)
    u, L = args.unit, args.layer
    data = natural(None, model=m).evaluation.tensors(5000, desc=None)[0]
    acts = unit_activations(m, L, data, [u])[:, 0]

    def vis(seed=0, **kw):
        return visualize(m, L, [u], steps=args.steps, objective="channel", seed=seed, progress_desc=None, **kw).final

    seeds = torch.cat([vis(s) for s in range(3)])
    a_t = float(unit_activations(m, L, target[None], [u])[0, 0])
    a_v = float(unit_activations(m, L, seeds[:1], [u])[0, 0])
    print(f"{spec} {L} unit {u}: target picture {a_t:.3f} = {a_t / float(acts.max()):.2f} of the natural "
          f"maximum {float(acts.max()):.3f}; visualization {a_v:.3f}")
    top = top_activating_many(m, L, [u], data, m=8, objective="channel").indices[0]
    for at in args.at.split(","):
        nat = profile_at(m, L, at, data[top], u)
        mean = nat / nat.norm(dim=1, keepdim=True)
        mean = mean.sum(0) / mean.sum(0).norm()
        pv = profile_at(m, L, at, seeds, u)
        agree = (pv / pv.norm(dim=1, keepdim=True) @ mean).mean()
        print(f"  gradient profile at the input of {at}: visualization vs natural {float(agree):.3f}")
    pairs = [(0, 1), (0, 2), (1, 2)]
    print(f"  seed agreement (Pearson, seeds 0-2): "
          f"{float(torch.stack([pearson_rows(seeds[i:i + 1], seeds[j:j + 1]) for i, j in pairs]).mean()):.3f}")
    for sd in (0.02, 0.05, 0.1):
        ps = []
        for d in range(2):
            with perturbed_parameters(m, sd, torch.Generator().manual_seed(1000 + d)):
                ps.append(float(pearson_rows(seeds[:1], vis(0))[0]))
        print(f"  weight noise {sd:.0%}: Pearson to the visualization {np.mean(ps):.3f}")
    t = target[None]
    print(f"  Pearson to the target: standard {float(pearson_rows(seeds[:1], t)[0]):.3f}; " + "; ".join(
        f"{name} {float(pearson_rows(vis(0, **kw), t)[0]):.3f}" for name, kw in PROCEDURES.items()))
    x = data[:2000]
    full = unit_activations(m, L, x, [u])[:, 0]
    print("  low contrast, Spearman to the full-contrast responses: " + "; ".join(
        f"c={c} {spearman_columns(full, unit_activations(m, L, 0.5 + c * (x - 0.5), [u])[:, 0]):.3f}"
        for c in (0.05, 0.1, 0.2, 0.5)))


if __name__ == "__main__":
    main()
