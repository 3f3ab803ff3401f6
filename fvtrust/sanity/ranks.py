"""Average ranks per row ("ties share the mean of their positions"), in torch or numpy.

Why not ``scipy.stats.rankdata``: it ranks one row at a time with a slow
argsort. Here the result equals ``rankdata(method="average")`` exactly (average
ranks are integers or half-integers far below 2**53) and comes from one of two
implementations of the same arithmetic:

* **CPU, values exact in float32** (activations; also bool, small ints, fp16,
  and float64 that round-trips): one row per task on a thread pool of
  ``torch.get_num_threads()`` workers. A row's zeros (half of a post-ReLU
  layer) are one tie group whose size is all we need, so only the nonzero
  values are sorted: each becomes a 64-bit integer, an order-preserving key of
  its float32 bits above its position, and numpy sorts those (x86-simd-sort's
  AVX-512/AVX2 integer sort, ~10x faster than ``torch.sort`` with indices on
  the same row). The sorted integers give the sorted values and the
  permutation at once. numpy 2.4 holds the GIL in that sort and in the final
  scatter, so the workers only overlap the other steps (measured: 2 workers
  rank as fast as 1); that is why :func:`~fvtrust.sanity.similarity.similarity_blocks`
  overlaps ranking with the matrix products of the previous block instead.
* **Anything else** (GPU, float64 that float32 would round, huge rows): one
  batched ``torch.sort`` over the block and a tie pass on the flattened
  sorted block, with no Python loop over rows or groups (:func:`tie_groups`).

Both describe ties the same way: a sorted position starts a new group when its
value differs from its left neighbour; a group of ``count`` equal values
starting at sorted position ``s`` (0-based) has average 1-based rank
``s + (count + 1) / 2``, so twice its centred rank, ``2 s + count - d``, is an
exact integer. Values per position come from one scatter through the
permutation. The sum of squared centred ranks has the closed form
``(d**3 - d - sum(t**3 - t)) / 12`` over tie groups of size t (exact integers).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Bytes of temporaries per ranked element (sort values and int64 order, group
# ids, group arrays, scattered ranks): sizes row blocks from a memory budget.
BYTES_PER_RANKED_VALUE = 64
# Centred ranks are multiples of 1/2 with |value| <= d / 2; float32 holds them
# exactly while 2 * |value| < 2**24, which halves gather/scatter traffic.
_FLOAT32_EXACT_D = 2**23
# t**3 - t for ties stays exact in int64 up to this many values per row.
_INT64_CUBE_D = 2**21 - 1
# Positions are packed below the key in a uint64, so they must fit 32 bits.
_PACKED_MAX_D = 2**32 - 1
# Halves of a uint64 viewed as two uint32 (key above the position).
_KEY, _POS = (1, 0) if sys.byteorder == "little" else (0, 1)
_SIGN = np.uint32(0x8000_0000)
_LOW31 = np.uint32(0x7FFF_FFFF)
# Dtypes whose every value is exact in float32 (same order, same ties).
_EXACT_IN_FLOAT32 = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16)


def tie_groups(x: torch.Tensor):
    """Sort each row of ``x`` (b, d) and describe its runs of equal values.

    Returns ``(order, gid, start, count, row)``: ``order`` (b, d) argsort of
    each row; ``gid`` (b*d,) the group of every flat sorted position; per group
    its first sorted position *within its row* ``start``, its size ``count``
    and its ``row`` (all int64). NaN never equals itself, so every NaN is a
    group of its own (callers mark NaN rows separately).
    """
    b, d = x.shape
    values, order = torch.sort(x, dim=1)
    new = torch.empty(values.shape, dtype=torch.bool, device=x.device)
    new[:, 0] = True
    torch.ne(values[:, 1:], values[:, :-1], out=new[:, 1:])
    del values
    flat = new.view(-1)
    # int32 group ids halve the memory traffic of the cumsum and the gather.
    gid = flat.cumsum(0, dtype=torch.int32 if b * d < 2**31 else torch.int64)
    gid -= 1
    start = flat.nonzero().squeeze(1)  # flat sorted position of each group's first value
    del new, flat
    count = torch.empty_like(start)
    torch.sub(start[1:], start[:-1], out=count[:-1])
    count[-1] = b * d - start[-1]
    row = torch.div(start, d, rounding_mode="floor")
    start -= row * d
    return order, gid, start, count, row


def centred_ranks(x: torch.Tensor, with_mode: bool = False):
    """Average ranks minus their mean (d + 1) / 2, per row of ``x`` (b, d), and the row norms.

    Returns ``(centred, norm)``: ``centred`` (b, d) in float32 when that is
    exact (d < 2**23), else float64; ``norm`` (b,) float64 Euclidean norm of
    each centred row, from the closed form sum = (d**3 - d - sum(t**3 - t)) / 12
    over tie groups of size t (exact integers), 0 for constant rows. Rows with
    NaN are not treated specially here. ``with_mode`` adds a third result: the
    centred rank (b,) of each row's largest tie group (its first, if several),
    0 for rows without ties (shifting a singleton would only lengthen the row).
    """
    b, d = x.shape
    dtype = torch.float32 if d < _FLOAT32_EXACT_D else torch.float64
    rows = _float32_rows(x)
    if rows is None:
        return _centred_ranks_torch(x, with_mode)
    centred = torch.empty((b, d), dtype=dtype)
    norm, mode = _rank_rows(rows, centred.numpy(), unit=False, shift_mode=False)
    norm = torch.from_numpy(norm).to(x.device)
    return (centred, norm, torch.from_numpy(mode).to(dtype)) if with_mode else (centred, norm)


def unit_ranks(x: torch.Tensor, out: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Spearman's prepared rows: centred average ranks scaled to unit length, written into ``out``.

    ``out`` (b, d) float32 or float64 receives ``centred / norm`` (one float64
    division per value, then one rounding to ``out``'s dtype); constant rows
    become 0 / 0 = NaN. With ``shift`` (b,) float64, each row's largest tie
    group is moved to exactly 0 first: ``out = (centred - c0) / norm`` and
    ``shift = c0 / norm`` (see :class:`fvtrust.sanity.similarity.Prepared`).
    """
    rows = _float32_rows(x) if out.device.type == "cpu" and out.is_contiguous() else None
    if rows is not None:
        norm, c0 = _rank_rows(rows, out.numpy(), unit=True, shift_mode=shift is not None)
        if shift is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                shift.copy_(torch.from_numpy(c0 / norm))
        return
    if shift is None:
        centred, norm = _centred_ranks_torch(x)
    else:
        centred, norm, c0 = _centred_ranks_torch(x, with_mode=True)
        centred -= c0.unsqueeze(1)  # exact: half-integers of magnitude < 2**23
        torch.div(c0.to(torch.float64), norm, out=shift)
    torch.div(centred, norm.unsqueeze(1), out=out)  # float64 division, one rounding


def _centred_ranks_torch(x: torch.Tensor, with_mode: bool = False):
    """:func:`centred_ranks` as batched torch ops (any device, any sortable dtype)."""

    b, d = x.shape
    order, gid, start, count, row = tie_groups(_sortable(x))
    num = start.mul_(2)
    num += count
    num -= d  # 2 * (average rank - (d + 1) / 2), an exact integer
    dtype = torch.float32 if d < _FLOAT32_EXACT_D else torch.float64
    per_group = num.to(dtype).mul_(0.5)
    del num
    if with_mode:
        biggest = torch.zeros(b, dtype=count.dtype, device=x.device).scatter_reduce_(0, row, count, "amax")
        group = torch.arange(len(count), device=x.device)
        group[count != biggest.index_select(0, row)] = len(count)
        first = torch.full((b,), len(count), device=x.device).scatter_reduce_(0, row, group, "amin")
        mode = per_group.index_select(0, first)
        mode[biggest == 1] = 0.0
    centred = torch.empty((b, d), dtype=dtype, device=x.device)
    centred.scatter_(1, order, per_group.index_select(0, gid).view(b, d))
    del order, gid, per_group
    tied = (count > 1).nonzero().squeeze(1)  # few groups: singletons add t**3 - t = 0
    t = count[tied] if d <= _INT64_CUBE_D else count[tied].to(torch.float64)
    ties = torch.zeros(b, dtype=t.dtype, device=x.device).index_add_(0, row[tied], t * t * t - t)
    total = d**3 - d if d <= _INT64_CUBE_D else float(d) ** 3 - d
    norm = (total - ties).to(torch.float64).div_(12).sqrt_()
    norm[row[count == d]] = 0.0  # constant rows: exactly zero even if the float path rounded
    return (centred, norm, mode) if with_mode else (centred, norm)


def rank_block(x: torch.Tensor) -> torch.Tensor:
    """Average ranks of every row of ``x`` (b, d) as float64; rows with NaN -> all NaN."""
    centred, _ = centred_ranks(x)
    out = centred.to(torch.float64).add_((x.shape[1] + 1) / 2)
    if x.is_floating_point():
        out[torch.isnan(x).any(dim=1)] = float("nan")
    return out


def average_ranks(X, *, block_rows: int | None = None, device=None) -> torch.Tensor:
    """Rank every row of ``X`` like ``scipy.stats.rankdata(row, method="average")``.

    ``X`` is a tensor or array with rows = samples (more than two dims are
    flattened after the first). Rows containing NaN come back all-NaN, as with
    rankdata's default ``nan_policy="propagate"``. Returns float64 on ``device``
    (default: ``X``'s device). Rows are ranked ``block_rows`` at a time to bound
    the temporaries.
    """
    from fvtrust.sanity.similarity import _Rows  # shared input validation

    rows = _Rows(X, "X", device)
    out = torch.empty((rows.n, rows.d), dtype=torch.float64, device=rows.device)
    step = block_rows or rows.auto_block_rows()
    for i in range(0, rows.n, step):
        out[i : i + step] = rank_block(rows.block(i, i + step))
    return out


def _sortable(x: torch.Tensor) -> torch.Tensor:
    """A dtype torch sorts everywhere, with the same ties (conversions are exact)."""
    if x.dtype == torch.bool:
        return x.to(torch.uint8)
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.to(torch.float32)
    return x


# ------------------------------------------------------------ CPU, per row


def _float32_rows(x: torch.Tensor) -> np.ndarray | None:
    """``x`` as a C-contiguous float32 numpy array ranking exactly like ``x``, or None
    when the numpy path does not apply (not on CPU, rows too long, values that
    float32 would round)."""
    if x.device.type != "cpu" or x.shape[1] > _PACKED_MAX_D:
        return None
    if x.dtype == torch.float32:
        a = x
    elif x.dtype in _EXACT_IN_FLOAT32:
        a = x.to(torch.float32)
    else:  # float64, wider ints: exact only if the round trip is (NaN never is: torch path)
        a = x.to(torch.float32)
        if not torch.equal(a.to(x.dtype), x):
            return None
    return a.contiguous().numpy()


_pool_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool per size and process (a forked child must not inherit a pool whose threads it lacks)."""
    key = (os.getpid(), workers)
    with _pool_lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="fvtrust-ranks")
        return _pools[key]


def _rank_rows(rows: np.ndarray, out: np.ndarray, *, unit: bool, shift_mode: bool):
    """Rank every row of ``rows`` (b, d) float32 into ``out``; returns per-row
    float64 arrays (norm, c0), c0 the centred rank of the row's largest tie group."""
    b = rows.shape[0]
    norm, c0 = np.empty(b), np.empty(b)

    def one(k: int) -> None:
        norm[k], c0[k] = _rank_row(rows[k], out[k], unit, shift_mode)

    workers = min(b, max(1, torch.get_num_threads()))
    if workers == 1:
        for k in range(b):
            one(k)
    else:
        for _ in _pool(workers).map(one, range(b)):  # re-raises a worker's exception
            pass
    return norm, c0


def _rank_row(row: np.ndarray, out: np.ndarray, unit: bool, shift_mode: bool) -> tuple[float, float]:
    """One row: write its centred ranks (``unit``: divided by the norm; ``shift_mode``:
    minus the largest tie group's) into ``out``; return (norm, c0)."""
    d = row.shape[0]
    nz = np.flatnonzero(row != 0)  # -0.0 is a zero too; a bool mask is ~15x faster than the floats
    m, z = nz.shape[0], d - nz.shape[0]
    packed = np.empty(m, np.uint64)
    halves = packed.view(np.uint32).reshape(m, 2)
    bits = row[nz].view(np.uint32)
    # Order-preserving key of a float's bits: flip every bit of a negative
    # value, only the sign bit of a positive one (infinities sort last/first).
    np.bitwise_xor(bits, (bits >> 31) * _LOW31 | _SIGN, out=halves[:, _KEY])
    halves[:, _POS] = nz
    del nz, bits
    packed.sort()
    keys = halves[:, _KEY]
    new = np.empty(m, bool)
    if m:
        new[0] = True
        np.not_equal(keys[1:], keys[:-1], out=new[1:])
    start = np.flatnonzero(new)  # group starts among the sorted nonzero values
    count = np.diff(start, append=m)
    neg = int(np.searchsorted(keys, _SIGN))  # keys below the sign bit are negative values
    after = int(np.searchsorted(start, neg))  # first group after the zeros
    start[after:] += z  # positions in the full sorted row, zeros included
    order = halves[:, _POS].astype(np.intp)  # contiguous intp: the scatter below is ~3x faster than via uint32
    del packed, halves, keys, new
    # Closed-form sum of squared centred ranks.
    tied = count[count > 1]
    if d <= _INT64_CUBE_D:
        ties = int((tied * tied * tied - tied).sum()) + (z**3 - z)
        norm = float(d**3 - d - ties) / 12
    else:
        t = tied.astype(np.float64)
        norm = (float(d) ** 3 - d - float((t * t * t - t).sum()) - (float(z) ** 3 - z)) / 12
    norm = 0.0 if z == d or (m and count[0] == d) else float(np.sqrt(norm))
    # The largest tie group (the first of several): zeros sit between groups after-1 and after.
    two_c0 = 0
    if m:
        k = int(count.argmax())
        if count[k] > 1:  # rows without ties are not shifted
            two_c0 = int(2 * start[k] + count[k] - d)
    if z > 1 and (not m or z > count[k] or (z == count[k] and after <= k)):
        two_c0 = 2 * neg + z - d
    c0 = two_c0 / 2
    shift = two_c0 if shift_mode else 0
    # 2 * centred rank per group, an exact integer; then one float64 rounding.
    two_c = 2 * start + count - (d + shift)
    scale = 2 * norm if unit else 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = two_c / scale
        if z:
            out.fill(np.float64(2 * neg + z - d - shift) / scale)
    out[order] = np.repeat(vals, count)
    return norm, c0
