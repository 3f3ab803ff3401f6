"""Side-by-side anchors: Horama's `maco` and faccent's `render_vis` (feature accentuation) on our model.

Both are optional extras (``pip install fvtrust[anchors]``, best in a venv of
their own: faccent pins kornia 0.4.1). Both optimize one image at a time, so
they run once per unit and replicate, with the same model, layer, unit
objective and step budget as fvtrust's batched methods; we time each call.

How they are run, and why:

* **Horama maco** (0.3.0) downloads its ImageNet spectrum into the working
  directory on first use, which fails offline. We run it in a temporary
  working directory that already holds ``spectrum_decorrelated.npy``: the
  magnitude spectrum fvtrust estimated from the same natural data (grey,
  repeated over Horama's three colour channels), so both MACOs use the same
  spectrum. Horama always makes RGB images; the model sees their channel mean
  (its grey input), which has 1/√3 of the per-channel contrast (the luminance
  weight of the colour matrix). Horama keeps the plain sigmoid (mean 0.5);
  fvtrust's MACO takes the natural mean and contrast (maco.py). At the model's own size we use near-full crops
  (``box_size=(0.9, 1.0)``; Horama's default 0.2-0.25 is for 1280-px canvases
  with 224-px crops), its 6 crops per step, noise 0.05, NAdam lr 1.0, and
  ``values_range=(0, 1)`` (our models take [0, 1] images).
* **faccent** (1.0.3) accentuation: ``render_vis`` with its ``fourier``
  parameterization started at the same seed image fvtrust's accentuation
  uses, ``accent_reg_layer`` = the same proximity layer, ``accent_reg_alpha``
  = our weight (faccent rescales it by its gradient-ratio balance), 16
  transforms per step (its default), the model wrapped to take faccent's RGB
  images as their channel mean.

Where the packages are not importable in this interpreter, ``python=`` (or
``$FVTRUST_ANCHORS_PYTHON``, or ``~/.venvs/fvtrust-anchors/bin/python`` when it
exists) runs them in that interpreter as a subprocess (``python -m
fvtrust.compare.anchors``) on a copy of the model's weights.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .methods import MethodRun, unit_values

ANCHORS = ("horama", "faccent")
NAMES = {"horama": "horama-maco", "faccent": "faccent"}


class _GreyIn(nn.Module):
    """RGB in [0, 1] -> the wrapped grey model (channel mean); faccent's size/range attributes."""

    def __init__(self, model):
        super().__init__()
        self.m = model
        self.model_input_size = tuple(model.input_shape[1:])
        self.model_input_range = (0.0, 1.0)

    def forward(self, x):
        if self.m.input_shape[0] == 1 and x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        return self.m(x)


def _unit_objective(model, layer, unit, objective):
    from ..models.hooks import forward_to
    from ..visualize.objectives import make_objective

    obj = make_objective(objective, layer)

    def score(images):
        if model.input_shape[0] == 1 and images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        acts = forward_to(model, images, list(obj.layers))
        return obj(acts, torch.full((len(images),), unit, device=images.device)).mean()

    return score


def horama_maco(model, layer, units, *, replicates, steps, seed, objective, magnitude: torch.Tensor):
    import horama

    h, w = model.input_shape[1:]
    imgs, secs = [], []
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        mag = magnitude if magnitude.shape[0] == 3 else magnitude[:1].expand(3, -1, -1)
        np.save("spectrum_decorrelated.npy", mag.numpy().astype(np.float32))
        for u in units:
            for r in range(replicates):
                torch.manual_seed(seed * 1_000_003 + u * 101 + r)
                t0 = time.perf_counter()
                img, _alpha = horama.maco(_unit_objective(model, layer, u, objective), total_steps=steps,
                                          learning_rate=1.0, image_size=h, model_input_size=h, noise=0.05,
                                          values_range=(0.0, 1.0), crops_per_iteration=6, box_size=(0.9, 1.0),
                                          device=str(model.device))
                secs.append(time.perf_counter() - t0)
                img = img.detach().cpu().clamp(0, 1)
                imgs.append(img.mean(0, keepdim=True) if model.input_shape[0] == 1 else img)
    settings = {"package": "horama " + _version("horama"), "learning_rate": 1.0, "optimizer": "NAdam",
                "crops_per_iteration": 6, "box_size": [0.9, 1.0], "noise": 0.05,
                "spectrum": "fvtrust's, from the same natural data (Horama's own file needs a download)"}
    return _as_run(NAMES["horama"], model, layer, units, replicates, steps, imgs, secs, objective, settings)


def faccent_accentuation(model, layer, units, *, replicates, steps, seed, objective, seeds: torch.Tensor,
                         proximity_layer: str, weight: float):
    from faccent import objectives, param, render

    h, w = model.input_shape[1:]
    wrapped = _GreyIn(model).eval()
    name = lambda lay: "m_net_" + lay.replace(".", "_")  # noqa: E731  faccent's names: children joined by _
    from ..models.hooks import layer_output

    with torch.no_grad():  # faccent's neuron() needs a spatial map; on a flat layer (logits) channel() is the same value
        flat = layer_output(model, seeds[:1].to(model.device), layer).dim() == 2
    fn = objectives.channel if objective == "channel" or flat else objectives.neuron
    imgs, secs = [], []
    i = 0
    for u in units:
        for r in range(replicates):
            torch.manual_seed(seed * 1_000_003 + u * 101 + r)
            np.random.seed((seed * 1_000_003 + u * 101 + r) % 2**32)
            s = seeds[i].expand(3, -1, -1).contiguous() if seeds.shape[1] == 1 else seeds[i]
            i += 1
            obj = fn(name(layer), u)
            t0 = time.perf_counter()
            prm = param.fourier(init_img=s, forward_init_img=True, img_size=(h, w), device=model.device)
            out = render.render_vis(wrapped, obj, parameterizer=prm, out_thresholds=[steps],
                                    inline_thresholds=[], model_input_size=(h, w), model_input_range=(0.0, 1.0),
                                    img_size=(h, w), accent_reg_layer=name(proximity_layer),
                                    accent_reg_alpha=weight, progress=False)
            secs.append(time.perf_counter() - t0)
            img = _first_image(out)
            imgs.append(img.mean(0, keepdim=True) if model.input_shape[0] == 1 else img)
    settings = {"package": "faccent " + _version("faccent"), "parameterizer": "fourier (init_img)",
                "accent_reg_layer": proximity_layer, "accent_reg_alpha": weight, "nb_transforms": 16}
    return _as_run(NAMES["faccent"], model, layer, units, replicates, steps, imgs, secs, objective, settings)


def _first_image(out) -> torch.Tensor:
    """render_vis returns a dict (or tuple) with the images at each threshold; take the optimized one (batch 0)."""
    imgs = out["images"] if isinstance(out, dict) else out[0]
    last = imgs[-1]
    t = torch.as_tensor(np.asarray(last)) if not isinstance(last, torch.Tensor) else last
    t = t.detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    if t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
        t = t.permute(2, 0, 1)
    return t.clamp(0, 1)


def _as_run(name, model, layer, units, replicates, steps, imgs, secs, objective, settings):
    images = torch.stack(imgs).float()
    rep = [u for u in units for _ in range(replicates)]
    values = unit_values(model, layer, rep, images, objective)
    shape = (len(units), replicates)
    settings["seconds_per_call"] = secs
    return MethodRun(name, images.view(*shape, *images.shape[1:]), values.view(shape), float(sum(secs)),
                     len(rep) * steps, None, settings)


@contextlib.contextmanager
def _chdir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _version(pkg):
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001  metadata missing: report, don't fail
        return "?"


def _importable(pkg) -> bool:
    return importlib.util.find_spec(pkg) is not None


def anchor_python(python=None) -> str | None:
    cand = python or os.environ.get("FVTRUST_ANCHORS_PYTHON")
    if cand:
        return cand
    default = Path.home() / ".venvs" / "fvtrust-anchors" / "bin" / "python"
    return str(default) if default.exists() else None


def run_anchors(anchors, model, layer, units, *, replicates, steps, seed, objective, spectrum, python=None,
                seeds=None, proximity_layer=None, weight=1.0) -> dict:
    """{anchor name: MethodRun, or the error text of an anchor that could not run}."""
    from ..visualize.accentuate import top_seeds
    from ..data import natural

    anchors = [a.strip() for a in (anchors.split(",") if isinstance(anchors, str) else anchors) if a.strip()]
    out = {}
    magnitude = spectrum.magnitude(tuple(model.input_shape))
    if "faccent" in anchors and seeds is None:
        fit = natural(spectrum.data, model=model, data_dir=spectrum.data_dir,
                      class_index=spectrum.class_index).fit.nonempty(spectrum.limit)[0]
        seeds, _ = top_seeds(model, layer, units, fit, objective=objective, k=replicates)
    kw = dict(replicates=replicates, steps=steps, seed=seed, objective=objective)
    for a in anchors:
        if a not in ANCHORS:
            out[a] = f"unknown anchor {a!r}; choose from {', '.join(ANCHORS)}"
            continue
        extra = ({"magnitude": magnitude} if a == "horama" else
                 {"seeds": seeds, "proximity_layer": proximity_layer or layer, "weight": weight})
        try:
            if _importable(a):
                fn = horama_maco if a == "horama" else faccent_accentuation
                out[NAMES[a]] = fn(model, layer, units, **kw, **extra)
            else:
                py = anchor_python(python)
                if py is None:
                    out[NAMES[a]] = (f"{a} is not installed here; pip install 'fvtrust[anchors]' (ideally in its own "
                                     "venv, then set FVTRUST_ANCHORS_PYTHON)")
                    continue
                out[NAMES[a]] = _subprocess(py, a, model, layer, units, kw, extra)
        except Exception as e:  # noqa: BLE001  an anchor failing is a result to report, not a crash
            out[NAMES[a]] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
    return out


def _subprocess(py, anchor, model, layer, units, kw, extra) -> MethodRun:
    with tempfile.TemporaryDirectory() as tmp:
        job = {"anchor": anchor, "spec": model.spec, "input_shape": list(model.input_shape),
               "num_classes": model.num_classes, "layer": layer, "units": list(units), "kw": kw,
               "extra": {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}}
        torch.save({"state": model.state_dict(), **{k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}},
                   Path(tmp) / "inputs.pt")
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([py, "-m", "fvtrust.compare.anchors", tmp], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(f"{anchor} in {py}: " + (lines[-1] if lines else f"exit {p.returncode}"))
        res = torch.load(Path(tmp) / "run.pt", weights_only=False)
    run = MethodRun(**res)
    run.settings["python"] = py
    return run


def _worker(tmp: str):
    """Subprocess side: rebuild the model from its spec and weights, run one anchor, save the MethodRun fields."""
    from dataclasses import asdict

    from ..models import load_model

    job = json.loads((Path(tmp) / "job.json").read_text())
    inputs = torch.load(Path(tmp) / "inputs.pt", weights_only=False)
    try:  # the weights come from the parent; "random" avoids loading (or downloading) them twice
        model = load_model(job["spec"], weights="random")
    except Exception:  # noqa: BLE001  specs without a random option (saved directories)
        model = load_model(job["spec"])
    model.load_state_dict(inputs.pop("state"))
    model.eval()
    fn = horama_maco if job["anchor"] == "horama" else faccent_accentuation
    run = fn(model, job["layer"], job["units"], **job["kw"], **job["extra"], **inputs)
    torch.save(asdict(run), Path(tmp) / "run.pt")


if __name__ == "__main__":
    _worker(sys.argv[1])
