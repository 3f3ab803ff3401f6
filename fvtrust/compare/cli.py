"""`fvtrust compare-methods`: parse options, call fvtrust.compare.compare_methods, say where things went."""
from __future__ import annotations

import shlex
import sys

import click

from ..cli_common import data_options
from .methods import METHODS


@click.command("compare-methods")
@click.argument("spec")
@click.option("--layer", required=True, help="Layer whose units are visualized (the logits for the paper's check).")
@click.option("--units", default="all", show_default=True, help="Units: all, 0-9, 1,4,7.")
@data_options
@click.option("--methods", default=",".join(METHODS), show_default=True, help="Comma-separated subset.")
@click.option("--anchors", default="", help="Also run horama and/or faccent (comma-separated; optional extras).")
@click.option("--anchor-python", default=None, help="Interpreter that has the anchors (default: "
              "$FVTRUST_ANCHORS_PYTHON or ~/.venvs/fvtrust-anchors/bin/python).")
@click.option("--steps", default=512, show_default=True)
@click.option("--replicates", default=4, show_default=True, help="Seeds per unit (diversity needs >= 2).")
@click.option("--objective", default="neuron", show_default=True, type=click.Choice(["neuron", "channel"]))
@click.option("--lr", default=0.05, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--accent-weight", default=1.0, show_default=True, help="λ of the accentuation proximity term.")
@click.option("--accent-layer", default=None, help="Layer of the accentuation proximity term (default: --layer).")
@click.option("--redirect-steps", default=16, show_default=True, help="Steps with the redirected ReLU (lucid: 16).")
@click.option("--fit-limit", default=2000, show_default=True, help="Natural fit images used.")
@click.option("--heldout-limit", default=2000, show_default=True, help="Natural held-out images used.")
@click.option("--per-class-natural", default=50, show_default=True, help="Held-out natural images per class "
              "(class units: the paper's check).")
@click.option("--per-group-natural", default=20, show_default=True,
              help="Hidden units: the unit's top-activating held-out images that stand in for its class.")
@click.option("--sanity-layers", default="all", show_default=True,
              help="'all' (every distinct layer output) or comma-separated layer names.")
@click.option("--weights", default=None, help="Weights: default, random, a torchvision enum name or a file.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(), help="Output directory (results.json, index.html, PNGs).")
def compare_command(spec, layer, units, data, class_index, natural_limit, data_dir, methods, anchors, anchor_python, steps, replicates, objective,
                    lr, seed, accent_weight, accent_layer, redirect_steps, fit_limit, heldout_limit, per_class_natural,
                    per_group_natural, sanity_layers, weights, device, out):
    """Rank visualization methods by the §3 sanity check, with faithfulness, diversity and speed.

    Methods: lucent-standard, pixel, maco, accentuation, redirect (all batched over units). The fit part of
    --data gives MACO's spectrum and accentuation's seeds; the held-out part is what every method is judged on.
    """
    import torch

    from ..models import load_model
    from .run import compare_methods

    model = load_model(spec, weights=weights, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res = compare_methods(model, layer, units, data=data, data_dir=data_dir, methods=methods, steps=steps,
                          replicates=replicates, seed=seed, objective=objective, lr=lr, accent_weight=accent_weight,
                          accent_layer=accent_layer, redirect_steps=redirect_steps, fit_limit=fit_limit,
                          heldout_limit=heldout_limit, per_class_natural=per_class_natural,
                          per_group_natural=per_group_natural, sanity_layers=sanity_layers, class_index=class_index,
                          natural_limit=natural_limit, anchors=[a for a in anchors.split(",") if a.strip()],
                          anchor_python=anchor_python, out=out,
                          command="fvtrust " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    for r in res["ranking"]:
        click.echo(f"{r['method']:>16}: sanity {r['sanity_mean']:.3f}")
    for r in res["anchors"]:
        if "error" in r:
            click.echo(f"{r['method']:>16}: not run ({r['error']})")
    for k, v in res["ratios"].items():
        click.echo(f"{k} = {v:.3g}")
    click.echo(f"wrote results.json, index.html and the images to {out}")
