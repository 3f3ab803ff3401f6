"""fvtrust.visualize vs torch-lucent 0.1.8 render_vis, side by side in one run.

Same model, layer, units, steps, parameterization (FFT + colour decorrelation
for RGB) and transforms (lucent's standard set + centre crop to the model's
input size; sizes scaled for 28-px models exactly as fvtrust scales them).
Four timings per model:
  lucent-single   render_vis once per unit (how the paper ran it)
  lucent-batch    one render_vis with a batch of images, one channel objective per batch index
  fvtrust-single  fvtrust.visualize once per unit
  fvtrust-batch   one fvtrust.visualize call for all units
Ratios are printed against lucent-single and lucent-batch measured in the same
run (absolute times on shared machines mean little).

Precision (same run): fvtrust-batch at fp32 and at bf16 (autocast), each divided
by its own floor -- a raw forward to the layer plus backward to the input
through the same network part (same fast path, batch and precision), with the
same objective, timed in the same run -- so the ratio is fvtrust's overhead
over the network itself. Quality of bf16 against fp32: the activation reached
(objective of the final images, always measured in fp32); on a model with
classes (--quality-model, default the trained fashion-cnn) also the share of
logit visualizations classified as their own class and the sanity check's
score (mean normalized Spearman over layers, fvtrust.sanity.analysis.run with
all pairs) of the fp32 and of the bf16 images.

    python benchmarks/bench_visualize.py                       # both models
    python benchmarks/bench_visualize.py --model googlenet --units 10 --steps 32
    python benchmarks/bench_visualize.py --model googlenet --units 5 --steps 8 --repeats 3 \
        --contenders lucent-single,fvtrust-batch                 # + precision and quality sections
Needs torch-lucent (scripts/install.sh --test installs it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("FVTRUST_PROGRESS", "0")

import torch  # noqa: E402

import fvtrust  # noqa: E402
from fvtrust.visualize.transforms import TransformSpec  # noqa: E402


def lucent_transforms(spec: TransformSpec, size: int):
    from fvtrust.visualize.lucent_compat import import_lucent

    _, _, T = import_lucent()

    def center_crop(x):
        h, w = x.shape[-2:]
        y0, x0 = (h - size) // 2, (w - size) // 2
        return x[..., y0:y0 + size, x0:x0 + size]

    return [T.pad(spec.pad, mode="constant", constant_value=spec.pad_value), T.jitter(spec.jitter1),
            T.random_scale(list(spec.scales)), T.random_rotate(list(spec.angles)), T.jitter(spec.jitter2),
            center_crop]


def run_lucent(model, layer, units, steps, batched: bool):
    from fvtrust.visualize.lucent_compat import import_lucent

    render, param, _ = import_lucent()
    import lucent.optvis.objectives as objectives

    c, h, w = model.input_shape
    tf = lucent_transforms(TransformSpec.standard(h), h)
    lname = "net_" + layer.replace(".", "_")
    grey = c == 1

    def param_f(batch):
        return lambda: param.image(w, h, batch=batch, decorrelate=not grey, channels=1 if grey else None)

    if batched:
        obj = sum(objectives.channel(lname, u, batch=i) for i, u in enumerate(units))
        render.render_vis(model, obj, param_f(len(units)), transforms=tf, thresholds=(steps,), preprocess=False,
                          progress=False, show_image=False, fixed_image_size=h)
    else:
        for u in units:
            render.render_vis(model, objectives.channel(lname, u), param_f(1), transforms=tf, thresholds=(steps,),
                              preprocess=False, progress=False, show_image=False, fixed_image_size=h)


def run_fvtrust(model, layer, units, steps, batched: bool):
    if batched:
        fvtrust.visualize(model, layer, units, steps=steps, objective="channel")
    else:
        for u in units:
            fvtrust.visualize(model, layer, [u], steps=steps, objective="channel")


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


CONTENDERS = ("lucent-single", "lucent-batch", "fvtrust-single", "fvtrust-batch")


def run_precision(model, layer, units, steps, precision):
    return fvtrust.visualize(model, layer, units, steps=steps, objective="channel", precision=precision)


def run_floor(model, layer, units, steps, precision):
    """Raw forward to `layer` + backward to the input, `steps` times: the network's own cost."""
    from fvtrust.models.hooks import LayerTap
    from fvtrust.visualize.fastpath import fast_inference
    from fvtrust.visualize.objectives import make_objective
    from fvtrust.visualize.render import _forward_precision, _nhwc_pays

    c, h, w = model.input_shape
    obj = make_objective("channel", layer)
    cl = _nhwc_pays(model.device, (h, w))
    x = torch.rand(len(units), c, h, w, generator=torch.Generator().manual_seed(0), requires_grad=True)
    u = torch.as_tensor(units)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with fast_inference(model, obj.layers, x[:1].detach(), channels_last=cl), LayerTap(model, [layer]) as tap:
            t0 = time.perf_counter()
            for _ in range(steps):
                xi = x.contiguous(memory_format=torch.channels_last) if cl else x
                with _forward_precision(precision, model.device):
                    acts = tap(xi)
                value = obj({k: a.float() for k, a in acts.items()}, u, u)
                torch.autograd.grad(-value.sum(), [x])
            return time.perf_counter() - t0
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def bench_precision(model, layer, units, steps, repeats, spec):
    """fp32 vs bf16 visualization, each against its own floor, interleaved in one run."""
    for prec in ("fp32", "bf16"):  # warm-up: oneDNN builds kernels per shape and dtype
        run_precision(model, layer, units, 2, prec)
        run_floor(model, layer, units, 2, prec)
    times = {k: [] for k in ("fp32", "bf16", "floor-fp32", "floor-bf16")}
    results = {}
    for _ in range(repeats):
        for prec in ("fp32", "bf16"):
            results[prec] = timed_result(run_precision, model, layer, units, steps, prec)
            times[prec].append(results[prec][0])
            times["floor-" + prec].append(run_floor(model, layer, units, steps, prec))
    best = {k: min(v) for k, v in times.items()}
    n = len(units)
    print(f"\n{spec} layer={layer} units={n} steps={steps}: precision (best of {repeats}, one run)")
    for prec in ("fp32", "bf16"):
        per, floor = best[prec] / steps / n * 1000, best["floor-" + prec] / steps / n * 1000
        print(f"  {prec}  fvtrust {best[prec]:7.2f} s ({per:7.2f} ms per image-step)   floor {floor:7.2f} ms "
              f"per image-step   fvtrust / floor {per / floor:5.2f}x")
    print(f"  bf16 vs fp32 speed-up: {best['fp32'] / best['bf16']:5.2f}x (floors: "
          f"{best['floor-fp32'] / best['floor-bf16']:5.2f}x)")
    a32, a16 = results["fp32"][1].objective[-1], results["bf16"][1].objective[-1]
    live = a32 != 0  # units a random network never activates give 0 / 0
    ratio = a16[live] / a32[live]
    per_unit = (f"bf16/fp32 per unit median {float(ratio.median()):.3f} (min {float(ratio.min()):.3f}, "
                f"{int(live.sum())} of {len(a32)} units active)") if live.any() else "no unit active"
    print(f"  activation reached (fp32-measured objective of the final images): fp32 mean {float(a32.mean()):.4g}, "
          f"bf16 mean {float(a16.mean()):.4g} (ratio {float(a16.mean() / a32.mean()):.3f}); {per_unit}")
    return best, results


def timed_result(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def quality(spec, steps, per_class, per_class_natural):
    """Class faithfulness and sanity-check score of fp32 vs bf16 logit visualizations on a trained model."""
    from fvtrust.sanity.analysis import run as sanity_run

    model = fvtrust.load_model(spec)
    layer = [lay.name for lay in fvtrust.list_layers(model)][-1]
    classes = list(range(model.num_classes))
    units = [c for c in classes for _ in range(per_class)]
    nat = fvtrust.natural("fashion-mnist", model=model).evaluation if spec == "fashion-cnn" else None
    from fvtrust.sanity.inputs import class_indices

    idx = class_indices(nat.targets(), classes, per_class_natural)
    x, y = nat.select(idx.tolist()).tensors()
    print(f"\nquality: {spec} layer={layer} (logits) {len(classes)} classes x {per_class} images, steps={steps}, "
          f"natural {len(x)} images")
    for prec in ("fp32", "bf16"):
        t, res = timed_result(lambda: fvtrust.visualize(model, layer, units, steps=steps, objective="neuron",
                                                        precision=prec))
        imgs = res.final
        with torch.no_grad():
            pred = model(imgs).argmax(1)
        faithful = float((pred == torch.as_tensor(units)).float().mean())
        vis = imgs.view(len(classes), per_class, *imgs.shape[1:])
        out = sanity_run(model, (x, y), vis, classes, per_class, metrics=("spearman",), pair_stride="all")
        score = out["metrics"]["spearman"]["normalized"]["summary"].get("mean", float("nan"))
        print(f"  {prec}: {t:6.1f} s  classified as their class {faithful:.3f}  mean logit reached "
              f"{float(res.objective[-1].mean()):.3f}  sanity score (mean normalized Spearman) {score:.4f}")


def bench(spec, layer, n_units, steps, repeats, contenders=CONTENDERS, precision=True):
    weights = "random" if spec.startswith("torchvision") else None
    torch.manual_seed(0)
    base = fvtrust.load_model(spec, weights=weights)
    # separate copies: lucent leaves a forward hook on every module after each render_vis,
    # which would slow down whoever runs next on the same module objects
    import copy

    lucent_model, fv_model = copy.deepcopy(base), copy.deepcopy(base)
    units = list(range(n_units))
    # warm-up for every contender at both batch sizes: oneDNN builds its kernels on the first call
    # for each new input shape (seconds at 224 px), which is not what we want to time
    for n in (1, n_units):
        run_fvtrust(fv_model, layer, units[:n], 3, True)
        run_lucent(lucent_model, layer, units[:n], 3, True)
    fns = {"lucent-single": (run_lucent, lucent_model, False), "lucent-batch": (run_lucent, lucent_model, True),
           "fvtrust-single": (run_fvtrust, fv_model, False), "fvtrust-batch": (run_fvtrust, fv_model, True)}
    times = {k: [] for k in contenders}
    for _ in range(repeats):  # interleaved so drifting machine load hits all contenders alike
        for k in contenders:
            fn, m, batched = fns[k]
            times[k].append(timed(fn, m, layer, units, steps, batched))
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{spec} layer={layer} units={n_units} steps={steps} threads={torch.get_num_threads()} "
          f"(best of {repeats})")
    for k, v in best.items():
        print(f"  {k:<15} {v:8.2f} s   ({v / steps / n_units * 1000:7.2f} ms per image-step)")
    for a, b in (("fvtrust-batch", "fvtrust-single"), ("fvtrust-batch", "lucent-single"),
                 ("fvtrust-batch", "lucent-batch"), ("fvtrust-single", "lucent-single")):
        if a in best and b in best:
            print(f"  {a} vs {b:<14}: {best[b] / best[a]:5.2f}x faster")
    if precision:
        bench_precision(fv_model, layer, units, steps, repeats, spec)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["fashion-cnn", "googlenet", "both"], default="both")
    ap.add_argument("--units", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="default: 512 for fashion-cnn, 32 for googlenet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    ap.add_argument("--no-precision", action="store_true", help="skip the fp32 vs bf16 section")
    ap.add_argument("--quality-model", default="fashion-cnn", help="trained model for class faithfulness and "
                    "the sanity score ('none' to skip)")
    ap.add_argument("--quality-steps", type=int, default=256)
    args = ap.parse_args()
    contenders = [c for c in args.contenders.split(",") if c]
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contenders {bad}; choose from {', '.join(CONTENDERS)}")
    prec = not args.no_precision
    if args.model in ("fashion-cnn", "both"):
        bench("fashion-cnn", "fc", args.units, args.steps or 512, args.repeats, contenders, prec)
    if args.model in ("googlenet", "both"):
        bench("torchvision:googlenet", "inception4a", args.units, args.steps or 32, args.repeats, contenders, prec)
    if prec and args.quality_model != "none":
        quality(args.quality_model, args.quality_steps, per_class=2, per_class_natural=20)


if __name__ == "__main__":
    main()
