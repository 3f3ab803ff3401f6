"""All-pairs Spearman on one large layer: fvtrust's rank-once engine vs scipy, same run.

Default: 128 rows x 802,816 ReLU-like values (Inception-V1's largest layer,
about half exact zeros, rows correlated in 8 "classes"). scipy.stats.spearmanr
is timed on a few pairs (it re-ranks both rows on every call); fvtrust computes
the whole 128 x 128 matrix. The per-comparison cost of fvtrust is its total time
divided by the n(n-1)/2 unique off-diagonal pairs (8,128 for 128 rows) -- the
conservative count; the n^2 entries it also fills are reported too.

Peak memory is the growth of the process's peak RSS during the fvtrust call
(Linux VmHWM, reset just before) or torch.cuda.max_memory_allocated on GPU.

    python benchmarks/bench_similarity.py                 # full size, CPU
    python benchmarks/bench_similarity.py --quick         # 32 x 100,352
    python benchmarks/bench_similarity.py --float32       # also dtype=float32 and its error
    python benchmarks/bench_similarity.py --stream 32     # also bounded-memory streaming
    python benchmarks/bench_similarity.py --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

from fvtrust.sanity.similarity import similarity, similarity_blocks  # noqa: E402


def make_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """ReLU(class pattern + noise) in float32: ~half zeros, with realistic ties."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(8, d, generator=g)
    x = torch.empty((n, d), dtype=torch.float32)
    for i in range(n):  # one row at a time keeps generation memory at O(d)
        noise = torch.randn(d, generator=g).mul_(0.5 + 1.5 * i / n)
        x[i] = torch.relu_(classes[i % 8] + noise - 0.1)
    return x


def reset_peak() -> int | None:
    """Reset the process's peak-RSS counter; return current RSS in bytes (None if unsupported).

    Freed heap is handed back to the OS first, so memory freed by an earlier
    run cannot hide this run's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def run_fvtrust(x: torch.Tensor, device: str, dtype: torch.dtype, stream_rows: int = 0):
    """Time similarity(x) (or its bounded-memory re-streaming form) and measure
    its extra peak memory (bytes)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = reset_peak()
    t = time.perf_counter()
    if stream_rows:  # B re-read per A block: only two prepared blocks are ever held
        blocks = lambda: (x[i : i + stream_rows] for i in range(0, len(x), stream_rows))  # noqa: E731
        s = similarity_blocks(blocks, blocks, "spearman", device=device, dtype=dtype)
    else:
        s = similarity(x, metric="spearman", device=device, dtype=dtype)  # returns on CPU: synchronised
    elapsed = time.perf_counter() - t
    if base is not None:
        peak = _status_kb("VmHWM") * 1024 - base
        how = "peak RSS growth (VmHWM)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "process max RSS (ru_maxrss, includes the input)"
    gpu = torch.cuda.max_memory_allocated() - base_gpu if cuda else None
    return s, elapsed, peak, how, gpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="rows (images); default 128, --quick 32")
    ap.add_argument("--features", type=int, default=None, help="values per row; default 802,816, --quick 100,352")
    ap.add_argument("--pairs", type=int, default=5, help="pairs timed with scipy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smaller problem (a few seconds)")
    ap.add_argument("--float32", action="store_true", help="also run dtype=float32, report its error")
    ap.add_argument("--stream", type=int, default=0, metavar="ROWS",
                    help="also run similarity_blocks with ROWS-row blocks, B re-streamed (bounded memory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.rows or (32 if args.quick else 128)
    d = args.features or (100_352 if args.quick else 802_816)
    if n < 2:
        ap.error("need at least 2 rows")

    print(f"rows={n} features={d} device={args.device} torch threads={torch.get_num_threads()}")
    x = make_rows(n, d, args.seed)
    xn = x.numpy()  # shares memory
    print(f"input: {x.nbytes / 2**20:.0f} MiB float32, {float((x == 0).float().mean()):.1%} zeros")

    rng = np.random.default_rng(args.seed)
    pairs = [tuple(int(v) for v in rng.choice(n, 2, replace=False)) for _ in range(args.pairs)]
    ref = []
    t = time.perf_counter()
    for i, j in pairs:
        ref.append(scipy.stats.spearmanr(xn[i], xn[j]).statistic)
    scipy_per_pair = (time.perf_counter() - t) / len(pairs)
    print(f"scipy.stats.spearmanr: {scipy_per_pair * 1e3:.1f} ms per comparison ({len(pairs)} pairs)")

    results = {}
    runs = [(torch.float64, 0)] + ([(torch.float32, 0)] if args.float32 else [])
    runs += [(torch.float64, args.stream)] if args.stream else []
    for dtype, stream in runs:
        s, elapsed, peak, how, gpu = run_fvtrust(x, args.device, dtype, stream)
        results.setdefault(dtype, s)
        unique = n * (n - 1) // 2
        per_pair = elapsed / unique
        err = max(abs(float(s[i, j]) - r) for (i, j), r in zip(pairs, ref))
        name = str(dtype).replace("torch.", "")
        name = f"similarity_blocks() {name}, {stream}-row blocks re-streamed" if stream else f"similarity() {name}"
        print(f"fvtrust {name}: {elapsed:.2f} s for {n}x{n} ({unique} unique pairs, {n * n} entries)")
        print(f"  per unique pair {per_pair * 1e3:.3f} ms -> speed-up {scipy_per_pair / per_pair:.0f}x per comparison"
              f" ({scipy_per_pair / (elapsed / (n * n)):.0f}x counting all {n * n} entries)")
        print(f"  memory: {how} {peak / 2**20:.0f} MiB"
              + (f"; GPU max allocated {gpu / 2**20:.0f} MiB" if gpu is not None else ""))
        print(f"  max |fvtrust - scipy| over the {len(pairs)} timed pairs: {err:.2e}")
        if results[torch.float64] is not s:
            dev = (s - results[torch.float64]).abs().max().item()
            print(f"  max |this - similarity() float64| over all {n * n} entries: {dev:.2e}")
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        sys.exit(main())
