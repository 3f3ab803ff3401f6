"""`fvtrust fool circuit`: the fooling circuit of §2.1 on a layer, with a report and Figure 1/2."""
import click

from ...cli_common import data_options, ray_option

from ..detector.cli import budget_options


@click.command("circuit")
@ray_option
@click.argument("spec")
@click.option("--layer", required=True, help="Layer to manipulate, e.g. fc (the logits).")
@click.option("--offset", type=int, default=None, help="Permutation: unit i visualizes as unit (i + N) mod units.")
@click.option("--picture", default=None, help="Picture target: a scikit-image name (camera, astronaut, ...) or a path.")
@click.option("--units", default=None, help="Units to manipulate: 0,1,5 or 0-9 or all (default: all).")
@click.option("--detector", "detector_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A trained detector directory (from `fvtrust fool detector` or OUT/detector of an earlier run).")
@budget_options
@click.option("--steps", default=512, show_default=True, help="Steps of the before/after visualizations.")
@click.option("--mode", default="split", show_default=True, type=click.Choice(["split", "shift"]),
              help="split: exact circuit on positive/negative parts; shift: the authors' +s shift.")
@click.option("--gate", default="hard", show_default=True, type=click.Choice(["hard", "soft"]),
              help="hard: thresholded E, no gradient (the authors'); soft: sigmoid (ablation).")
@click.option("--margin", default=2.0, show_default=True, help="k = margin x the measured bound.")
@click.option("--bound-steps", default=256, show_default=True,
              help="Steps of the E = 0 visualizations on which the bounds for k are measured.")
@click.option("--harden-rounds", default=2, show_default=True,
              help="Rounds of mining the fooled model's own visualizations as extra negatives for E (0: off).")
@click.option("--k", "k_value", default=None, type=float, help="Set k instead of measuring it.")
@click.option("--no-picture-center", is_flag=True, help="Picture filter = picture/(H*W) as in the paper (not mean-centred).")
@click.option("--seed", default=0, show_default=True)
@click.option("--weights", default=None, help="Weights of SPEC: default, random, an enum name or a file.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@data_options
@click.option("--out", required=True, type=click.Path(file_okay=False))
def circuit_command(spec, layer, offset, picture, units, detector_dir, budget, cache, runs, det_steps, max_units,
                    epochs, steps, mode, gate, margin, bound_steps, harden_rounds, k_value, no_picture_center, seed,
                    weights, device, data, class_index, natural_limit, data_dir, out):
    """Units of LAYER that answer like themselves on natural images but visualize as another unit or a picture.

    Writes OUT/model (reload with `fvtrust.load_model`), OUT/detector, OUT/report.json and
    OUT/figure2.png (permutation) or OUT/figure1.png (picture).
    """
    import sys

    from ...errors import FvtrustError
    from ...models import load_model
    from .report import circuit_experiment

    if (offset is None) == (picture is None):
        raise FvtrustError("give exactly one of --offset N or --picture NAME|PATH")
    from ...cli_common import device_of, load_natural

    model = load_model(spec, weights=weights, device=device_of(device))
    natural = load_natural(model, data, class_index, natural_limit, data_dir, seed=seed)
    report = circuit_experiment(
        model, layer, mapping=offset, picture=picture, units=units, detector=detector_dir, budget=budget,
        cache_dir=cache, steps=steps, seed=seed, mode=mode, gate=gate, margin=margin, k=k_value,
        bound_steps=bound_steps, harden=harden_rounds, picture_center=not no_picture_center, out=out, spec=spec,
        command=" ".join(["fvtrust"] + sys.argv[1:]),
        budget_overrides={"runs": runs, "steps": det_steps, "max_units": max_units, "epochs": epochs},
        natural=natural)
    d = report["detector"].get("heldout", {})
    hard = (report["detector"].get("hardening") or {}).get("heldout_after")
    after = (f" (after hardening: {hard['natural']:.4f}, {hard['visualization']:.4f})" if hard else "")
    nat = report["natural"]
    s = report["visualizations"]["summary"]
    match = (f"{s['units_original_argmax_is_target']}/{s['n_units']} new visualizations classified as their target"
             if "units_original_argmax_is_target" in s else f"mean Pearson with the picture {s['pearson_picture']:.2f}")
    click.echo(f"detector held-out: natural {d.get('natural', float('nan')):.4f}, visualization "
               f"{d.get('visualization', float('nan')):.4f}{after}; k = {report['k']:.3g}; "
               f"top-1 {nat['top1_before']:.4f} -> {nat['top1_after']:.4f}, top-5 {nat['top5_before']:.4f} -> "
               f"{nat['top5_after']:.4f} ({nat['detector_errors']} natural test images misjudged by E); {match}; "
               f"wrote {out}")
