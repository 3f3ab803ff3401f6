"""Gradient slingshots: fine-tune a copy of a model so one unit's visualization shows a target.

No architecture change: only weights move. Each step takes a natural batch
(L_pres against the frozen original) and a batch of tunnel points (L_manip,
see loss.py); Adam minimizes (1 − α)·L_manip + α·L_pres. The model stays in
eval mode throughout (BatchNorm statistics frozen, no dropout), so the
function that is fine-tuned is the one that is visualized and evaluated.

fvtrust's extensions of the paper's recipe (both on by default, both can be
switched off to get the paper's exactly): L_manip sees its tunnel points
through the visualization's random transforms (`transforms`), and part of
the points (`on_policy`) come from the visualization's own trajectories on
the model being fine-tuned, refreshed every `policy_every` steps
(onpolicy.py says why: the straight tunnel alone is not where Adam goes).
A third extension, of L_pres (`protect_top`, `protect_batch`; off when 0):
every natural batch also gets `protect_batch` images drawn from the original
unit's `protect_top` highest-scoring fit images. L_pres's formula is
unchanged; it is only weighted towards the images where the unit's natural
ranking (its top-k, what a dataset-example explanation shows) is read, which
uniform batches visit rarely (256 of 10,240 images: 2.5 %).
A fourth, also of L_pres (`rank_weight`; off when 0): a hinge (loss.rank_loss)
that keeps every natural image of each batch on its side of the original
unit's top-`rank_fraction` boundary τ on the fit images. It costs nothing
while no image crosses τ, so, unlike more MSE weight, it leaves the
manipulation free everywhere the unit's ranking is not read.

Randomness is drawn per epoch from (seed, epoch), and the trajectory buffer
is rebuilt at every epoch's start: a run resumed from an epoch checkpoint
continues exactly as the uninterrupted run would have.

Hyperparameters (defaults, for the 28-px fashion-cnn): see SlingshotConfig and the
README section "Gradient slingshots" for how they were scaled from the
paper's ResNet-50 settings (α = 0.64, w = 0.01, γ = 200, lr 1e-6, 10 epochs).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import FvtrustError
from ...io import atomic_write_bytes, atomic_write_json
from ...models.hooks import LayerTap
from ...progress import progress
from ...visualize import transforms as T
from .loss import (VARIANTS, PointTransforms, Tunnel, auto_gamma, manipulation_loss, preservation_loss,
                   rank_loss, slingshot_loss, unit_activation)
from .onpolicy import Rollout

MANIPULATION = "gradient_slingshot"


@dataclass
class SlingshotConfig:
    """Everything that determines the fine-tuning (recorded in report.json and the model recipe)."""

    variant: str = "gradient"
    param: str = "fft"
    alpha: float = 0.64
    w: float = 0.5  # fashion-cnn (README): at the paper's 0.01 the unit's top-100 natural images drifted
    gamma: float | None = None  # None: auto_gamma (gamma_ratio x the original's start gradient / rms(x_t))
    gamma_ratio: float = 40.0
    lr: float = 3e-4
    epochs: int = 10
    batch_size: int = 128   # natural images per step: L_pres on 128 rather than 32 kept top-100 Jaccard higher
    tunnel_batch: int = 16
    fit_images: int = 10240  # 10 epochs x 80 steps
    tunnel_width: float = 1.0
    relative: bool = False
    # fvtrust's extensions (onpolicy.py): transforms = "none" and on_policy = 0 give the paper's recipe
    transforms: str = "standard"  # the visualization's transforms, applied to L_manip's points ("standard" | "none")
    on_policy: float = 0.5        # fraction of each step's tunnel points taken from visualization trajectories
    policy_every: int = 25        # fine-tuning steps between trajectory refreshes (and at every epoch's start)
    policy_starts: int = 4        # visualizations run per refresh (fresh seeded noise)
    policy_steps: int = 64        # steps of each (Adam at policy_lr, the tunnel's parameterization)
    policy_lr: float = 0.05       # fvtrust.visualize's default lr
    # a refresh continues the last one's visualizations until they ran policy_horizon steps, then restarts from
    # fresh noise; = policy_steps (the default): fresh every time. 512 (the standard visualization's length, with
    # policy_steps 128: 4 refreshes an epoch) raised Pearson but lowered Jaccard (README): not the default yet
    policy_horizon: int = 64
    # fvtrust's extension of L_pres ("keep natural behaviour" where the unit's ranking is read): protect_batch
    # images of every natural batch are drawn from the original unit's protect_top highest-scoring fit images
    protect_top: int = 256    # the pool (2.5 % of the 10,240 fit images); only used when protect_batch > 0
    protect_batch: int = 0    # off by default (fc:0 lost Pearson with it, README); block4: 32
    # fvtrust's rank-aware extension of L_pres (loss.rank_loss; 0 = the paper's L_pres): rank_weight x a hinge that
    # keeps every natural image on its side of the original unit's top-`rank_fraction` boundary on the fit images
    rank_weight: float = 0.0
    rank_fraction: float = 0.01  # the report's top-100 of 10,000 held-out images
    lr_schedule: str = "constant"  # "cosine": lr decays to 0 over all steps (a function of the step: resume exact)
    seed: int = 0

    def check(self):
        if self.variant not in VARIANTS:
            raise FvtrustError(f"unknown slingshot variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        if self.param not in ("fft", "pixel"):
            raise FvtrustError(f"unknown parameterization {self.param!r}; choose fft or pixel")
        if not 0.0 <= self.alpha < 1.0:
            raise FvtrustError(f"alpha must lie in [0, 1) (alpha = 1 leaves nothing to manipulate), got {self.alpha}")
        if not 0.0 <= self.w <= 1.0:
            raise FvtrustError(f"w must lie in [0, 1], got {self.w}")
        if self.transforms not in ("standard", "none"):
            raise FvtrustError(f"unknown transforms {self.transforms!r}; choose standard or none")
        if self.lr_schedule not in ("constant", "cosine"):
            raise FvtrustError(f"unknown lr schedule {self.lr_schedule!r}; choose constant or cosine")
        if self.protect_batch and not self.protect_top:
            raise FvtrustError("protect_batch > 0 needs protect_top > 0 (the pool it draws from)")
        for name in ("protect_top", "protect_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FvtrustError(f"{name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.rank_weight, (int, float)) and not isinstance(self.rank_weight, bool)
                and self.rank_weight >= 0):
            raise FvtrustError(f"rank_weight must be a number >= 0, got {self.rank_weight!r}")
        if not (isinstance(self.rank_fraction, (int, float)) and 0.0 < self.rank_fraction < 1.0):
            raise FvtrustError(f"rank_fraction must lie in (0, 1), got {self.rank_fraction!r}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise FvtrustError(f"on_policy must lie in [0, 1], got {self.on_policy}")
        for name in ("gamma", "gamma_ratio", "lr", "tunnel_width", "policy_lr"):
            if getattr(self, name) is None and name == "gamma":
                continue
            if not getattr(self, name) > 0:
                raise FvtrustError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "tunnel_batch", "fit_images", "policy_every", "policy_starts",
                     "policy_steps", "policy_horizon"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FvtrustError(f"{name} must be a positive integer, got {v!r}")
        return self

    def key(self, extra: dict) -> str:
        """A short hash of the run's identity: a checkpoint of a different run is never resumed.

        `epochs` is left out: epoch e's randomness depends on (seed, e) only, so
        a finished run can be extended by more epochs exactly. Not with the
        cosine schedule (its lr depends on the total), where it is kept in.
        """
        own = {k: v for k, v in asdict(self).items() if k != "epochs" or self.lr_schedule == "cosine"}
        text = json.dumps({**own, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_natural(data, model, *, limit: int | None = None):
    """The one entry from this package into fvtrust.data: `data` -> a NaturalData.

    Fine-tuning reads its `fit` part; the report measures on its `heldout`
    part (Fashion-MNIST: train / test; a folder or `pictures`: disjoint seeded
    halves; a bare tensor: fit only, so the report needs a real source).
    """
    from ...data import natural

    return natural(data, model=model, limit=limit)


def resolve_target(target, model) -> torch.Tensor:
    """A scikit-image picture name, an image path, or a C x H x W tensor in [0, 1], at the model's size."""
    if isinstance(target, torch.Tensor):
        if tuple(target.shape) != tuple(model.input_shape):
            raise FvtrustError(f"target has shape {tuple(target.shape)}; the model expects {tuple(model.input_shape)}")
        if target.min() < 0 or target.max() > 1:
            raise FvtrustError("target tensor must lie in [0, 1]")
        return target.float()
    if not isinstance(target, str) or not target:
        raise FvtrustError("target must be a picture name, an image path or a C x H x W tensor")
    from ...data import load_picture

    return load_picture(target, model.input_shape)


def check_unit(model, layer: str, unit) -> int:
    from ...models.layers import layer_units

    n = layer_units(model, layer)
    if isinstance(unit, bool) or not isinstance(unit, int):
        try:
            unit = int(unit)
        except (TypeError, ValueError):
            raise FvtrustError(f"unit must be one integer, got {unit!r}") from None
    if not 0 <= unit < n:
        raise FvtrustError(f"unit {unit} out of range for {layer}: valid units are 0..{n - 1}")
    return unit


def rebuild(base, **_ignored):
    """Builder for saved slingshot models: the structure is the base model's (only weights changed)."""
    model = copy.deepcopy(base)
    model.eval()
    return model


def load_saved_slingshot(path):
    """(slingshot model, its original, its settings) from a directory `fvtrust fool slingshot` saved (OUT/model).

    The settings are what the fine-tune recorded (layer, unit, target, param,
    ...); the original is reloaded from the recorded base spec. Anything else
    (a missing directory, a clean or otherwise manipulated model) is an
    FvtrustError, so a tool reading slingshots says in one line what it got.
    """
    from ...models import load_model

    fooled = load_model(str(path))
    recipe = getattr(fooled, "recipe", None) or {}
    if recipe.get("manipulation") != MANIPULATION:
        raise FvtrustError(f"{path} is not a saved gradient slingshot (fvtrust fool slingshot ... --out DIR "
                           "writes DIR/model)")
    info = dict(recipe.get("extra", {}))
    original = load_model(recipe.get("base_spec") or "fashion-cnn")
    return fooled, original, info


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def _save_checkpoint(directory: Path, epoch: int, key: str, model, opt, history) -> None:
    """Weights + Adam state for `epoch`, then the JSON that points at them (the commit point)."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if st:
            for name, v in st.items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous().clone()
    name = f"epoch-{epoch:03d}.safetensors"
    atomic_write_bytes(directory / name, save(tensors))
    atomic_write_json(directory / "checkpoint.json", {"epoch": epoch, "key": key, "weights": name,
                                                     "history": history})
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(directory: Path, key: str, model, opt):
    """(epoch, history) of the last finished epoch of *this* run, or (0, []) if none."""
    from safetensors.torch import load_file

    meta_path = directory / "checkpoint.json"
    if not meta_path.is_file():
        return 0, []
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FvtrustError(f"unreadable slingshot checkpoint {meta_path}: {e}") from None
    if meta.get("key") != key:
        raise FvtrustError(f"{directory} holds a checkpoint of a different slingshot run (other settings); "
                           "use another --out or delete it")
    try:
        tensors = load_file(str(directory / meta["weights"]))
    except Exception as e:  # noqa: BLE001
        raise FvtrustError(f"cannot read slingshot checkpoint {directory / meta['weights']}: {e}") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    params = opt.param_groups[0]["params"]
    for key_name, v in tensors.items():
        if key_name.startswith("opt."):
            _, i, name = key_name.split(".", 2)
            opt.state[params[int(i)]][name] = v.to(params[int(i)].device)
    return int(meta["epoch"]), list(meta.get("history", []))


def slingshot(model, layer: str, unit: int, *, target, data=None, config: SlingshotConfig | None = None,
              checkpoint_dir=None, on_epoch=None, **overrides):
    """A fine-tuned copy of `model` whose `unit` of `layer` visualizes `target` (the original is untouched).

    target: a scikit-image picture name, an image path, or a C x H x W tensor
    in [0, 1]. data: anything `fvtrust.data.natural` takes (None: the model's
    default data); fine-tuning uses its fit part, the first `fit_images` images.
    model: a spec, an FvModel or a plain nn.Module (`fvtrust.models.as_model`).
    config / overrides: SlingshotConfig fields (variant, alpha, w, gamma, lr,
    epochs, ...). checkpoint_dir: write a checkpoint after every epoch and
    resume from the last one of the same run. on_epoch(epoch, record) is
    called after each epoch. The result carries `slingshot_info` (settings,
    per-epoch losses, seconds).
    """
    from ...models import as_model

    unknown = sorted(set(overrides) - set(SlingshotConfig.__dataclass_fields__))
    if unknown:
        raise FvtrustError(f"unknown slingshot setting(s) {', '.join(unknown)}; known: "
                           f"{', '.join(SlingshotConfig.__dataclass_fields__)}")
    cfg = SlingshotConfig(**{**asdict(config or SlingshotConfig()), **overrides}).check()
    model = as_model(model, example=data)
    unit = check_unit(model, layer, unit)
    target_image = resolve_target(target, model)
    fit = resolve_natural(data, model).fit
    fit_x = fit.tensors(cfg.fit_images, desc="read fit images")[0]
    fit_desc = dict(fit.describe(), n_used=len(fit_x))
    device = model.device
    tunnel = Tunnel.build(target_image, cfg.param, width=cfg.tunnel_width).to(device)
    tspec = T.resolve_transforms(cfg.transforms, int(model.input_shape[1]))
    if isinstance(tspec, T.CropSpec):
        raise FvtrustError("the slingshot's L_manip takes standard or no transforms, not MACO's crops")

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    if cfg.gamma is None:
        with LayerTap(frozen, [layer]) as tap:
            gamma = auto_gamma(lambda im: tap(im)[layer], tunnel, unit, cfg.gamma_ratio)
        if cfg.variant == "activation":  # same slope: ∇ₓ γ(1 − MSE(x, x_t)) = (2γ / D)·(x_t − x)
            gamma *= tunnel.target.numel() / 2.0
    else:
        gamma = float(cfg.gamma)
    new = copy.deepcopy(model).eval()
    params = [p for p in new.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    target_name = target if isinstance(target, str) else "tensor"
    key = cfg.key({"spec": getattr(model, "spec", "?"), "layer": layer, "unit": unit, "target": target_name,
                   "fit": fit_desc["source"],
                   "n_fit": len(fit_x), "gamma_used": gamma})  # γ too: a rule change is another run
    start_epoch, history = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        start_epoch, history = _load_checkpoint(ckpt, key, new, opt)
        if start_epoch > cfg.epochs:
            raise FvtrustError(f"{ckpt} already holds epoch {start_epoch} of this run, more than the {cfg.epochs} "
                               "asked for; ask for at least that many epochs or use another --out")
    steps = (len(fit_x) + cfg.batch_size - 1) // cfg.batch_size
    protect = rank = None
    if cfg.protect_batch or cfg.rank_weight:  # the original unit's scores on the fit images
        with torch.no_grad(), LayerTap(frozen, [layer]) as tap:
            scores = torch.cat([unit_activation(tap(fit_x[i:i + 512].to(device))[layer], unit).float().cpu()
                                for i in range(0, len(fit_x), 512)])
        if cfg.protect_batch:  # its top fit images (its natural ranking is read there)
            protect = torch.topk(scores, min(cfg.protect_top, len(fit_x))).indices
        if cfg.rank_weight:  # its top-K boundary τ (loss.rank_loss)
            k = max(1, int(round(cfg.rank_fraction * len(fit_x))))
            rank = float(torch.topk(scores, k).values[-1])
    total_steps = cfg.epochs * steps
    t0 = time.perf_counter()
    bar = progress(total=(cfg.epochs - min(start_epoch, cfg.epochs)) * steps, desc=f"slingshot {layer}:{unit}",
                   unit="step")
    try:
        with LayerTap(new, [layer]) as tap_new, LayerTap(frozen, [layer]) as tap_old:
            def forward(images):
                return tap_new(images)[layer]

            for epoch in range(start_epoch + 1, cfg.epochs + 1):
                g = _epoch_generator(cfg.seed, epoch)
                order = torch.randperm(len(fit_x), generator=g)
                point_tf = (PointTransforms(tspec, np.random.default_rng(int(torch.randint(2**62, (1,), generator=g))))
                            if tspec is not None else None)
                n_on = int(round(cfg.tunnel_batch * cfg.on_policy))
                sums = {"manip": 0.0, "pres": 0.0, "total": 0.0}
                rollout = None  # rebuilt at every epoch's start: resume stays exact
                for s in range(steps):
                    if n_on and s % cfg.policy_every == 0:  # on-policy points from the model as it is now
                        if rollout is None or rollout.steps_run >= cfg.policy_horizon:
                            rollout = Rollout(tunnel, starts=cfg.policy_starts, lr=cfg.policy_lr, transforms=tspec,
                                              generator=g)
                        rollout.run(forward, unit, min(cfg.policy_steps, cfg.policy_horizon - rollout.steps_run))
                        buffer = rollout.points  # the whole trajectories so far (DAgger aggregates)
                    if cfg.lr_schedule == "cosine":
                        done = (epoch - 1) * steps + s
                        for group in opt.param_groups:
                            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done / total_steps))
                    idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                    if protect is not None:
                        idx = torch.cat([idx, protect[torch.randint(len(protect), (cfg.protect_batch,), generator=g)]])
                    xb = fit_x[idx].to(device)
                    with torch.no_grad():
                        orig = tap_old(xb)[layer]
                    acts = forward(xb)
                    l_pres = preservation_loss(acts, orig, unit, cfg.w, cfg.relative)
                    if rank is not None:
                        l_pres = l_pres + cfg.rank_weight * rank_loss(unit_activation(acts, unit),
                                                                      unit_activation(orig, unit), rank)
                    x = tunnel.sample(cfg.tunnel_batch - n_on, g)
                    if n_on:
                        x = torch.cat([x, buffer[torch.randint(len(buffer), (n_on,), generator=g).to(buffer.device)]])
                    l_manip = manipulation_loss(forward, tunnel, x, unit, gamma, cfg.variant, relative=cfg.relative,
                                                transform=point_tf)
                    loss = slingshot_loss(l_manip, l_pres, cfg.alpha)
                    if not torch.isfinite(loss):
                        raise FvtrustError(f"slingshot loss became {float(loss)} at epoch {epoch}, step {s + 1}; "
                                           "lower --lr or --gamma")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for k, v in (("manip", l_manip), ("pres", l_pres), ("total", loss)):
                        sums[k] += float(v.detach()) / steps
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, manip=f"{float(l_manip.detach()):.3g}",
                                    pres=f"{float(l_pres.detach()):.3g}")
                record = {"epoch": epoch, "loss_manip": sums["manip"], "loss_pres": sums["pres"],
                          "loss": sums["total"], "seconds": time.perf_counter() - t0}
                history.append(record)
                if ckpt is not None:
                    _save_checkpoint(ckpt, epoch, key, new, opt, history)
                if on_epoch is not None:
                    on_epoch(epoch, record)
    finally:
        bar.close()
    for p in new.parameters():
        p.requires_grad_(False)
    new.eval()
    new.slingshot_info = {"layer": layer, "unit": unit, "target": target_name, **asdict(cfg), "gamma_used": gamma,
                          "fit_data": fit_desc, "resumed_from_epoch": start_epoch, "history": history,
                          "seconds_this_run": time.perf_counter() - t0, "key": key}
    return new
