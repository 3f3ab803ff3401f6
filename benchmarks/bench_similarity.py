"""All-pairs Spearman on one large layer: fvtrust's rank-once engine vs scipy, same run.

Default: 128 rows x 802,816 ReLU-like values (Inception-V1's largest layer,
about half exact zeros, rows correlated in 8 "classes"). fvtrust computes the
whole 128 x 128 matrix; its per-comparison cost is its total time divided by
the n(n-1)/2 unique off-diagonal pairs (8,128 for 128 rows) -- the
conservative count; the n^2 entries it also fills are reported too.

The baseline, scipy.stats.spearmanr(a, b) per pair (it re-ranks both rows on
every call), is timed on --pairs pairs right before *every* fvtrust repeat, so
each repeat's ratio compares two timings taken under the same machine load
(other jobs on a shared machine slow both, but not equally). Every repeat is
printed, with the load average, then the best and the median ratio.

Accuracy, in the same output: the max deviation from scipy.stats.spearmanr on
the pairs it was timed on, and from the *exact* value on all pairs of the first
--exact-rows rows: twice the centred average ranks (scipy.stats.rankdata) are
integers below 2**20, split into two 11-bit halves whose float64 products and
sums are exact, so their dot products are exact integers.

--stream: the rows are written to a file first and streamed from it in
blocks by similarity_blocks(), with a memory budget of a quarter of the
prepared rows (--stream-keep), so three quarters of them are spilled to disk
and read back for every later block. The OS page cache cannot hide those reads:
input and spill files are read with O_DIRECT (or, where the file system
refuses it, have their pages dropped with posix_fadvise DONTNEED before every
read), and the bytes the process actually fetched from storage
(/proc/self/io read_bytes) are printed next to the bytes it asked for.

--floor (default on): the time of the two steps nothing can skip, measured in
the same run -- numpy's sort of every row's packed (key, position) integers
(its nonzero values, as fvtrust sorts them, on the same thread pool) and one
float64 torch.mm of the prepared rows with themselves (n x n) -- and the
ratio to scipy they would allow.

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
            # reuse=True: each block is consumed before the next is read, as in any streaming pipeline
            s = similarity_blocks(f.blocks(rows, reuse=True), None, "spearman", device=device, dtype=dtype,
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


def load() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load n/a"


def exact_spearman(x: np.ndarray) -> np.ndarray:
    """Spearman of every pair of rows of ``x`` (k, d), exact up to the final float64 division.

    2 * (rank - (d + 1) / 2) is an integer with |value| < d < 2**20; split into
    hi * 2**11 + lo (|hi| <= 512, |lo| <= 1024) every product is below 2**20
    and every partial sum below 2**20 * d < 2**53, so the float64 products of
    the halves are exact whatever order BLAS adds in."""
    k, d = x.shape
    if d >= 2**22:
        raise SystemExit("--features too large for the exact reference (needs d < 2**22)")
    two_c = np.rint(2 * scipy.stats.rankdata(x, axis=1) - (d + 1)).astype(np.int64)
    hi = np.rint(two_c / 2048).astype(np.int64)
    lo = two_c - hi * 2048
    h, lo_ = torch.from_numpy(hi.astype(np.float64)), torch.from_numpy(lo.astype(np.float64))
    hh, hl, ll = ((u @ v.T).numpy().astype(np.int64) for u, v in ((h, h), (h, lo_), (lo_, lo_)))
    g = hh * 2**22 + (hl + hl.T) * 2**11 + ll  # exact integer dot products (< 2**63)
    norm = np.sqrt(np.diag(g).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return g.astype(np.float64) / np.outer(norm, norm)


def time_floor(x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Best-of times of (sort every row's nonzero packed keys on the rank pool, n x n float64 product)."""
    from fvtrust.sanity import ranks

    xn = x.numpy()
    n = len(xn)
    workers = max(1, torch.get_num_threads())

    def sort_row(k: int) -> None:
        row = xn[k]
        nz = np.flatnonzero(row != 0)
        packed = (row[nz].view(np.uint32).astype(np.uint64) << np.uint64(32)) | nz.astype(np.uint64)
        packed.sort()

    pool = ranks._pool(workers)
    sort_t, mm_t = [], []
    v = torch.randn(x.shape, dtype=torch.float64)
    for _ in range(repeats):
        t = time.perf_counter()
        list(pool.map(sort_row, range(n)))
        sort_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        v @ v.T
        mm_t.append(time.perf_counter() - t)
    return min(sort_t), min(mm_t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="rows (images); default 128, --quick 32")
    ap.add_argument("--features", type=int, default=None, help="values per row; default 802,816, --quick 100,352")
    ap.add_argument("--pairs", type=int, default=3, help="pairs timed with scipy before every fvtrust repeat")
    ap.add_argument("--exact-rows", type=int, default=32, help="rows whose all pairs are checked against the "
                    "exact value (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smaller problem (a few seconds)")
    ap.add_argument("--float32", action="store_true", help="also run dtype=float32, report its error")
    ap.add_argument("--stream", type=int, nargs="?", const=32, default=0, metavar="ROWS",
                    help="also run similarity_blocks from a file, ROWS-row blocks (default 32), rows spilled")
    ap.add_argument("--stream-keep", type=float, default=0.25, metavar="FRACTION",
                    help="memory budget for kept prepared rows, as a fraction of all of them (default 0.25)")
    ap.add_argument("--stream-dir", default=None, help="where the input and spill files go (default: temp dir)")
    ap.add_argument("--no-floor", dest="floor", action="store_false", help="skip the sort + product floor")
    ap.add_argument("--repeats", type=int, default=3, help="fvtrust runs per variant (each printed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.rows or (32 if args.quick else 128)
    d = args.features or (100_352 if args.quick else 802_816)
    if n < 2:
        ap.error("need at least 2 rows")

    print(f"rows={n} features={d} device={args.device} torch threads={torch.get_num_threads()} {load()}")
    x = make_rows(n, d, args.seed)
    xn = x.numpy()  # shares memory
    print(f"input: {x.nbytes / 2**20:.0f} MiB float32, {float((x == 0).float().mean()):.1%} zeros")

    rng = np.random.default_rng(args.seed)
    all_pairs = [tuple(int(v) for v in rng.choice(n, 2, replace=False)) for _ in range(args.pairs * 8)]
    scipy_ref: dict = {}
    pair_cursor = [0]

    def time_scipy() -> float:
        """Seconds per spearmanr call on the next --pairs pairs (cycling), results kept for the deviation."""
        k = pair_cursor[0]
        batch = [all_pairs[(k + i) % len(all_pairs)] for i in range(args.pairs)]
        pair_cursor[0] = k + args.pairs
        t = time.perf_counter()
        for i, j in batch:
            scipy_ref[(i, j)] = scipy.stats.spearmanr(xn[i], xn[j]).statistic
        return (time.perf_counter() - t) / len(batch)

    exact = None
    if args.exact_rows:
        k = min(n, args.exact_rows)
        t = time.perf_counter()
        exact = exact_spearman(xn[:k])
        print(f"exact reference: all {k * (k + 1) // 2} entries of the first {k} rows "
              f"({time.perf_counter() - t:.1f} s)")

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
        with RowFile(path, d, np.float32, drop_cache=True) as f:
            how = "O_DIRECT reads" if f.direct_fd >= 0 else "page cache dropped before every read"
        print(f"stream input: {path} ({n * d * 4 / 2**20:.0f} MiB), {how}")
    unique = n * (n - 1) // 2
    results, best_times = {}, {}
    for dtype, stream in runs:
        stream_args, asked = None, None
        if stream:
            row_bytes = d * (8 if dtype == torch.float64 else 4)
            keep = int(args.stream_keep * n * row_bytes)
            stream_args = (path, stream, keep, tmp.name)
            kept_rows = min(n, keep // row_bytes // stream * stream)  # whole blocks that fit the budget
            asked = n * d * 4 + sum(max(0, i - kept_rows) for i in range(0, n, stream)) * row_bytes
        name = str(dtype).replace("torch.", "")
        if stream:
            name = (f"similarity_blocks() {name}, {stream}-row blocks from disk, "
                    f"{args.stream_keep:.0%} of the prepared rows kept in memory, the rest spilled")
        else:
            name = f"similarity() {name}"
        print(f"fvtrust {name}: {n}x{n} ({unique} unique pairs, {n * n} entries)")
        reps = []
        for r in range(args.repeats):
            scipy_per_pair = time_scipy()
            io0 = storage_io()
            before = load()
            s, elapsed, peak, how, gpu = run_fvtrust(x, args.device, dtype, stream_args)
            io1 = storage_io()
            ratio = scipy_per_pair / (elapsed / unique)
            reps.append((ratio, elapsed, s, peak, how, gpu))
            line = (f"  repeat {r + 1}: {elapsed:.2f} s = {elapsed / unique * 1e3:.3f} ms per unique pair; "
                    f"scipy {scipy_per_pair * 1e3:.1f} ms per pair just before -> {ratio:.0f}x per comparison "
                    f"({ratio * n * n / unique:.0f}x counting all {n * n} entries); {before}")
            if stream and io0 is not None:
                line += (f"; storage read {(io1[0] - io0[0]) / 2**20:.0f} MiB (requested {asked / 2**20:.0f} MiB),"
                         f" written {(io1[1] - io0[1]) / 2**20:.0f} MiB")
            print(line, flush=True)
        ratios = sorted(rep[0] for rep in reps)
        best = max(reps, key=lambda rep: rep[0])
        _, elapsed, s, peak, how, gpu = best
        print(f"  speed-up per comparison over {args.repeats} repeats: best {ratios[-1]:.0f}x, "
              f"median {ratios[len(ratios) // 2]:.0f}x, worst {ratios[0]:.0f}x")
        results.setdefault(dtype, s)
        if torch.float64 in best_times and results[torch.float64] is not s:
            print(f"  best time vs similarity() float64 in memory: {elapsed / best_times[torch.float64]:.2f}x")
        best_times.setdefault(dtype, elapsed)
        print(f"  memory: {how} {peak / 2**20:.0f} MiB"
              + (f"; GPU max allocated {gpu / 2**20:.0f} MiB" if gpu is not None else ""))
        err = max(abs(float(s[i, j]) - v) for (i, j), v in scipy_ref.items())
        print(f"  max |fvtrust - scipy.stats.spearmanr| over the {len(scipy_ref)} timed pairs: {err:.2e}")
        if exact is not None:
            k = len(exact)
            tri = np.tril_indices(k)
            dev = np.abs(s[:k, :k].numpy()[tri] - exact[tri]).max()
            print(f"  max |fvtrust - exact| over all {len(tri[0])} entries of the first {k} rows: {dev:.2e}")
        if results[torch.float64] is not s:
            dev = (s - results[torch.float64]).abs().max().item()
            print(f"  max |this - similarity() float64| over all {n * n} entries: {dev:.2e}")
    if args.floor and args.device == "cpu":
        t_sort, t_mm = time_floor(x, args.repeats)
        scipy_per_pair = time_scipy()
        floor = t_sort + t_mm
        print(f"floor (best of {args.repeats}): numpy sort of every row's nonzero packed keys {t_sort:.2f} s + "
              f"float64 torch.mm {n}x{d} @ {d}x{n} {t_mm:.2f} s = {floor:.2f} s -> at most "
              f"{scipy_per_pair / (floor / unique):.0f}x scipy per comparison "
              f"(scipy {scipy_per_pair * 1e3:.1f} ms per pair now); {load()}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        sys.exit(main())
