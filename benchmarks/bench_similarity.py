"""All-pairs Spearman on one large layer: fvtrust's rank-once engine vs scipy, same run.

Default: 128 rows x 802,816 ReLU-like values (Inception-V1's largest layer,
about half exact zeros, rows correlated in 8 "classes"). scipy.stats.spearmanr
is timed on a few pairs (it re-ranks both rows on every call); fvtrust computes
the whole 128 x 128 matrix. The per-comparison cost of fvtrust is its total time
divided by the n(n-1)/2 unique off-diagonal pairs (8,128 for 128 rows) -- the
conservative count; the n^2 entries it also fills are reported too.

--stream: the rows are written to a file first and streamed from it in
blocks by similarity_blocks(), with a memory budget of a quarter of the
prepared rows (--stream-keep), so three quarters of them are spilled to disk
and read back for every later block. The OS page cache cannot hide those reads:
the input file and the spill file have their pages dropped
(posix_fadvise DONTNEED, after fdatasync for writes) before every read, and the
bytes the process actually fetched from storage (/proc/self/io read_bytes) are
printed next to the bytes it asked for.

Peak memory is the growth of the process's peak RSS during the fvtrust call
(Linux VmHWM, reset just before) or torch.cuda.max_memory_allocated on GPU.

    python benchmarks/bench_similarity.py                 # full size, CPU
    python benchmarks/bench_similarity.py --quick         # 32 x 100,352
    python benchmarks/bench_similarity.py --float32       # also dtype=float32 and its error
    python benchmarks/bench_similarity.py --stream        # also out-of-core streaming (32-row blocks)
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

from fvtrust.sanity.rowfile import RowFile  # noqa: E402
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


def storage_io() -> tuple[int, int] | None:
    """(read_bytes, write_bytes) this process moved to/from storage, not the page cache."""
    try:
        with open("/proc/self/io") as f:
            kv = dict(line.split(": ") for line in f.read().splitlines())
        return int(kv["read_bytes"]), int(kv["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def run_fvtrust(x: torch.Tensor, device: str, dtype: torch.dtype, stream=None):
    """Time similarity(x) (or similarity_blocks over the file ``stream`` = (path,
    rows, keep_bytes, spill_dir)) and measure its extra peak memory (bytes)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = reset_peak()
    t = time.perf_counter()
    if stream:  # rows from disk, prepared once each, 3/4 of the prepared rows spilled to disk
        path, rows, keep, spill_dir = stream
        with RowFile(path, x.shape[1], np.float32, drop_cache=True) as f:
            s = similarity_blocks(f.blocks(rows), None, "spearman", device=device, dtype=dtype,
                                  memory_bytes=keep, spill_dir=spill_dir)
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
    ap.add_argument("--stream", type=int, nargs="?", const=32, default=0, metavar="ROWS",
                    help="also run similarity_blocks from a file, ROWS-row blocks (default 32), rows spilled")
    ap.add_argument("--stream-keep", type=float, default=0.25, metavar="FRACTION",
                    help="memory budget for kept prepared rows, as a fraction of all of them (default 0.25)")
    ap.add_argument("--stream-dir", default=None, help="where the input and spill files go (default: temp dir)")
    ap.add_argument("--repeats", type=int, default=3, help="fvtrust runs per variant; the best is reported")
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

    results, times = {}, {}
    runs = [(torch.float64, 0)] + ([(torch.float32, 0)] if args.float32 else [])
    runs += [(torch.float64, args.stream)] + ([(torch.float32, args.stream)] if args.float32 else []) \
        if args.stream else []
    tmp = None
    if args.stream:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="bench-sim-", dir=args.stream_dir)
        path = os.path.join(tmp.name, "rows.f32")
        with RowFile(path, d, np.float32, "w", drop_cache=True) as f:
            for i in range(0, n, 16):
                f.append(xn[i : i + 16])
        print(f"stream input: {path} ({n * d * 4 / 2**20:.0f} MiB), page cache dropped")
    for dtype, stream in runs:
        stream_args, asked = None, None
        if stream:
            row_bytes = d * (8 if dtype == torch.float64 else 4)
            keep = int(args.stream_keep * n * row_bytes)
            stream_args = (path, stream, keep, tmp.name)
            kept_rows = min(n, keep // row_bytes // stream * stream)  # whole blocks that fit the budget
            asked = n * d * 4 + sum(max(0, i - kept_rows) for i in range(0, n, stream)) * row_bytes
        best = None
        for _ in range(args.repeats):  # best of: load on a shared machine only ever adds time
            io0 = storage_io()
            s, elapsed, peak, how, gpu = run_fvtrust(x, args.device, dtype, stream_args)
            io1 = storage_io()
            if best is None or elapsed < best[1]:
                best = (s, elapsed, peak, how, gpu, io0, io1)
        s, elapsed, peak, how, gpu, io0, io1 = best
        results.setdefault(dtype, s)
        unique = n * (n - 1) // 2
        per_pair = elapsed / unique
        err = max(abs(float(s[i, j]) - r) for (i, j), r in zip(pairs, ref))
        name = str(dtype).replace("torch.", "")
        if stream:
            name = (f"similarity_blocks() {name}, {stream}-row blocks from disk, "
                    f"{args.stream_keep:.0%} of the prepared rows kept in memory, the rest spilled")
        else:
            name = f"similarity() {name}"
        print(f"fvtrust {name}: {elapsed:.2f} s for {n}x{n} ({unique} unique pairs, {n * n} entries; "
              f"best of {args.repeats})")
        print(f"  per unique pair {per_pair * 1e3:.3f} ms -> speed-up {scipy_per_pair / per_pair:.0f}x per comparison"
              f" ({scipy_per_pair / (elapsed / (n * n)):.0f}x counting all {n * n} entries)")
        if torch.float64 in results and results[torch.float64] is not s:
            print(f"  time vs similarity() float64 in memory: {elapsed / times[torch.float64]:.2f}x")
        times.setdefault(dtype, elapsed)
        if stream and io0 is not None:
            print(f"  storage I/O of that run (/proc/self/io): read {(io1[0] - io0[0]) / 2**20:.0f} MiB "
                  f"(requested {asked / 2**20:.0f} MiB), written {(io1[1] - io0[1]) / 2**20:.0f} MiB")
        print(f"  memory: {how} {peak / 2**20:.0f} MiB"
              + (f"; GPU max allocated {gpu / 2**20:.0f} MiB" if gpu is not None else ""))
        print(f"  max |fvtrust - scipy| over the {len(pairs)} timed pairs: {err:.2e}")
        if results[torch.float64] is not s:
            dev = (s - results[torch.float64]).abs().max().item()
            print(f"  max |this - similarity() float64| over all {n * n} entries: {dev:.2e}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        sys.exit(main())
