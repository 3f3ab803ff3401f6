"""Fault-injection harness: SIGKILL a real `fvtrust` process at points of its own progress, rerun, compare.

The child reports progress events (one line per bar step, cache write or
cache hit) on a pipe (FVTRUST_EVENTS_FD, see fvtrust.progress). The harness
counts them and sends SIGKILL when the k-th arrives; the child keeps running
for the moment the signal takes, so kills land anywhere (mid-write included),
not only on event boundaries.

One experiment (`kill_and_resume`):

1. an uninterrupted reference run counts its events E;
2. a seeded generator draws `kills` distinct points in 1..E-1; the points are
   visited in order by a chain of processes on one fresh output/cache folder:
   process i is killed `gap_i` events after it starts (its replay of cached
   work emits few events, so the kills track the run's progress);
3. a last rerun completes; its outputs are compared with the reference's;
4. every cache entry must be written at most once over the whole chain (a
   rerun never recomputes completed work).

Adding a pipeline is one `Pipeline` row in tests/test_faults.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Keys whose values say when or how a result was obtained, not what it is.
VOLATILE = frozenset({"seconds", "runtime_s", "total_runtime_s", "compute_seconds", "cached", "cached_steps",
                      "cached_units", "source", "cache", "dir", "command"})


@dataclass
class Pipeline:
    name: str
    argv: tuple  # fvtrust arguments; {out} and {cache} are filled in
    outputs: tuple  # files under {out} to compare: .json without VOLATILE keys, anything else byte for byte
    driver: str | None = None  # python code run instead of `-m fvtrust` (argv then goes to sys.argv)
    volatile: frozenset = field(default_factory=frozenset)


@dataclass
class Run:
    returncode: int
    events: list
    stderr: str
    killed_at: int | None = None


def env_for(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), FVTRUST_PROGRESS="0",
               FVTRUST_CACHE=str(tmp / "fvtrust-cache"), MPLBACKEND="Agg", OMP_NUM_THREADS="2")
    return env


def run_fvtrust(pipeline: Pipeline, out: Path, cache: Path, env: dict, kill_at: int | None = None,
                timeout: float = 600) -> Run:
    """Run once; with `kill_at`, SIGKILL the process when its kill_at-th event arrives."""
    args = [a.format(out=out, cache=cache) for a in pipeline.argv]
    cmd = [sys.executable, "-c", pipeline.driver, *args] if pipeline.driver else [sys.executable, "-m", "fvtrust",
                                                                                   *args]
    r, w = os.pipe()
    err_path = out.parent / f".{out.name}.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=dict(env, FVTRUST_EVENTS_FD=str(w)), pass_fds=(w,),
                                stdout=subprocess.DEVNULL, stderr=err, cwd=out.parent)
    os.close(w)
    events, killed = [], None
    with os.fdopen(r, "r") as stream:
        for line in stream:
            events.append(line.rstrip("\n"))
            if kill_at is not None and killed is None and len(events) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                killed = len(events)
        # EOF: the process (and every holder of the pipe) is gone
    rc = proc.wait(timeout=timeout)
    stderr = err_path.read_text()
    err_path.unlink()
    return Run(rc, events, stderr, killed)


def written(events) -> list[str]:
    return [e.split("\t", 1)[1] for e in events if e.startswith("cache-write\t")]


def strip_volatile(obj, volatile):
    if isinstance(obj, dict):
        return {k: strip_volatile(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [strip_volatile(v, volatile) for v in obj]
    return obj


def _unwrap(doc):
    """A verified cache entry's payload (its envelope's checksum covers the volatile keys too)."""
    if isinstance(doc, dict) and set(doc) == {"fvtrust_cache", "data"}:
        return doc["data"]
    return doc


def compare_outputs(pipeline: Pipeline, ref: Path, got: Path) -> dict:
    """{file: "identical" | "equal (volatile keys aside)" | "DIFFERENT ..."} for each compared output."""
    volatile = VOLATILE | pipeline.volatile
    res = {}
    for rel in pipeline.outputs:
        a, b = ref / rel, got / rel
        if not b.is_file():
            res[rel] = "DIFFERENT: missing"
            continue
        if a.read_bytes() == b.read_bytes():
            res[rel] = "identical"
        elif rel.endswith(".json"):
            ja, jb = (strip_volatile(_unwrap(json.loads(p.read_text())), volatile) for p in (a, b))
            res[rel] = "equal (volatile keys aside)" if ja == jb else f"DIFFERENT: {_first_diff(ja, jb)}"
        elif rel.endswith(".safetensors"):
            res[rel] = _compare_tensors(a, b)
        else:
            res[rel] = "DIFFERENT bytes"
    return res


def _compare_tensors(a: Path, b: Path) -> str:
    """Weights must be the same bytes; when they are not, say whether the values or only the header differ.

    (Until fvtrust wrote canonical safetensors headers, the same weights came out as different bytes in
    different processes: safetensors orders its metadata map at random. That is what once looked like
    nondeterministic detector weights after a resume.)
    """
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return "DIFFERENT: tensor names or shapes"
    worst = max((float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0) for k in ta)
    return f"DIFFERENT bytes: values within max |diff| {worst:.2e}"


def _first_diff(a, b, path="") -> str:
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}/{k}: only in one"
            if a[k] != b[k]:
                return _first_diff(a[k], b[k], f"{path}/{k}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path}: {str(a)[:60]} vs {str(b)[:60]}"


def leftovers(root: Path) -> list[str]:
    """Temp files and staging folders (what a half-finished write would leave)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or ".staging." in p.name)


def kill_and_resume(pipeline: Pipeline, tmp: Path, *, kills: int = 5, seed: int = 0) -> dict:
    """The experiment of the module doc; returns a JSON-able record (asserts nothing)."""
    env = env_for(tmp)
    (tmp / "ref").mkdir()
    ref_out, ref_cache = tmp / "ref" / "out", tmp / "ref" / "cache"
    ref = run_fvtrust(pipeline, ref_out, ref_cache, env)
    record = {"pipeline": pipeline.name, "reference_rc": ref.returncode, "reference_events": len(ref.events),
              "reference_stderr": ref.stderr[-2000:] if ref.returncode else ""}
    if ref.returncode != 0 or len(ref.events) < kills + 1:
        return record
    rng = np.random.default_rng(seed)
    points = sorted(rng.choice(np.arange(1, len(ref.events)), size=kills, replace=False).tolist())
    gaps = [p - q for p, q in zip(points, [0] + points[:-1])]
    (tmp / "chain").mkdir()
    out, cache = tmp / "chain" / "out", tmp / "chain" / "cache"
    chain, all_written = [], []
    for gap in gaps:
        run = run_fvtrust(pipeline, out, cache, env, kill_at=gap)
        chain.append({"kill_at_event": gap, "killed": run.returncode == -signal.SIGKILL, "rc": run.returncode,
                      "events": len(run.events), "cache_hits": sum(e.startswith("cache-hit") for e in run.events),
                      "cache_writes": len(written(run.events)),
                      "stderr": run.stderr[-1000:] if run.returncode not in (0, -signal.SIGKILL) else ""})
        all_written += written(run.events)
    final = run_fvtrust(pipeline, out, cache, env)
    all_written += written(final.events)
    rewritten = sorted({p for p in all_written if all_written.count(p) > 1})
    record.update(points=points, chain=chain, final_rc=final.returncode, final_events=len(final.events),
                  final_cache_hits=sum(e.startswith("cache-hit") for e in final.events),
                  final_stderr=final.stderr[-2000:] if final.returncode else "",
                  kills=sum(c["killed"] for c in chain), rewritten_entries=rewritten,
                  outputs=compare_outputs(pipeline, ref_out, out) if final.returncode == 0 else {},
                  leftovers=leftovers(out))
    return record
