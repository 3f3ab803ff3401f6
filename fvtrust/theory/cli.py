"""`fvtrust theory --out DIR`: derive Table 1 and write it with a figure.

Exports `theory_command` (a click.Command) for fvtrust/cli.py to register.
Writes DIR/table1.json, DIR/table1.md and DIR/counterexamples.png, each to a
temporary name first and then renamed, so an interrupted run leaves no
half-written file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import FvtrustError


def _atomic_write(path: Path, write) -> None:
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_theory(out, samples: int = 40, seed: int = 0) -> dict:
    """Derive the tables, write the three files into `out`; return {name: path}."""
    from . import table as table_module
    from .figures import plot_counterexamples
    from .lemma1 import check_lemma1

    out = Path(out)
    if samples < 1:  # before anything is created
        raise FvtrustError(f"samples must be >= 1, got {samples}")
    if out.exists() and not out.is_dir():
        raise FvtrustError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FvtrustError(f"cannot create output directory {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise FvtrustError(f"output directory {out} is not writable")
    table = table_module.table1(samples=samples, seed=seed)
    data = table.to_dict()
    data["lemma1"] = {k: (float(v) if isinstance(v, float) else v) for k, v in check_lemma1(seed=seed).items()}
    data["command"] = f"fvtrust theory --out {out} --samples {samples} --seed {seed}"
    paths = {"json": out / "table1.json", "markdown": out / "table1.md", "figure": out / "counterexamples.png"}

    def write_text(text):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
        return write

    _atomic_write(paths["json"], write_text(json.dumps(data, indent=2) + "\n"))
    _atomic_write(paths["markdown"], write_text(table.to_markdown()))
    _atomic_write(paths["figure"], lambda tmp: plot_counterexamples(tmp))
    return {"table": table, **paths}


@click.command("theory")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for table1.json, table1.md and counterexamples.png.")
@click.option("--samples", default=40, show_default=True, type=int,
              help="Random members per function class (more = stronger evidence, slower).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the random members.")
def theory_command(out: Path, samples: int, seed: int) -> None:
    """Derive Table 1 of the paper (which function classes feature visualization can predict)."""
    res = run_theory(out, samples=samples, seed=seed)
    table = res["table"]
    click.echo(table.to_markdown().split("## Evidence")[0].rstrip())
    for key in ("json", "markdown", "figure"):
        click.echo(f"wrote {res[key]}")
