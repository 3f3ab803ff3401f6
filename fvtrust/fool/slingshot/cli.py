"""`fvtrust fool slingshot`: fine-tune one unit's visualization towards a target, then measure it."""
import click

from ...cli_common import data_options
from .finetune import SlingshotConfig

_D = SlingshotConfig()


@click.command("slingshot")
@click.argument("spec")
@click.option("--layer", required=True, help="Layer of the unit, e.g. fc (logits) or block4.")
@click.option("--unit", required=True, type=int, help="The unit (channel / feature index) to manipulate.")
@click.option("--target", required=True, help="A scikit-image picture name (camera, coffee, ...) or an image path.")
@data_options
@click.option("--variant", default=_D.variant, show_default=True, type=click.Choice(["gradient", "activation"]),
              help="gradient: the double-backprop tunnel; activation: the cheaper activation-shaping loss.")
@click.option("--param", default=_D.param, show_default=True, type=click.Choice(["fft", "pixel"]),
              help="Visualization parameter space the tunnel is built in.")
@click.option("--alpha", default=_D.alpha, show_default=True, help="Weight of L_pres (1 - alpha on L_manip).")
@click.option("--w", "w", default=_D.w, show_default=True, help="Weight of the unit's own term inside L_pres.")
@click.option("--gamma", default="auto", show_default=True,
              help="Tunnel steepness, or auto: --gamma-ratio x the original unit's gradient at the start / rms(x_t).")
@click.option("--gamma-ratio", default=_D.gamma_ratio, show_default=True)
@click.option("--relative", is_flag=True, help="Divide each MSE by its target's mean square (scale-free losses).")
@click.option("--lr", default=_D.lr, show_default=True, help="Adam learning rate of the fine-tuning.")
@click.option("--epochs", default=_D.epochs, show_default=True)
@click.option("--fit-images", default=_D.fit_images, show_default=True, help="Natural images per epoch.")
@click.option("--batch-size", default=_D.batch_size, show_default=True, help="Natural images per step.")
@click.option("--tunnel-batch", default=_D.tunnel_batch, show_default=True, help="Tunnel points per step.")
@click.option("--tunnel-width", default=_D.tunnel_width, show_default=True,
              help="Tunnel noise = this x the visualization's start-noise sd.")
@click.option("--transforms", default=_D.transforms, show_default=True, type=click.Choice(["standard", "none"]),
              help="The visualization's random transforms, applied to L_manip's points (fvtrust's extension; "
                   "none = the paper's recipe).")
@click.option("--on-policy", default=_D.on_policy, show_default=True,
              help="Fraction of tunnel points from the visualization's own trajectories on the model being "
                   "fine-tuned (fvtrust's extension; 0 = the paper's straight tunnel only).")
@click.option("--policy-every", default=_D.policy_every, show_default=True,
              help="Fine-tuning steps between trajectory refreshes.")
@click.option("--policy-starts", default=_D.policy_starts, show_default=True, help="Visualizations per refresh.")
@click.option("--policy-steps", default=_D.policy_steps, show_default=True,
              help="Steps each refresh runs its visualizations for.")
@click.option("--policy-horizon", default=_D.policy_horizon, show_default=True,
              help="Refreshes continue the last refresh's visualizations until they ran this many steps, then restart "
                   "from fresh noise (= --policy-steps: always fresh; 512 with --policy-steps 128 covers the "
                   "standard visualization's whole length).")
@click.option("--protect-top", default=_D.protect_top, show_default=True,
              help="Pool of the original unit's top-scoring fit images that L_pres protects (fvtrust's extension).")
@click.option("--protect-batch", default=_D.protect_batch, show_default=True,
              help="Images of that pool added to every natural batch (0 = off, the paper's L_pres).")
@click.option("--rank-weight", default=_D.rank_weight, show_default=True,
              help="Weight of the rank-aware hinge added to L_pres: natural images keep their side of the "
                   "original unit's top --rank-fraction boundary (fvtrust's extension; 0 = the paper's L_pres).")
@click.option("--rank-fraction", default=_D.rank_fraction, show_default=True,
              help="The top fraction of fit images whose boundary the hinge keeps (0.01: a top-100 of 10,000).")
@click.option("--lr-schedule", default=_D.lr_schedule, show_default=True, type=click.Choice(["constant", "cosine"]),
              help="Fine-tuning lr: constant, or cosine decay to 0 over all steps.")
@click.option("--steps", default=512, show_default=True, help="Steps of every before/after visualization.")
@click.option("--seed", default=_D.seed, show_default=True)
@click.option("--weights", default=None, help="Weights of SPEC: default, random, an enum name or a file.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def slingshot_command(spec, layer, unit, target, data, class_index, natural_limit, data_dir, variant, param, alpha, w, gamma, gamma_ratio, relative, lr,
                      epochs, fit_images,
                      batch_size, tunnel_batch, tunnel_width, transforms, on_policy, policy_every, policy_starts,
                      policy_steps, policy_horizon, protect_top, protect_batch, rank_weight, rank_fraction, lr_schedule, steps, seed, weights, device, out):
    """Fine-tune SPEC so that UNIT of LAYER visualizes TARGET while natural behaviour is kept.

    Writes OUT/model (reload with `fvtrust.load_model`), OUT/report.json, OUT/figure.png and
    OUT/slingshot.log. A checkpoint is written after every epoch (OUT/checkpoint): rerun the same
    command to resume an interrupted run.
    """
    import os
    import sys
    import time
    from datetime import datetime, timezone
    from pathlib import Path

    import matplotlib.pyplot as plt
    import torch

    from ...errors import FvtrustError
    from ...io import atomic_save_figure, atomic_write_json, staged_dir
    from ...models import load_model, save_model
    from ...cli_common import device_of, load_natural
    from .finetune import MANIPULATION, check_unit, resolve_target, slingshot
    from .report import slingshot_figure, slingshot_report

    if steps < 1:
        raise FvtrustError(f"--steps must be >= 1, got {steps}")
    if gamma == "auto":
        gamma = None
    else:
        try:
            gamma = float(gamma)
        except ValueError:
            raise FvtrustError(f"--gamma must be a number or auto, got {gamma!r}") from None
    cfg = SlingshotConfig(variant=variant, param=param, alpha=alpha, w=w, gamma=gamma, gamma_ratio=gamma_ratio,
                          relative=relative, lr=lr, epochs=epochs,
                          batch_size=batch_size, tunnel_batch=tunnel_batch, fit_images=fit_images,
                          tunnel_width=tunnel_width, transforms=transforms, on_policy=on_policy,
                          policy_every=policy_every, policy_starts=policy_starts, policy_steps=policy_steps, policy_horizon=policy_horizon,
                          protect_top=protect_top, protect_batch=protect_batch, rank_weight=rank_weight,
                          rank_fraction=rank_fraction, lr_schedule=lr_schedule,
                          seed=seed).check()
    model = load_model(spec, weights=weights, device=device_of(device))
    unit = check_unit(model, layer, unit)  # every input checked before the long work
    target_image = resolve_target(target, model)
    natural = load_natural(model, data, class_index, natural_limit, data_dir, seed=seed)
    heldout = natural.heldout.tensors(desc="read held-out images")  # fails now, not after training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "slingshot.log"

    def log(line):
        stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
        click.echo(line, err=True)
        with open(log_path, "a") as f:
            f.write(f"{stamp} {line}\n")

    command = " ".join(["fvtrust"] + sys.argv[1:]) if sys.argv and "fvtrust" in sys.argv[0] else (
        f"fvtrust fool slingshot {spec} --layer {layer} --unit {unit} --target {target} --out {out}")
    log(f"start: {command} (torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f})")
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    fooled = slingshot(model, layer, unit, target=target_image, data=natural, config=cfg,
                       checkpoint_dir=out / "checkpoint",
                       on_epoch=lambda e, r: log(f"epoch {e}/{cfg.epochs}: L_manip {r['loss_manip']:.4g}, "
                                                 f"L_pres {r['loss_pres']:.4g} ({r['seconds']:.0f} s)"))
    if fooled.slingshot_info["resumed_from_epoch"]:
        log(f"resumed after epoch {fooled.slingshot_info['resumed_from_epoch']}")
    wall1, cpu1 = time.perf_counter(), time.process_time()
    log("fine-tuning done; measuring (natural behaviour, visualizations under defenses)")
    report, images = slingshot_report(model, fooled, target_image, heldout, layer=layer, unit=unit,
                                      steps=steps, seed=seed, param=param)
    wall2, cpu2 = time.perf_counter(), time.process_time()
    info = dict(fooled.slingshot_info, target=target)
    data_desc = {"fit": info["fit_data"], "heldout": dict(natural.heldout.describe(), n_used=len(heldout[0]))}
    report = {"spec": spec, "layer": layer, "unit": unit, "target": target, "data": data_desc,
              "config": {**{k: info[k] for k in cfg.__dataclass_fields__}, "gamma_used": info["gamma_used"]}, **report,
              "training": {"history": info["history"], "resumed_from_epoch": info["resumed_from_epoch"]},
              "timing": {"finetune_wall_s_this_run": wall1 - wall0, "finetune_cpu_s_this_run": cpu1 - cpu0,
                         "report_wall_s": wall2 - wall1, "report_cpu_s": cpu2 - cpu1,
                         "total_wall_s_this_run": wall2 - wall0, "torch_threads": torch.get_num_threads(),
                         "cpu_count": os.cpu_count(), "load_average_start": load0[0],
                         "load_average_end": os.getloadavg()[0],
                         "note": "CPU seconds count this process only; on a shared machine wall time also "
                                 "counts waiting for the cores"},
              "command": command}
    with staged_dir(out) as stage:
        save_model(fooled, stage / "model", manipulation=MANIPULATION, args={},
                   base_spec=getattr(model, "base_spec", spec),
                   extra={k: v for k, v in info.items() if k != "history"})
        fig = slingshot_figure(report, images, title=f"{spec} {layer} unit {unit} → {target} (gradient slingshot, "
                                                     f"{cfg.variant})")
        atomic_save_figure(fig, stage / "figure.png", dpi=110)
        plt.close(fig)
        atomic_write_json(stage / "report.json", report)
    nat, vis = report["natural"], report["visualization"]
    auroc = (f"own-class AUROC {nat['own_class_auroc_before']:.3f} -> {nat['own_class_auroc_after']:.3f}; "
             if nat.get("own_class_auroc_before") is not None else "")
    log(f"top-1 {nat['top1_before']:.4f} -> {nat['top1_after']:.4f}; top-100 Jaccard {nat['top100_jaccard']:.2f}; "
        f"{auroc}visualization Pearson to target {vis['pearson_before']:.2f} -> {vis['pearson_after']:.2f} "
        f"(SSIM {vis['ssim_before']:.2f} -> {vis['ssim_after']:.2f}"
        + (f"; median over {vis['across_starts']['starts']} starts "
           f"{vis['across_starts']['median_pearson_before']:.2f} -> {vis['across_starts']['median_pearson_after']:.2f}"
           if vis.get("across_starts") else "") + "); "
        + (f"undone by: {', '.join(report['undone_by']) or 'none'}" if report["slingshot_succeeded"] else
           f"the slingshot did not take (Pearson < {report['undone_threshold_pearson']}): no defense to judge")
        + f"; wrote {out}")
