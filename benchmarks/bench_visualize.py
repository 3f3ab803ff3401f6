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

    python benchmarks/bench_visualize.py                       # both models
    python benchmarks/bench_visualize.py --model googlenet --units 10 --steps 32
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


def bench(spec, layer, n_units, steps, repeats):
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
    times = {k: [] for k in ("lucent-single", "lucent-batch", "fvtrust-single", "fvtrust-batch")}
    for _ in range(repeats):  # interleaved so drifting machine load hits all contenders alike
        times["lucent-single"].append(timed(run_lucent, lucent_model, layer, units, steps, False))
        times["lucent-batch"].append(timed(run_lucent, lucent_model, layer, units, steps, True))
        times["fvtrust-single"].append(timed(run_fvtrust, fv_model, layer, units, steps, False))
        times["fvtrust-batch"].append(timed(run_fvtrust, fv_model, layer, units, steps, True))
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{spec} layer={layer} units={n_units} steps={steps} threads={torch.get_num_threads()} "
          f"(best of {repeats})")
    for k, v in best.items():
        print(f"  {k:<15} {v:8.2f} s   ({v / steps / n_units * 1000:7.2f} ms per image-step)")
    print(f"  fvtrust-batch vs fvtrust-single : {best['fvtrust-single'] / best['fvtrust-batch']:5.2f}x faster")
    print(f"  fvtrust-batch vs lucent-single  : {best['lucent-single'] / best['fvtrust-batch']:5.2f}x faster")
    print(f"  fvtrust-batch vs lucent-batch   : {best['lucent-batch'] / best['fvtrust-batch']:5.2f}x faster")
    print(f"  fvtrust-single vs lucent-single : {best['lucent-single'] / best['fvtrust-single']:5.2f}x faster")
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["fashion-cnn", "googlenet", "both"], default="both")
    ap.add_argument("--units", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="default: 512 for fashion-cnn, 32 for googlenet")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.model in ("fashion-cnn", "both"):
        bench("fashion-cnn", "fc", args.units, args.steps or 512, args.repeats)
    if args.model in ("googlenet", "both"):
        bench("torchvision:googlenet", "inception4a", args.units, args.steps or 32, args.repeats)


if __name__ == "__main__":
    main()
