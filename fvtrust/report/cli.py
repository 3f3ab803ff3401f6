"""`fvtrust reproduce`: the whole paper on the embedded default, as an HTML report."""
import click


@click.command("reproduce")
@click.option("--out", default="fvtrust-report", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Smaller budgets (about 15 minutes on 2 CPU cores).")
@click.option("--seed", default=0, show_default=True)
@click.option("--only", default=None, help="Comma-separated steps to (re)run, e.g. theory,sanity.")
@click.option("--force", is_flag=True, help="Recompute the selected steps even if cached.")
def reproduce_command(out, quick, seed, only, force):
    """Run every experiment of the paper and write OUT/index.html and OUT/results.json.

    Finished experiments are cached under OUT/steps/: rerunning resumes.
    """
    from .reproduce import reproduce

    doc = reproduce(out, quick=quick, seed=seed, only=only.split(",") if only else None, force=force)
    failed = [k for k, v in doc["steps"].items() if v.get("status") == "failed"]
    click.echo(f"report: {out}/index.html ({len(doc['steps'])} experiments"
               + (f", failed: {', '.join(failed)}" if failed else "") + ")")
    if failed:
        raise SystemExit(1)
