"""A resumable pipeline of experiments.

Each step writes its outputs under ``DIR/steps/NAME/`` and, last, a
``result.json`` (a verified `fvtrust.cache` entry keyed by the run's
settings). A rerun skips every step whose result.json is intact and was
written under the same settings, so an interrupted `fvtrust reproduce`
resumes where it stopped and loses nothing; a damaged result, or one from a
run with other settings (say --quick vs full), reruns that step.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..cache import fingerprint, read_entry, write_entry
from ..errors import FvtrustError


@dataclass
class Step:
    name: str
    title: str
    run: Callable  # run(ctx, step_dir: Path) -> dict of JSON-able results
    needs: tuple = ()


@dataclass
class Context:
    out: Path
    mode: str = "quick"  # smoke (tests of the pipeline itself) | quick | full | paper
    seed: int = 0
    setting: object = None  # report.setting.Setting: model, data, layers, classes
    cache: dict = field(default_factory=dict)  # objects shared between steps in one process
    results: dict = field(default_factory=dict)  # results of finished steps, by name

    def settings(self) -> dict:
        """What decides the steps' results when no Setting is given (tests of the pipeline itself)."""
        return {"mode": self.mode, "seed": self.seed}

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    @property
    def fingerprint(self) -> str | None:
        return self.setting.fingerprint() if self.setting is not None else None

    def budget(self, quick, full, smoke=None):
        """The value for this run's budget: `full` also for the paper's budget."""
        if self.smoke and smoke is not None:
            return smoke
        return quick if self.mode in ("quick", "smoke") else full


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def check_only(steps: list[Step], only) -> None:
    """Fail on an unknown step name (before anything is written)."""
    names = [s.name for s in steps]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise FvtrustError(f"unknown step {unknown[0]!r}; steps are: {', '.join(names)}")


def run_pipeline(steps: list[Step], ctx: Context, only=None, force: bool = False, keep_going: bool = True) -> dict:
    """Run the steps in order (resuming finished ones); return {name: result}."""
    check_only(steps, only)
    root = ctx.out / "steps"
    root.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(steps, 1):
        sdir = root / step.name
        done = sdir / "result.json"
        selected = not only or step.name in only
        key = fingerprint(ctx.fingerprint or ctx.settings(), step.name)
        prev = None if (force and selected) else read_entry(done, "json", key)
        if prev is not None:
            ctx.results[step.name] = {**prev, "cached": True}
            _log(f"[{i}/{len(steps)}] {step.title}: cached")
            continue
        if not selected:
            continue
        missing = [n for n in step.needs if ctx.results.get(n, {}).get("status") != "ok"]
        if missing:
            ctx.results[step.name] = {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
            _log(f"[{i}/{len(steps)}] {step.title}: skipped (needs {', '.join(missing)})")
            continue
        _log(f"[{i}/{len(steps)}] {step.title} ...")
        sdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            res = step.run(ctx, sdir)
            res = {"status": "ok", **res}
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failing experiment must not lose the others
            if not keep_going:
                raise
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=6)}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res["setting"] = ctx.fingerprint
        ctx.results[step.name] = res
        if res["status"] == "ok":
            write_entry(done, "json", res, key)
        _log(f"[{i}/{len(steps)}] {step.title}: {res['status']} in {res['seconds']} s"
             + (f" ({res['error']})" if res["status"] == "failed" else ""))
    return ctx.results
