"""`reproduce`: every experiment of the paper on one model and its data (default: the embedded one), then the report."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import atomic_write_json, atomic_write_text
from . import experiments as E
from .html import render
from .pipeline import Context, Step, check_only, run_pipeline


def steps() -> list[Step]:
    out = [Step("accuracy", "natural accuracy of the model", E.run_accuracy),
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
              smoke: bool = False, model: str = "fashion-cnn", weights=None, data=None, device=None,
              budget: str | None = None, class_index=None, natural_limit: int | None = None) -> dict:
    """Run (or resume) all experiments; write DIR/results.json and DIR/index.html.

    model / weights / data / class_index / natural_limit: what to run on (see
    fvtrust.report.setting; default the embedded fashion-cnn on Fashion-MNIST).
    budget: smoke | quick | full | paper (``quick=True`` / ``smoke=True`` are
    shorthands). Cached steps are reused only for the same setting.
    """
    import fvtrust

    from ..errors import FvtrustError
    from ..models import resolve_device
    from .setting import MODES, Setting

    mode = budget or ("smoke" if smoke else ("quick" if quick else "full"))
    if mode not in MODES:
        raise FvtrustError(f"unknown budget {mode!r}; choose one of: {', '.join(MODES)}")
    setting = Setting(spec=str(model), weights=weights, device=str(resolve_device(device)) if device else None,
                      data=None if data is None else str(data), class_index=class_index,
                      natural_limit=natural_limit, mode=mode, seed=seed)
    setting.model, setting.natural  # noqa: B018 - bad model/data input fails here, in one line, before any step
    from ..cache import output_lock

    out = Path(out)
    check_only(steps(), only)
    with output_lock(out):  # one run per report directory (the CLI holds it already; re-entrant)
        out.mkdir(parents=True, exist_ok=True)
        ctx = Context(out=out, mode=mode, seed=seed, setting=setting)
        t0 = time.perf_counter()
        results = run_pipeline(steps(), ctx, only=only, force=force)
        cmd = f"fvtrust reproduce --model {setting.cli} --budget {mode} --out {out}"
        doc = {"meta": {"mode": mode, "seed": seed, "fvtrust": fvtrust.__version__,
                        "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
                        "compute_seconds": round(sum(r.get("seconds", 0.0) for r in results.values()), 1),
                        "cached_steps": [k for k, r in results.items() if r.get("cached")],
                        "setting": _safe_describe(setting), "command": cmd},
               "steps": results}
        atomic_write_json(out / "results.json", doc)
        atomic_write_text(out / "index.html", render(out, doc))
    return doc


def _safe_describe(setting) -> dict:
    try:
        return setting.describe()
    except Exception as e:  # noqa: BLE001 - the page must render even if a choice (e.g. classes) failed
        return {"spec": setting.spec, "data": setting.data, "budget": setting.mode, "error": str(e)}
