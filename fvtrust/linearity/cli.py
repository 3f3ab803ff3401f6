"""`fvtrust linearity SPEC LAYER --units ... --out DIR`: path linearity (paper §5, App. C.4).

Writes DIR/linearity.json and, with --scores, DIR/figure12.png (Spearman r
against n); without scores DIR/path_curves.png (per-unit AGPA and ALDP).
Finished units are cached in DIR/.linearity-cache, so an interrupted run
resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..cli_common import data_options
from ..errors import FvtrustError


@click.command("linearity")
@click.argument("spec")
@click.argument("layer")
@click.option("--units", default="all", show_default=True, help="0,1,2 or 0-9 or all.")
@data_options
@click.option("--m", "m", default=20, show_default=True, help="Most activating natural images per unit (starts).")
@click.option("--steps", default=512, show_default=True, help="Optimization steps N per path.")
@click.option("--scores", default=None, type=click.Path(), help="CSV 'unit,score' of interpretability scores.")
@click.option("--objective", default="channel", show_default=True, type=click.Choice(["channel", "neuron"]))
@click.option("--param", default="fft", show_default=True, type=click.Choice(["fft", "pixel", "raw"]),
              help="raw = unconstrained pixels (the plain gradient-ascent path).")
@click.option("--transforms", default="standard", show_default=True, type=click.Choice(["standard", "none"]))
@click.option("--lr", default=0.05, show_default=True)
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["adam", "sgd"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--group-size", default=16, show_default=True, help="Units per batched optimization (and cache piece).")
@click.option("--line-mode", default="auto", show_default=True, type=click.Choice(["auto", "store", "two-pass"]),
              help="store: keep trajectories (memory); two-pass: optimize twice (compute).")
@click.option("--batch-size", default=256, show_default=True, help="Batch size for ranking natural images.")
@click.option("--weights", default=None, help="Weights: default, random, a torchvision enum name or a file.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
def linearity_command(spec, layer, units, data, class_index, natural_limit, data_dir, m, steps, scores, objective, param, transforms, lr, optimizer,
                      seed, group_size, line_mode, batch_size, weights, device, out):
    """Gradient angles and line distances of visualization paths started at natural images."""
    from ..cli_common import device_of, load_natural
    from ..io import atomic_save_figure, atomic_write_json, staged_dir
    from ..models import load_model
    from ..models.layers import layer_units, parse_units
    from . import correlate, load_scores_csv, path_metrics, top_activating_many
    from .plots import figure12, path_curves

    from .paths import check_path_options

    check_path_options(steps=steps, lr=lr)  # before ranking natural images and before OUT exists
    table = load_scores_csv(scores) if scores else None  # a bad CSV fails before any compute
    model = load_model(spec, weights=weights, device=device_of(device))
    unit_list = parse_units(units, layer_units(model, layer), layer)
    if table is not None:
        missing = [u for u in unit_list if u not in table]
        if missing:
            raise FvtrustError(f"{scores} has no score for unit(s) {', '.join(map(str, missing))}; "
                               f"it scores units {', '.join(map(str, sorted(table)[:20]))}"
                               f"{' ...' if len(table) > 20 else ''}")
    source = load_natural(model, data, class_index, natural_limit, data_dir)
    top = top_activating_many(model, layer, unit_list, source.evaluation.dataset, m, objective=objective, batch_size=batch_size)
    metrics = path_metrics(model, layer, unit_list, top.images, steps=steps, objective=objective, param=param,
                           transforms=transforms, lr=lr, optimizer=optimizer, seed=seed, group_size=group_size,
                           line_mode=line_mode, cache_dir=Path(out) / ".linearity-cache")
    corr = correlate(metrics, table) if table is not None else None
    title = f"{spec} {layer}: {len(unit_list)} units, M={m}, N={steps}"
    doc = {"spec": spec, "layer": layer, "data": source.evaluation.describe(), "scores_file": scores,
           "top_activating": top.to_dict(), "metrics": metrics.to_dict(), "correlation": corr}
    with staged_dir(out) as stage:
        atomic_write_json(stage / "linearity.json", doc)
        if corr is not None:
            figure = "figure12.png"
            atomic_save_figure(figure12(corr, title), stage / figure, dpi=120)
        else:
            figure = "path_curves.png"
            atomic_save_figure(path_curves(metrics, title), stage / figure, dpi=120)
    click.echo(f"AGA (degrees): {', '.join(f'{u}:{a:.2f}' for u, a in zip(unit_list, metrics.aga))}")
    click.echo(f"ALD: {', '.join(f'{u}:{a:.4f}' for u, a in zip(unit_list, metrics.ald))}")
    if corr is not None:
        click.echo(f"Spearman AGA r={corr['aga']['r']:+.3f} p={corr['aga']['p']:.3g}; "
                   f"ALD r={corr['ald']['r']:+.3f} p={corr['ald']['p']:.3g}; "
                   f"AGA_n=2 r={corr['aga_curve']['r'][0]:+.3f} p={corr['aga_curve']['p'][0]:.3g}")
    click.echo(f"wrote linearity.json and {figure} to {out}")
