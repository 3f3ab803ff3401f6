"""Wall time of one pipeline on a local Ray cluster against the same pipeline in one process.

    python benchmarks/bench_scale.py [--workers 2] [--repeats 3] [--units 0-63] [--steps 32] [--chunk-units 16]

The audit of fashion-cnn block3 (its chunks of units are the shards), repeated and interleaved: one
process (torch with its default threads) vs `fvtrust.scale.workers` on `ray.init(num_cpus=W)` (one
single-threaded task per slot). The cluster's start is timed once, apart. Results are checked
identical every time. Prints the load average before and after: on a shared 2-core machine expect no
speedup (the cluster adds shipping and start-up costs, and both contenders use both cores). Under load, torch with
2 threads in one process can be several times slower than 2 single-threaded workers: `--threads 1`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--units", default="0-63")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk-units", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the one-process run (default: torch's; on a loaded machine 1 is fairer)")
    a = ap.parse_args()
    os.environ.setdefault("FVTRUST_PROGRESS", "0")
    import ray
    import torch

    from fvtrust.audit.core import audit
    from fvtrust.models import load_model
    from fvtrust.scale import workers

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model("fashion-cnn")
    kw = dict(units=a.units, steps=a.steps, natural_limit=1000, chunk_units=a.chunk_units)
    print(f"load before: {os.getloadavg()}; torch threads in one process: {torch.get_num_threads()}")
    t = time.perf_counter()
    ray.init(num_cpus=a.workers, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    print(f"ray.init(num_cpus={a.workers}): {time.perf_counter() - t:.1f} s (not counted below)")
    one, clu = [], []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            ref = audit(model, "block3", cache_dir=f"{d}/one", **kw)
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            with workers("auto"):
                got = audit(model, "block3", cache_dir=f"{d}/ray", **kw)
            clu.append(time.perf_counter() - t)
        assert got.units == ref.units and torch.equal(got.visualizations, ref.visualizations), "results differ"
        print(f"repeat {r + 1}: one process {one[-1]:.1f} s, ray {a.workers} workers {clu[-1]:.1f} s (identical)")
    ray.shutdown()
    print(f"best of {a.repeats}: one process {min(one):.1f} s, ray {min(clu):.1f} s, "
          f"ray / one process = {min(clu) / min(one):.2f}; load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
