"""Average ranks per row ("ties share the mean of their positions"), in torch.

Why not ``scipy.stats.rankdata``: it ranks one row at a time on one core. Here
a block of rows is ranked with one sort plus a few linear passes, on CPU or
GPU, and the result equals ``rankdata(method="average")`` exactly: ranks are
integers or half-integers far below 2**53, which float64 holds exactly.

The tie machinery works on the flattened, row-sorted block, so there is no
Python loop over rows, elements or tie groups: a position starts a new group
when its value differs from its left neighbour (or it opens a row); a cumulative
sum of those starts numbers the groups, and a group occupying flat sorted
positions [start, end) gets the average 1-based rank (start + end + 1) / 2,
minus the row's offset.
"""

from __future__ import annotations

import torch

# Bytes of temporaries per ranked element (sort values and int64 order, group
# ids, group arrays, float64 output): sizes row blocks from a memory budget.
BYTES_PER_RANKED_VALUE = 64


def tie_groups(x: torch.Tensor):
    """Sort each row of ``x`` (b, d) and describe its runs of equal values.

    Returns ``(order, gid, start, end, row)``: ``order`` (b, d) argsort of each
    row; ``gid`` (b*d,) the group of every flat sorted position; ``start`` and
    ``end`` the flat sorted range [start, end) of every group, and ``row`` the
    row it belongs to. NaN never equals itself, so every NaN is its own group
    (callers mark NaN rows separately).
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
    start = flat.nonzero().squeeze(1)
    del new, flat
    end = torch.empty_like(start)
    end[:-1] = start[1:]
    end[-1] = b * d
    row = torch.div(start, d, rounding_mode="floor")
    return order, gid, start, end, row


def group_ranks(start, end, row, d: int) -> torch.Tensor:
    """Average 1-based rank of every tie group within its own row (float64)."""
    return (start + end + 1).to(torch.float64) * 0.5 - (row * d).to(torch.float64)


def rank_block(x: torch.Tensor) -> torch.Tensor:
    """Average ranks of every row of ``x`` (b, d) as float64; NaN rows -> NaN."""
    b, d = x.shape
    order, gid, start, end, row = tie_groups(_sortable(x))
    ranks = group_ranks(start, end, row, d)
    out = torch.empty((b, d), dtype=torch.float64, device=x.device)
    out.scatter_(1, order, ranks.index_select(0, gid).view(b, d))
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
    from fvtrust.sanity.similarity import _Rows  # input validation lives there

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
