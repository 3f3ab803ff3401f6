"""`fvtrust sanity-check`: parse options, call fvtrust.sanity.sanity_check, report where things went."""
from __future__ import annotations

import shlex

import click

from ..cli_common import data_options, ray_option
from ..errors import FvtrustError


@click.command("sanity-check")
@ray_option
@click.argument("spec")
@click.option("--classes", default=None, help="Comma-separated class indices or names (default: all classes).")
@click.option("--random-classes", "n_random", default=None, type=int,
              help="Draw N classes like the paper: numpy.random.seed(SEED); sorted(numpy.random.choice(C, N)).")
@click.option("--seed", default=42, show_default=True, help="Seed of --random-classes.")
@click.option("--per-class", default=10, show_default=True, help="Visualizations per class (replicates).")
@click.option("--per-class-natural", default=50, show_default=True,
              help="Natural images per class (first N of the test split; misclassified ones are then excluded).")
@click.option("--metrics", default="spearman,pearson,cosine", show_default=True)
@click.option("--all-pairs", is_flag=True, help="Every pair instead of the paper's every 10th/100th/5th.")
@click.option("--layers", default="all", show_default=True,
              help="'all' (every distinct layer output, forward order) or comma-separated layer names.")
@click.option("--visualizations", "vis_dir", default=None, type=click.Path(),
              help="Read visualizations from a folder written by `fvtrust visualize` instead of generating them.")
@click.option("--unit-layer", default=None, help="Layer whose unit c visualizes class c (default: the logits).")
@click.option("--steps", default=512, show_default=True, help="Optimization steps per visualization.")
@click.option("--vis-seed", default=0, show_default=True, help="Seed of the visualizations.")
@data_options
@click.option("--misclassified", default="exclude", show_default=True, type=click.Choice(["exclude", "keep", "auto"]),
              help="Natural images the model gets wrong: exclude (the paper), keep, or auto (keep only if all are wrong).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
              help="Precision of the prepared activations (float32: half the memory, ~3e-8 from scipy).")
@click.option("--weights", default=None, help="Weights: default, random, a torchvision enum name or a file.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
def sanity_command(spec, classes, n_random, seed, per_class, per_class_natural, metrics, all_pairs, layers, vis_dir,
                   unit_layer, steps, vis_seed, data, class_index, natural_limit, data_dir, misclassified, batch_size,
                   dtype, weights, device, out):
    """Sanity check (paper §3): are visualizations processed like natural images of their class?

    Writes similarity.json and absolute_/normalized_<metric>.png (Figures 6-11) to OUT.
    """
    from ..cli_common import device_of
    from ..models import load_model
    from .check import sanity_check

    if classes and n_random is not None:
        raise FvtrustError("give either --classes or --random-classes, not both")
    model = load_model(spec, weights=weights, device=device_of(device))
    res = sanity_check(model, out=out, data=data, data_dir=data_dir, class_index=class_index,
                       natural_limit=natural_limit,
                       exclude_misclassified={"exclude": True, "keep": False, "auto": "auto"}[misclassified],
                       classes=classes, n_random_classes=n_random,
                       class_seed=seed, per_class=per_class, per_class_natural=per_class_natural,
                       visualizations=vis_dir, unit_layer=unit_layer, steps=steps, vis_seed=vis_seed,
                       metrics=metrics, all_pairs=all_pairs, layers=layers, batch_size=batch_size, dtype=dtype,
                       command=_command_line(click.get_current_context()))
    for metric, m in res["metrics"].items():
        s = m["normalized"]["summary"]
        if s:
            click.echo(f"{metric:>8}: normalized natural-vs-visualization mean {s['mean']:+.2f}, "
                       f"min {s['min']['value']:+.2f} ({s['min']['layer']}), last {s['last']['value']:+.2f} "
                       f"({s['last']['layer']}); below 0 in {len(s['below_zero'])}/{len(m['normalized']['layers'])} "
                       "layers")
    click.echo(f"wrote similarity.json and {len(res['figures'])} figures to {out} "
               f"({res['total_runtime_s']:.0f} s)")


def _command_line(ctx) -> str:
    """The invocation, rebuilt from the parsed options (those that differ from their default)."""
    parts = ["fvtrust", ctx.info_name]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if isinstance(p, click.Argument):
            parts.append(str(v))
        elif v is not None and v != p.default and v is not False:
            parts.extend([p.opts[0]] if v is True else [p.opts[0], str(v)])
    return shlex.join(parts)
