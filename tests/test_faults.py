"""Kill long pipelines with SIGKILL at seeded points of their own progress; reruns must resume to the same outputs.

See tests/faults.py for the experiment. Each pipeline runs at the smallest
budgets that still have several units of cached work (chunks, layers, units,
steps). Outputs are compared byte for byte; JSON files that differ in bytes
must be equal once the keys that record timing or provenance (faults.VOLATILE:
seconds, cached flags, cache paths, the command line) are dropped.

To add a pipeline, add a `Pipeline` row.
FVTRUST_FAULT_KILLS (default 5) and FVTRUST_FAULT_SEED (default 0) choose
how many kill points and which; FVTRUST_FAULT_REPORT=FILE appends each
pipeline's record (kill points, chain, output comparison) as a JSON line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faults import Pipeline, kill_and_resume  # noqa: E402

PIPELINES = [
    Pipeline("detector", ("fool", "detector", "fashion-cnn", "--layer", "fc", "--budget", "tiny", "--max-units", "12",
                          "--det-steps", "8", "--epochs", "3", "--natural-limit", "2000", "--cache", "{cache}",
                          "--out", "{out}"),
             ("report.json", "detector.json", "detector.safetensors")),
    Pipeline("reproduce", ("reproduce", "--budget", "smoke", "--only", "accuracy,trajectories,theory,linearity",
                           "--out", "{out}"),
             ("results.json", "steps/accuracy/result.json", "steps/trajectories/result.json",
              "steps/theory/result.json", "steps/linearity/result.json", "steps/trajectories/figure3.png")),
    Pipeline("sanity-check", ("sanity-check", "fashion-cnn", "--classes", "0,1,2", "--per-class", "2",
                              "--per-class-natural", "4", "--steps", "8", "--out", "{out}"),
             ("similarity.json", "normalized_spearman.png", "absolute_cosine.png")),
    Pipeline("linearity", ("linearity", "fashion-cnn", "block3", "--units", "0-5", "--m", "2", "--steps", "8",
                           "--natural-limit", "500", "--group-size", "1", "--out", "{out}"),
             ("linearity.json", "path_curves.png")),
    Pipeline("slingshot", ("fool", "slingshot", "fashion-cnn", "--layer", "fc", "--unit", "0", "--target", "camera",
                           "--epochs", "3", "--fit-images", "64", "--batch-size", "32", "--tunnel-batch", "8",
                           "--steps", "8", "--natural-limit", "500", "--out", "{out}"),
             ("report.json", "model/weights.safetensors", "figure.png"),
             volatile=frozenset({"timing", "resumed_from_epoch"})),  # this process's CPU time; where it resumed
    Pipeline("audit", ("audit", "fashion-cnn", "--layer", "block3", "--units", "0-11", "--steps", "8", "--top-k", "4",
                       "--natural-limit", "300", "--chunk-units", "3", "--out", "{out}"),
             ("audit.json",)),  # index.html prints the run's seconds
]

RESULTS = []


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.name for p in PIPELINES])
def test_kill_and_resume(pipeline, tmp_path, request):
    kills = int(os.environ.get("FVTRUST_FAULT_KILLS", "5"))
    seed = int(os.environ.get("FVTRUST_FAULT_SEED", "0"))
    rec = kill_and_resume(pipeline, tmp_path, kills=kills, seed=seed)
    RESULTS.append(rec)
    if os.environ.get("FVTRUST_FAULT_REPORT"):  # one JSON line per pipeline, for notes and CI artifacts
        with open(os.environ["FVTRUST_FAULT_REPORT"], "a") as f:
            f.write(json.dumps(rec) + "\n")
    request.config._fvtrust_faults = RESULTS
    summary = json.dumps({k: v for k, v in rec.items() if k != "chain"}, indent=1)
    assert rec["reference_rc"] == 0, f"reference run failed:\n{rec['reference_stderr']}"
    assert rec["reference_events"] > kills, f"too few progress events to place {kills} kills"
    assert rec["kills"] == kills, f"not every process was killed: {json.dumps(rec['chain'], indent=1)}"
    bad = [c for c in rec["chain"] if c["stderr"]]
    assert not bad, f"a killed run failed on its own: {bad}"
    assert rec["final_rc"] == 0, f"the rerun after the kills failed:\n{rec['final_stderr']}"
    assert not rec["rewritten_entries"], f"completed work was recomputed: {rec['rewritten_entries']}"
    assert all(not v.startswith("DIFFERENT") for v in rec["outputs"].values()), summary
    assert not rec["leftovers"], f"half-written files left: {rec['leftovers']}"
