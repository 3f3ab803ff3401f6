"""`reproduce`: every experiment of the paper on the embedded default, then the report."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import atomic_write_json, atomic_write_text
from . import experiments as E
from .html import render
from .pipeline import Context, Step, check_only, run_pipeline


def steps() -> list[Step]:
    out = [Step("accuracy", "natural accuracy of fashion-cnn", E.run_accuracy),
           Step("trajectories", "Figure 3: optimization snapshots", E.run_trajectories)]
    for name, title, fn in [("circuit", "Figures 1-2: fooling circuit", "run_circuit"),
                            ("silent", "Figure 5: silent units", "run_silent"),
                            ("sanity", "Figures 6-11: sanity check", "run_sanity"),
                            ("theory", "Tables 1-2: theory", "run_theory"),
                            ("linearity", "Figure 12: path linearity", "run_linearity")]:
        if hasattr(E, fn):
            out.append(Step(name, title, getattr(E, fn)))
    return out


def reproduce(out="fvtrust-report", *, quick: bool = False, seed: int = 0, only=None, force: bool = False,
              smoke: bool = False) -> dict:
    """Run (or resume) all experiments; write DIR/results.json and DIR/index.html."""
    import fvtrust

    from ..cache import output_lock

    out = Path(out)
    check_only(steps(), only)
    with output_lock(out):  # one run per report directory (the CLI holds it already; re-entrant)
        out.mkdir(parents=True, exist_ok=True)
        ctx = Context(out=out, quick=quick, seed=seed, smoke=smoke)
        t0 = time.perf_counter()
        results = run_pipeline(steps(), ctx, only=only, force=force)
        doc = {"meta": {"mode": "smoke" if smoke else ("quick" if quick else "full"), "seed": seed,
                        "fvtrust": fvtrust.__version__, "torch": torch.__version__,
                        "seconds": round(time.perf_counter() - t0, 1),
                        "compute_seconds": round(sum(r.get("seconds", 0.0) for r in results.values()), 1),
                        "cached_steps": [k for k, r in results.items() if r.get("cached")],
                        "command": f"fvtrust reproduce --out {out}" + (" --quick" if quick else "")},
               "steps": results}
        atomic_write_json(out / "results.json", doc)
        atomic_write_text(out / "index.html", render(out, doc))
    return doc
