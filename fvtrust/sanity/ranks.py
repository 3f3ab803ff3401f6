"""Average ranks per row ("ties share the mean of their positions"), in torch.

Why not ``scipy.stats.rankdata``: it ranks one row at a time on one core. Here
a block of rows is ranked with one sort plus a few linear passes, on CPU or
GPU, and the result equals ``rankdata(method="average")`` exactly: average ranks
are integers or half-integers far below 2**53, exact in float64.

The tie machinery works on the flattened, row-sorted block, so there is no
Python loop over rows, elements or tie groups: a sorted position starts a new
group when its value differs from its left neighbour (or it opens a row); a
cumulative sum of those starts numbers the groups; a group of ``count`` equal
values starting at sorted position ``s`` of its row has average 1-based rank
``s + (count + 1) / 2``. Everything per group is integer arithmetic; values
per position come from one gather (monotone index) and one scatter.
"""

from __future__ import annotations

import torch

# Bytes of temporaries per ranked element (sort values and int64 order, group
# ids, group arrays, scattered ranks): sizes row blocks from a memory budget.
BYTES_PER_RANKED_VALUE = 64
# Centred ranks are multiples of 1/2 with |value| <= d / 2; float32 holds them
# exactly while 2 * |value| < 2**24, which halves gather/scatter traffic.
_FLOAT32_EXACT_D = 2**23
# t**3 - t for ties stays exact in int64 up to this many values per row.
_INT64_CUBE_D = 2**21 - 1


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
    centred rank (b,) of each row's largest tie group (its first, if several).
    """
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
