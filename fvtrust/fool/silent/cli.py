"""`fvtrust fool silent`: silent units on a Conv-BN-ReLU layer, with a report and a figure."""
import click

from ...cli_common import data_options


@click.command("silent")
@click.argument("spec")
@click.option("--layer", required=True, help="A Conv-BN-ReLU block, e.g. block3 or layer4.1.conv2.")
@click.option("--target", default="coffee", show_default=True, help="unit:N, a scikit-image picture name, or a path.")
@click.option("--units", default="all", show_default=True)
@click.option("--alpha", default=1.0, show_default=True)
@click.option("--beta", default=30.0, show_default=True)
@click.option("--margin", default=0.1, show_default=True, help="b this fraction below the natural maximum.")
@click.option("--pool", default="map", show_default=True, type=click.Choice(["map", "local"]))
@data_options
@click.option("--vis-units", default=None, help="Units to visualize before/after (default: the first 16 manipulated).")
@click.option("--steps", default=256, show_default=True, help="Visualization steps for the before/after check.")
@click.option("--weights", default=None)
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def silent_command(spec, layer, target, units, alpha, beta, margin, pool, data, class_index, natural_limit, data_dir,
                   vis_units, steps, weights, device, out):
    """Make every chosen unit of LAYER visualize TARGET while natural outputs stay identical.

    The natural maximum is measured on the fit part of --data; bit-identity, leaks and accuracy on its
    held-out part (fashion-mnist: train / test; a folder: a seeded half each), each capped at
    --natural-limit (default here 20,000).
    """
    import sys

    import matplotlib.pyplot as plt

    from ...cli_common import device_of, load_natural
    from ...errors import FvtrustError
    from ...io import atomic_save_figure, atomic_write_json, staged_dir
    from ...models import load_model, save_model
    from .build import silent_units
    from .report import figure5, silent_report

    if steps < 1:
        raise FvtrustError(f"--steps must be >= 1, got {steps}")
    model = load_model(spec, weights=weights, device=device_of(device))
    # 20,000 fit images bound the natural maximum unless told otherwise (the measured default; README)
    data = load_natural(model, data, class_index, 20000 if natural_limit is None else natural_limit, data_dir)
    shown = None
    if vis_units is not None:  # checked before the (slow) construction
        from ...models.layers import layer_units, parse_units

        n = layer_units(model, layer)
        manipulated = parse_units(units, n, layer)
        shown = manipulated if vis_units == "all" else parse_units(vis_units, n, layer)
        missing = sorted(set(shown) - set(manipulated))
        if missing:
            raise FvtrustError(f"--vis-units {missing[:5]} are not manipulated units (--units {units})")
    fooled = silent_units(model, layer, target=target, natural=data.fit, alpha=alpha, beta=beta, units=units,
                          margin=margin, pool=pool)
    report, vis = silent_report(model, fooled, data.heldout, vis_units=shown, steps=steps)
    report["natural_data"] = {"fit": data.fit.describe(), "heldout": data.heldout.describe(), **data.describe()}
    report["command"] = " ".join(["fvtrust"] + sys.argv[1:])
    with staged_dir(out) as stage:
        save_model(fooled, stage / "model", manipulation="silent_units",
                   args={"layer": layer, "units": fooled.silent_info["units"], "pool": pool,
                         "map_size": fooled.silent_info["map_size"]}, base_spec=spec, extra=fooled.silent_info)
        fig = figure5(report, vis, title=f"{spec} {layer}: visualizations (Figure 5)")
        atomic_save_figure(fig, stage / "figure5.png", dpi=110)
        plt.close(fig)
        atomic_write_json(stage / "report.json", report)
    ind = report["independent_starts"]
    click.echo(f"outputs identical on {report['fraction_outputs_bit_identical']:.2%} of held-out images; "
               f"top-1 {report['top1_before']:.4f} -> {report['top1_after']:.4f}; mean pairwise correlation of "
               f"visualizations {report['mean_pairwise_correlation_before']:.2f} -> "
               f"{report['mean_pairwise_correlation_after']:.2f} (shared start), "
               f"{ind['mean_pairwise_correlation_before']:.2f} -> {ind['mean_pairwise_correlation_after']:.2f} "
               f"(own starts; one unit's own-start ceiling {ind['same_unit_ceiling']:.2f}); wrote {out}")
