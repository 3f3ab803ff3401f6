"""`fvtrust reproduce`: the whole paper on one model and its data (default: the embedded one), as an HTML report."""
import click

from ..cli_common import data_options, ray_option


@click.command("reproduce")
@ray_option
@click.option("--model", "spec", default="fashion-cnn", show_default=True,
              help="Any classifier spec (torchvision:googlenet, timm:NAME, py:file.py:factory, a saved dir).")
@click.option("--weights", default=None, help="Weights of --model: default, random, an enum name or a file.")
@data_options
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--budget", default=None, type=click.Choice(["smoke", "quick", "full", "paper"]),
              help="smoke: minutes (a check of the pipeline); quick: ~5 min on fashion-cnn; full; paper: the "
                   "paper's settings (detector 35 runs, ...). Default: full, or quick with --quick.")
@click.option("--quick", is_flag=True, help="Same as --budget quick.")
@click.option("--out", default="fvtrust-report", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--only", default=None, help="Comma-separated steps to (re)run, e.g. theory,sanity.")
@click.option("--force", is_flag=True, help="Recompute the selected steps even if cached.")
def reproduce_command(spec, weights, data, class_index, natural_limit, data_dir, device, budget, quick, out, seed,
                      only, force):
    """Run every experiment of the paper and write OUT/index.html and OUT/results.json.

    Finished experiments are cached under OUT/steps/: rerunning the same command resumes.
    """
    from ..errors import FvtrustError
    from .reproduce import reproduce

    if quick and budget not in (None, "quick"):
        raise FvtrustError(f"--quick conflicts with --budget {budget}")
    if data_dir:
        raise FvtrustError("reproduce reads Fashion-MNIST from the Debian package; --data-dir is not supported here")
    doc = reproduce(out, quick=quick, seed=seed, only=only.split(",") if only else None, force=force, model=spec,
                    weights=weights, data=data, device=device, budget=budget, class_index=class_index,
                    natural_limit=natural_limit)
    failed = [k for k, v in doc["steps"].items() if v.get("status") == "failed"]
    click.echo(f"report: {out}/index.html ({len(doc['steps'])} experiments"
               + (f", failed: {', '.join(failed)}" if failed else "") + ")")
    if failed:
        raise SystemExit(1)
