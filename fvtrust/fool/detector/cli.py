"""`fvtrust fool detector`: build (or resume building) the visualization detector E alone."""
import click

from ...cli_common import data_options, ray_option


def budget_options(f):
    """Options shared with `fvtrust fool circuit`: how much work the detector gets."""
    opts = [
        click.option("--budget", default="quick", show_default=True,
                     type=click.Choice(["tiny", "quick", "standard", "paper"]),
                     help="quick: minutes on 2 CPU cores; standard: 5 runs x all units; paper: 35 runs (App. C.1)."),
        click.option("--cache", default=None, type=click.Path(file_okay=False),
                     help="Cache for snapshots and detectors (default: $FVTRUST_CACHE/detector or "
                          "~/.cache/fvtrust/detector). Interrupted runs resume from it."),
        click.option("--runs", default=None, type=int, help="Override: optimization runs per unit."),
        click.option("--det-steps", default=None, type=int, help="Override: steps per detector visualization run."),
        click.option("--max-units", default=None, type=int, help="Override: cap on units (incl. hidden-layer ones)."),
        click.option("--epochs", default=None, type=int, help="Override: training epochs."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("detector")
@ray_option
@click.argument("spec")
@click.option("--layer", required=True, help="The layer whose units (plus hidden channels) provide visualizations.")
@budget_options
@click.option("--seed", default=0, show_default=True)
@click.option("--weights", default=None)
@click.option("--device", default=None)
@data_options
@click.option("--out", required=True, type=click.Path(file_okay=False))
def detector_command(spec, layer, budget, cache, runs, det_steps, max_units, epochs, seed, weights, device, data,
                     class_index, natural_limit, data_dir, out):
    """Train E (natural vs visualization, Table 3 CNN) for SPEC; write OUT/detector.* and report.json."""
    from ...io import atomic_write_json, staged_dir
    from ...models import load_model
    from .train import build_detector, save_detector

    from ...cli_common import device_of, load_natural

    model = load_model(spec, weights=weights, device=device_of(device))
    natural = load_natural(model, data, class_index, natural_limit, data_dir, seed=seed)
    det, report = build_detector(model, layer, budget=budget, cache_dir=cache, seed=seed, runs=runs,
                                 steps=det_steps, max_units=max_units, epochs=epochs, natural=natural)
    report = dict(report, spec=spec, natural_data={**natural.describe(), "fit (detector train)": natural.fit.describe(),
                                                   "heldout (detector test)": natural.heldout.describe()})
    with staged_dir(out) as stage:
        save_detector(det, stage, report)
        atomic_write_json(stage / "report.json", report)
    h = report["heldout"]
    click.echo(f"held-out units: natural {h['natural']:.4f}, visualization {h['visualization']:.4f} "
               f"({report['n_units']} units, {h['n_visualization']} held-out snapshots); wrote {out}")
