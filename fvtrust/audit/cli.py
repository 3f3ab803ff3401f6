"""`fvtrust audit SPEC --layer L [--data D] [--units U] --out DIR`: flag units whose visualizations cannot be trusted."""
from __future__ import annotations

from pathlib import Path

import click

from ..cli_common import data_options, ray_option


@click.command("audit")
@ray_option
@click.argument("spec")
@click.option("--layer", required=True, help="Layer to audit (a PyTorch module path: fc, block3, layer4.1.conv2).")
@data_options
@click.option("--units", default="all", show_default=True, help="0,1,2 or 0-9 or all.")
@click.option("--steps", default=128, show_default=True, help="Visualization steps per unit.")
@click.option("--top-k", default=8, show_default=True, help="Top natural images per unit.")
@click.option("--seed", default=0, show_default=True)
@click.option("--chunk-units", default=32, show_default=True,
              help="Units per cached chunk (and per --ray shard); a rerun after an interrupt resumes per chunk.")
@click.option("--weights", default=None, help="Weights: default, random, a torchvision enum name or a file.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
def audit_command(spec, layer, data, class_index, natural_limit, data_dir, units, steps, top_k, seed, chunk_units,
                  weights, device, out):
    """Score every unit of LAYER for a manipulated visualization; write audit.json and index.html.

    Natural images: the evaluation part of --data (at most --natural-limit, default 5000, are ranked).
    Finished chunks of units are cached in OUT/.cache: a rerun after an interrupt resumes from them.
    """
    from ..cli_common import device_of, load_natural
    from ..models import load_model
    from .core import AuditSettings, audit
    from .report import save_audit

    model = load_model(spec, weights=weights, device=device_of(device))
    limit = AuditSettings.natural_limit if natural_limit is None else natural_limit
    nat = load_natural(model, data, class_index, limit, data_dir, seed)
    res = audit(model, layer, data=nat, units=units, steps=steps, top_k=top_k, natural_limit=limit, seed=seed,
                cache_dir=Path(out) / ".cache", chunk_units=chunk_units)
    data_opt = f"--data {data} " if data else ""
    command = (f"fvtrust audit {spec} --layer {layer} {data_opt}--units {units} --steps {steps} "
               f"--top-k {top_k} --natural-limit {limit} --seed {seed} --out {out}")
    save_audit(res, out, command=command)
    ev = res.evidence
    click.echo(f"{res.verdict}: {ev['n_flagged']}/{ev['n_units']} units flagged "
               f"({', '.join(f'{k} {v}' for k, v in ev['flagged_by_signal'].items())}); "
               f"{res.seconds['total']:.1f} s; wrote {out}/audit.json and {out}/index.html")
