"""Similarity engine of the sanity check: Spearman, Pearson and cosine between rows.

The paper compares flattened layer activations of image pairs (up to 802,816
values per image); one ``scipy.stats.spearmanr`` call there costs ~0.2-0.3 s,
mostly re-ranking both rows. Here every row is prepared **once** -- ranked
(Spearman), centred (Spearman, Pearson) and scaled to unit length -- so that the
similarity of any two rows is the dot product of their prepared vectors, and a
block of pairs is one matrix product.

Conventions (all entry points):

* Rows are samples; inputs with more than two dims are flattened after the
  first, a 1-D input is one row. Tensors, numpy arrays (memmaps are read one
  row block at a time) or :class:`Prepared` rows are accepted.
* Results are **float64 CPU tensors**, clipped to [-1, 1] like scipy.
* Spearman uses average ranks for ties and equals
  ``scipy.stats.spearmanr(a, b).statistic``; Pearson equals
  ``scipy.stats.pearsonr`` on float64 data (scipy computes in the input's float
  dtype; we always centre and normalise in float64); cosine is the float64
  ``a.b / (|a| |b|)``.
* Undefined values are NaN, never an exception: constant rows (Spearman,
  Pearson; this includes all-zero post-ReLU rows) and all-zero rows (cosine).
  scipy returns NaN there too (with a ``ConstantInputWarning``).
* ``nan_policy="propagate"`` (default, scipy's default): a row containing NaN
  gives NaN against every row. ``"raise"``: :class:`FvtrustError` naming the
  row. scipy's ``"omit"`` drops the NaN positions of *each pair*, which breaks
  rank-once, so it is refused. Infinite values rank like scipy (Spearman) and
  give NaN rows for Pearson and cosine.
* Precision: ``dtype=torch.float64`` (default) keeps prepared vectors and the
  matrix product in float64: ~5e-14 from the exact value at 802,816 features
  (scipy itself is within ~1e-17 there). Average ranks are exact
  (half-integers), so nothing but the division by the norm and the final dot
  products rounds. A dot product over a post-ReLU layer adds ~400,000
  identical zero-group terms, whose rounding errors all point the same way:
  ~1e-11 in float64, ~1.5e-6 in float32. So each row's largest tie group
  (Spearman) or its zeros (Pearson; cosine in float32) is shifted to exactly 0
  and contributes nothing, and the shift is added back in float64 (see
  :class:`Prepared`). ``dtype=torch.float32`` halves the memory of the prepared
  rows (and is the fast path on GPUs with slow float64); its column chunks of
  ``chunk_features`` are accumulated in float64: ~3e-8 on activations. Rows
  with further huge tie groups away from zero (binary, quantized data) stay at
  ~1e-6 in float32: use float64 there. TF32 is off for these products.
* Memory: rows are prepared ``block_rows`` at a time (default sized from a
  512 MiB budget for temporaries), so the peak is the prepared matrix plus one
  block. :func:`similarity_blocks` and :class:`SimilarityAccumulator` go
  further: rows arrive block by block, each is prepared once, and prepared rows
  beyond a memory budget are spilled to disk (:mod:`fvtrust.sanity.rowfile`)
  and read back two chunks ahead, while the next block is being ranked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fvtrust.errors import FvtrustError, nearest
from fvtrust.sanity.ranks import BYTES_PER_RANKED_VALUE, unit_ranks
from fvtrust.sanity.rowfile import RowFile, aligned_empty

METRICS = ("spearman", "pearson", "cosine")
# Metrics whose exact unit vectors sum to 0 (ranks, values minus their mean).
_CENTRED = ("spearman", "pearson")
NAN_POLICIES = ("propagate", "raise")

# Budget for the temporaries of one row block (sort, ranks, float64 copies).
BLOCK_BYTES = 512 * 2**20
# Rows per matrix-product block when filling a symmetric matrix: only blocks on
# or below the diagonal are multiplied, which halves the work for large n.
GRAM_ROWS = 512
# Columns per float32 product whose partial sums are accumulated in float64.
CHUNK_FEATURES = 4096
# Bound on the float32 partial products and float64 row sums held at once.
GRAM_TEMP_BYTES = 64 * 2**20
# A gathered per-pair dot product costs about this many entries of a matrix
# product (it is memory-bound, the product is compute-bound); similarity_at
# multiplies whole sub-blocks when the requested pairs are denser than 1/this.
DOT_COST = 64
# Prepared rows a streaming accumulator keeps in memory before spilling to disk.
KEEP_BYTES = 4 * 2**30
# Largest chunk of spilled rows read back at once (one more is read ahead).
SPILL_READ_BYTES = 256 * 2**20


@dataclass(frozen=True, eq=False)
class Prepared:
    """Rows turned into unit vectors whose dot products are the metric.

    Row i's unit vector is ``vectors[i] + shift[i]`` (``shift`` None means 0:
    float64 cosine). A row whose similarity is undefined (constant, zero, NaN)
    is all-NaN, so NaN flows through matrix products to exactly the pairs that
    involve it.

    Why the shift: a row's largest tie group (post-ReLU zeros) shares one
    prepared value, so a dot product would add ~400,000 identical terms whose
    rounding errors pile up in one direction (~1e-11 in float64, ~1e-6 in
    float32). Shifting that value to exactly 0 removes them; ``_gram`` adds the
    shift back in float64: with row sums for float32, and for the centred
    metrics in float64 from ``sum(unit) = 0``, which turns
    ``(v_a + s_a).(v_b + s_b)`` into ``v_a.v_b - d s_a s_b`` at no extra pass.
    """

    vectors: torch.Tensor
    metric: str
    shift: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, idx) -> Prepared:
        shift = None if self.shift is None else self.shift[idx]
        return Prepared(self.vectors[idx], self.metric, shift)

    def to(self, device) -> Prepared:
        shift = None if self.shift is None else self.shift.to(device)
        return Prepared(self.vectors.to(device), self.metric, shift)

    def unit_vectors(self) -> torch.Tensor:
        """The float64 unit vectors (adds the shift back)."""
        v = self.vectors.to(torch.float64)
        return v if self.shift is None else v + self.shift.unsqueeze(1)

    @property
    def valid(self) -> torch.Tensor:
        """Boolean mask of rows with a defined similarity."""
        return ~torch.isnan(self.vectors[:, 0])

    @staticmethod
    def cat(parts: list[Prepared]) -> Prepared:
        if len({p.vectors.dtype for p in parts}) > 1:
            parts = [Prepared(p.unit_vectors(), p.metric) for p in parts]
        shifts = None if parts[0].shift is None else torch.cat([p.shift for p in parts])
        return Prepared(torch.cat([p.vectors for p in parts]), parts[0].metric, shifts)


# ---------------------------------------------------------------- input checks


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise FvtrustError(f"unknown similarity metric {metric!r}; did you mean {nearest(metric, METRICS)}?")
    return metric


def _check_nan_policy(nan_policy: str) -> str:
    if nan_policy == "omit":
        raise FvtrustError(
            "nan_policy='omit' is not supported: it drops NaN positions per pair, which rules out "
            "ranking each row once; clean the rows or use 'propagate' (NaN results) or 'raise'"
        )
    if nan_policy not in NAN_POLICIES:
        raise FvtrustError(f"unknown nan_policy {nan_policy!r}; choose one of {', '.join(NAN_POLICIES)}")
    return nan_policy


def _check_dtype(dtype) -> torch.dtype:
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.float64):
        raise FvtrustError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


class _Rows:
    """An (n, d) row view of a tensor, array or Prepared that yields blocks on a device.

    Nothing is copied up front: numpy arrays (and memmaps) are converted one
    block at a time, so a huge input never has to exist twice in memory.
    """

    def __init__(self, X, name: str, device=None):
        self.name = name
        self.prepared = X if isinstance(X, Prepared) else None
        data = X.vectors if self.prepared is not None else X
        if isinstance(data, torch.Tensor):
            data = data.detach()
            if data.is_complex():
                raise FvtrustError(f"{name} must be real-valued, got {data.dtype}")
        else:
            data = data if isinstance(data, np.ndarray) else np.asarray(data)
            if data.dtype.kind not in "biuf":
                raise FvtrustError(f"{name} must be numeric, got dtype {data.dtype}")
        shape = tuple(data.shape)
        if data.ndim == 0:
            raise FvtrustError(f"{name} must hold rows of features, got a scalar")
        data = data.reshape(1, -1) if data.ndim == 1 else data.reshape(shape[0], int(np.prod(shape[1:])))
        self.n, self.d = data.shape
        if self.n == 0 or self.d == 0:
            raise FvtrustError(f"{name} is empty (shape {shape}); need at least one row and one feature")
        self.data = data
        if device is None:
            device = data.device if isinstance(data, torch.Tensor) else "cpu"
        self.device = torch.device(device)

    def auto_block_rows(self) -> int:
        return max(1, min(self.n, BLOCK_BYTES // (BYTES_PER_RANKED_VALUE * self.d)))

    def _to_torch(self, a) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            if a.dtype.kind == "u" and a.dtype.itemsize > 1:
                a = a.astype(np.int64)  # torch sorts few unsigned types
            a = np.ascontiguousarray(a)
            if not a.flags.writeable:  # read-only memmap: torch wants writable memory
                a = a.copy()
            a = torch.from_numpy(a)
        return a.to(self.device)

    def block(self, i: int, j: int) -> torch.Tensor:
        return self._to_torch(self.data[i:j])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.prepared is not None:
            return self.prepared[idx.to(self.data.device)].to(self.device)
        if isinstance(self.data, torch.Tensor):
            return self._to_torch(self.data.index_select(0, idx.to(self.data.device)))
        return self._to_torch(self.data[idx.cpu().numpy()])


def _is_empty(X) -> bool:
    """A block without rows: streams may yield one (e.g. a last, empty batch); it is skipped."""
    if isinstance(X, Prepared):
        return len(X) == 0
    shape = getattr(X, "shape", None)
    shape = np.shape(X) if shape is None else shape
    return len(shape) > 0 and shape[0] == 0


# ----------------------------------------------------------------- preparation


def _has_shift(metric: str, dtype: torch.dtype) -> bool:
    """Whether prepared rows carry a shift (see :class:`Prepared`): every float32
    metric, and the centred ones (whose unit vectors sum to 0) in float64."""
    return dtype == torch.float32 or metric in _CENTRED


def _new_shift(metric: str, dtype: torch.dtype, n: int, device) -> torch.Tensor | None:
    return torch.empty(n, dtype=torch.float64, device=device) if _has_shift(metric, dtype) else None


def _prepare_block(x: torch.Tensor, metric: str, dtype: torch.dtype, nan_policy: str, row_ids, out, shift) -> None:
    """Unit vectors for one block of raw rows, written into ``out``; with a
    ``shift`` (see :func:`_has_shift`) minus a per-row shift (see
    :class:`Prepared`), written into ``shift``. ``row_ids(k)`` names row k in
    errors."""
    nan_rows = torch.isnan(x).any(dim=1) if x.is_floating_point() else None
    if nan_rows is not None and nan_policy == "raise" and bool(nan_rows.any()):
        bad = row_ids(int(nan_rows.nonzero()[0, 0]))
        raise FvtrustError(f"row {bad} contains NaN (nan_policy='raise'); 'propagate' gives NaN similarities instead")
    if metric == "spearman":
        # Constant rows have norm 0 and centred ranks 0: 0 / 0 = NaN, as scipy.
        unit_ranks(x, out, shift)  # the largest tie group shifted to exactly 0
    else:
        v = x.to(torch.float64)
        if metric == "pearson":
            constant = (x == x[:, :1]).all(dim=1)  # exact test, as scipy; centring may leave dust
            v = v - v.mean(dim=1, keepdim=True)
        # Scale by the largest magnitude first so the sum of squares cannot
        # overflow (scipy does the same); zero rows become 0 / 0 = NaN.
        v = v / v.abs().amax(dim=1, keepdim=True)
        v /= torch.linalg.vector_norm(v, dim=1, keepdim=True)
        if metric == "pearson":
            v[constant] = float("nan")
        if shift is not None:  # post-ReLU zeros are the largest tie group
            shift.copy_(_value_at_zeros(x, v))
            v -= shift.unsqueeze(1)
        out.copy_(v)
    if nan_rows is not None:
        out[nan_rows] = float("nan")
    if shift is not None:
        shift.nan_to_num_(0.0, 0.0, 0.0)  # undefined rows are NaN in ``out`` already


def _value_at_zeros(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per row, ``v`` where ``x`` is 0 (all such entries share it); the row mean
    of ``v`` for rows without zeros (zero for a constant row, small otherwise)."""
    zero = x == 0
    first = zero.to(torch.uint8).argmax(dim=1, keepdim=True)
    val = v.gather(1, first).squeeze(1)
    return torch.where(zero.gather(1, first).squeeze(1), val, v.mean(dim=1))


def prepare(
    X,
    metric: str = "spearman",
    *,
    block_rows: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    nan_policy: str = "propagate",
) -> Prepared:
    """Turn rows into unit vectors (ranked and centred for Spearman, centred for Pearson).

    This is the expensive, once-per-row step; any number of similarities
    against the result is then a matrix product. Rows are processed
    ``block_rows`` at a time so temporaries stay bounded. An already
    :class:`Prepared` input is returned as is (its metric must match).
    """
    return _prepare_for(X, metric, None, block_rows=block_rows, device=device, dtype=dtype, nan_policy=nan_policy)


def _prepare_for(X, metric, store, *, block_rows=None, device=None, dtype=torch.float64, nan_policy="propagate"):
    """:func:`prepare`, into a reused buffer of ``store`` (a :class:`_PreparedStore`) when X will be spilled."""
    _check_metric(metric)
    _check_nan_policy(nan_policy)
    dtype = _check_dtype(dtype)
    if isinstance(X, Prepared):
        _check_same_metric(X, metric)
        return X if device is None else X.to(device)
    rows = _Rows(X, "X", device)
    buf = None if store is None else store.buffer_for(rows.n, rows.d, dtype, rows.device)
    return _prepare_rows(rows, metric, dtype, nan_policy, block_rows, out=buf)


def _check_same_metric(p: Prepared, metric: str) -> None:
    if p.metric != metric:
        raise FvtrustError(f"rows were prepared for {p.metric!r}, not {metric!r}")


def _prepare_rows(rows: _Rows, metric, dtype, nan_policy, block_rows, offset: int = 0, out=None) -> Prepared:
    if rows.prepared is not None:
        _check_same_metric(rows.prepared, metric)
        return rows.prepared.to(rows.device)
    return _prepare_some(rows, None, metric, dtype, nan_policy, block_rows, offset, out)


def _prepare_some(rows: _Rows, idx, metric, dtype, nan_policy, block_rows, offset: int = 0, out=None) -> Prepared:
    """Prepare all rows (``idx`` None) or the rows ``idx`` (sorted: memmaps are read in order),
    into ``out`` when given (a reused buffer of the right shape, dtype and device)."""
    n = rows.n if idx is None else len(idx)
    if out is None:
        out = torch.empty((n, rows.d), dtype=dtype, device=rows.device)
    shift = _new_shift(metric, dtype, n, rows.device)
    step = block_rows or rows.auto_block_rows()
    for i in range(0, n, step):
        if idx is None:
            x, name = rows.block(i, i + step), (lambda k, i=i: offset + i + k)
        else:
            ids = idx[i : i + step]
            x, name = rows.take(ids), (lambda k, ids=ids: int(ids[k]))
        shift_i = None if shift is None else shift[i : i + step]
        _prepare_block(x, metric, dtype, nan_policy, name, out[i : i + step], shift_i)
    return Prepared(out, metric, shift)


def _prepare_index(rows: _Rows, idx: torch.Tensor, metric, dtype, nan_policy, block_rows) -> Prepared:
    if rows.prepared is not None:
        _check_same_metric(rows.prepared, metric)
        return rows.take(idx)
    return _prepare_some(rows, idx, metric, dtype, nan_policy, block_rows)


# --------------------------------------------------------------- dot products


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """Keep cuBLAS float32 products in true float32: TF32 (10-bit mantissa) would
    cost ~1e-3 of accuracy, far from scipy."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def _gram(a: Prepared, b: Prepared, chunk_features: int | None = None) -> torch.Tensor:
    """All dot products of a's and b's unit vectors, float64, clipped to [-1, 1].

    float32 vectors are multiplied in column chunks whose partial sums are
    added in float64, so rounding grows with the chunk, not with all 802,816
    features; the shift correction is then added in float64.
    """
    if a.vectors.dtype != b.vectors.dtype:
        a, b = Prepared(a.unit_vectors(), a.metric), Prepared(b.unit_vectors(), b.metric)
    va, vb = a.vectors, b.vectors
    if va.dtype == torch.float64:
        if (a.shift is not None or b.shift is not None) and a.metric not in _CENTRED:
            va, vb = a.unit_vectors(), b.unit_vectors()  # only hand-made Prepared get here
        out = va @ vb.T
        if a.shift is not None and b.shift is not None and a.metric in _CENTRED:
            # sum(v + s) = 0 per row, so (va + sa).(vb + sb) = va.vb - d sa sb
            out.addr_(a.shift, b.shift, alpha=-va.shape[1])
        return out.clamp_(-1.0, 1.0)
    step = chunk_features or CHUNK_FEATURES
    n_a, n_b, d = va.shape[0], vb.shape[0], va.shape[1]
    f64 = dict(dtype=torch.float64, device=va.device)
    out = torch.zeros((n_a, n_b), **f64)
    ra, rb = torch.zeros(n_a, **f64), torch.zeros(n_b, **f64)  # row sums, for the shift correction
    # One batched product per group of chunks (many small matmul calls are
    # slow); the group's float32 products and float64 row sums stay bounded.
    group = max(1, min(GRAM_TEMP_BYTES // (4 * n_a * n_b), GRAM_TEMP_BYTES // (8 * (n_a + n_b) * step)))
    with _ieee_fp32(va.device):
        for c in range(0, d, group * step):
            ca, cb = va[:, c : c + group * step], vb[:, c : c + group * step]
            k, tail = divmod(ca.shape[1], step)
            if k:
                batch_a = ca[:, : k * step].unflatten(1, (k, step)).transpose(0, 1)  # (k, n_a, step) view
                batch_b = cb[:, : k * step].unflatten(1, (k, step)).permute(1, 2, 0)  # (k, step, n_b) view
                out += torch.bmm(batch_a, batch_b).sum(dim=0, dtype=torch.float64)
            if tail:
                out += ca[:, k * step :] @ cb[:, k * step :].T
            ra += ca.sum(dim=1, dtype=torch.float64)
            rb += cb.sum(dim=1, dtype=torch.float64)
    # (va + sa)(vb + sb) = va.vb + sa sum(vb) + sum(va) sb + d sa sb
    sa = torch.zeros(va.shape[0], **f64) if a.shift is None else a.shift
    sb = torch.zeros(vb.shape[0], **f64) if b.shift is None else b.shift
    out += torch.outer(sa, rb) + torch.outer(ra, sb) + va.shape[1] * torch.outer(sa, sb)
    return out.clamp_(-1.0, 1.0)


def _rowwise_dot(a: Prepared, b: Prepared) -> torch.Tensor:
    """Row i of a . row i of b, in float64, the shifts added back from row sums."""
    va, vb = a.vectors.to(torch.float64), b.vectors.to(torch.float64)
    # bmm of (k,1,d) x (k,d,1): a BLAS kernel, ~4x faster than vecdot or mul+sum on CPU.
    out = torch.bmm(va.unsqueeze(1), vb.unsqueeze(2)).view(-1)
    zero = torch.zeros(len(va), dtype=torch.float64, device=va.device)
    sa = zero if a.shift is None else a.shift
    sb = zero if b.shift is None else b.shift
    out += sa * vb.sum(dim=1) + sb * va.sum(dim=1) + va.shape[1] * sa * sb
    return out.clamp_(-1.0, 1.0)


def _symmetrize(s: torch.Tensor) -> torch.Tensor:
    """Copy the lower triangle up, so s[i, j] == s[j, i] bit for bit (BLAS may
    round the two orders differently)."""
    return torch.tril(s) + torch.tril(s, -1).T


def _gram_symmetric(p: Prepared, chunk_features: int | None) -> torch.Tensor:
    n = len(p)
    s = torch.empty((n, n), dtype=torch.float64, device=p.vectors.device)
    for i in range(0, n, GRAM_ROWS):
        for j in range(0, i + 1, GRAM_ROWS):
            blk = _gram(p[i : i + GRAM_ROWS], p[j : j + GRAM_ROWS], chunk_features)
            s[i : i + GRAM_ROWS, j : j + GRAM_ROWS] = blk
    return _symmetrize(s)


# ------------------------------------------------------------------ public API


def similarity(
    A,
    B=None,
    metric: str = "spearman",
    *,
    block_rows: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    nan_policy: str = "propagate",
    chunk_features: int | None = None,
) -> torch.Tensor:
    """All-pairs similarity between the rows of ``A`` and of ``B`` (``A`` itself if None).

    Returns an (n_a, n_b) float64 CPU tensor. Work happens on ``device``
    (default: ``A``'s device; CPU for numpy). Without ``B`` (or with ``B is
    A``) only the lower triangle is multiplied and the result is exactly
    symmetric. ``block_rows`` rows are prepared at a time; ``dtype`` is that
    of the prepared vectors, and with float32 ``chunk_features`` columns are
    multiplied at a time with float64 accumulation across chunks. See the
    module docstring for the NaN, precision and memory conventions.
    """
    _check_metric(metric)
    _check_nan_policy(nan_policy)
    dtype = _check_dtype(dtype)
    ra = _Rows(A, "A", device)
    rb = None if B is None or B is A else _Rows(B, "B", ra.device)
    if rb is not None and rb.d != ra.d:
        raise FvtrustError(f"A has {ra.d} features per row but B has {rb.d}")
    pa = _prepare_rows(ra, metric, dtype, nan_policy, block_rows)
    if rb is None:
        return _gram_symmetric(pa, chunk_features).cpu()
    pb = _prepare_rows(rb, metric, dtype, nan_policy, block_rows)
    return _gram(pa, pb, chunk_features).cpu()


def paired_similarity(
    A,
    B,
    metric: str = "spearman",
    *,
    block_rows: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    nan_policy: str = "propagate",
) -> torch.Tensor:
    """Similarity of row i of ``A`` with row i of ``B`` only: an (n,) float64 CPU tensor.

    Streams both inputs block by block, so memory does not grow with n.
    """
    _check_metric(metric)
    _check_nan_policy(nan_policy)
    dtype = _check_dtype(dtype)
    ra = _Rows(A, "A", device)
    rb = _Rows(B, "B", ra.device)
    if (ra.n, ra.d) != (rb.n, rb.d):
        raise FvtrustError(f"paired rows need equal shapes, got A {ra.n}x{ra.d} and B {rb.n}x{rb.d}")
    for r in (ra, rb):
        if r.prepared is not None:
            _check_same_metric(r.prepared, metric)

    def block(r: _Rows, i: int, j: int) -> Prepared:
        if r.prepared is not None:
            return r.prepared[i:j].to(r.device)
        out = torch.empty((j - i, r.d), dtype=dtype, device=r.device)
        shift = _new_shift(metric, dtype, j - i, r.device)
        _prepare_block(r.block(i, j), metric, dtype, nan_policy, lambda k: i + k, out, shift)
        return Prepared(out, metric, shift)

    step = block_rows or ra.auto_block_rows()
    out = torch.empty(ra.n, dtype=torch.float64, device=ra.device)
    for i in range(0, ra.n, step):
        j = min(i + step, ra.n)
        out[i:j] = _rowwise_dot(block(ra, i, j), block(rb, i, j))
    return out.cpu()


def similarity_at(
    A,
    pairs,
    B=None,
    metric: str = "spearman",
    *,
    block_rows: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
    nan_policy: str = "propagate",
    chunk_features: int | None = None,
) -> torch.Tensor:
    """Similarity for the given (i, j) index pairs only: row i of ``A`` vs row j of ``B`` (or ``A``).

    This is the paper's sub-sampled comparison (every 10th / 100th / 5th pair).
    Only rows that occur in ``pairs`` are prepared, each once. Pairs are grouped
    into tiles of ``GRAM_ROWS`` x ``GRAM_ROWS`` prepared rows: a tile holding at
    least 1/``DOT_COST`` of its pairs is one matrix product, a sparser one uses
    per-pair dot products (cheaper when most of the product would be thrown
    away). Returns a (k,) float64 CPU tensor in the order of ``pairs``.
    """
    _check_metric(metric)
    _check_nan_policy(nan_policy)
    dtype = _check_dtype(dtype)
    ra = _Rows(A, "A", device)
    rb = ra if B is None else _Rows(B, "B", ra.device)
    if rb.d != ra.d:
        raise FvtrustError(f"A has {ra.d} features per row but B has {rb.d}")
    pairs = _check_pairs(pairs, ra.n, rb.n)
    k = pairs.shape[0]
    if k == 0:
        return torch.empty(0, dtype=torch.float64)
    if B is None:
        ua, inv = torch.unique(pairs.reshape(-1), return_inverse=True)
        pa = pb = _prepare_index(ra, ua, metric, dtype, nan_policy, block_rows)
        ia, ib = inv.view(-1, 2).unbind(1)
    else:
        ua, ia = torch.unique(pairs[:, 0], return_inverse=True)
        ub, ib = torch.unique(pairs[:, 1], return_inverse=True)
        pa = _prepare_index(ra, ua, metric, dtype, nan_policy, block_rows)
        pb = _prepare_index(rb, ub, metric, dtype, nan_policy, block_rows)
    # Tiles of GRAM_ROWS x GRAM_ROWS prepared rows; slices of pa/pb are views,
    # so a tile's product never copies rows.
    g = GRAM_ROWS
    n_tiles_b = (len(pb) + g - 1) // g
    tile = torch.div(ia, g, rounding_mode="floor") * n_tiles_b + torch.div(ib, g, rounding_mode="floor")
    order = torch.argsort(tile, stable=True)
    ia, ib = ia[order], ib[order]
    tiles, counts = torch.unique_consecutive(tile[order], return_counts=True)
    out = torch.empty(k, dtype=torch.float64)
    dot_step = max(1, BLOCK_BYTES // (16 * ra.d))  # pairs per gathered dot product
    dev = pa.vectors.device
    lo = 0
    for t, count in zip(tiles.tolist(), counts.tolist()):
        hi = lo + count
        r0, c0 = (t // n_tiles_b) * g, (t % n_tiles_b) * g
        area = min(g, len(pa) - r0) * min(g, len(pb) - c0)
        if count * DOT_COST >= area:
            sub = _gram(pa[r0 : r0 + g], pb[c0 : c0 + g], chunk_features)
            vals = sub[(ia[lo:hi] - r0).to(dev), (ib[lo:hi] - c0).to(dev)]
        else:
            spans = [(c, min(c + dot_step, hi)) for c in range(lo, hi, dot_step)]
            dots = [_rowwise_dot(pa[ia[u:v].to(dev)], pb[ib[u:v].to(dev)]) for u, v in spans]
            vals = torch.cat(dots)
        out[order[lo:hi]] = vals.cpu()
        lo = hi
    return out


def _check_pairs(pairs, n_a: int, n_b: int) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(pairs) if not isinstance(pairs, torch.Tensor) else pairs).cpu()
    if p.numel() == 0:
        return torch.empty((0, 2), dtype=torch.long)
    if p.ndim != 2 or p.shape[1] != 2 or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise FvtrustError(f"pairs must be integer (i, j) pairs of shape (k, 2), got {tuple(p.shape)} {p.dtype}")
    p = p.long()
    for col, n, name in ((0, n_a, "A"), (1, n_b, "B")):
        bad = (p[:, col] < 0) | (p[:, col] >= n)
        if bool(bad.any()):
            raise FvtrustError(f"pair {p[bad.nonzero()[0, 0]].tolist()} is out of range: {name} has {n} rows")
    return p


class _PreparedStore:
    """Prepared rows kept in arrival order: in memory up to ``memory_bytes``, the rest on disk.

    Once a block does not fit, it and every later block go to a spill
    :class:`~fvtrust.sanity.rowfile.RowFile` (a temporary file in
    ``spill_dir``, deleted on close, page cache dropped so it really is on
    disk), so the in-memory blocks are always a prefix and :meth:`chunks`
    yields rows in order. Shifts (one float64 per row) stay in memory.
    Spilled rows are read back ``SPILL_READ_BYTES`` at a time, two chunks
    ahead, starting while the caller prepares its next block, into reused
    buffers; blocks bound for the spill are prepared into reused buffers too
    (:meth:`buffer_for`): fresh ones would cost a page fault per 4 KiB, more
    CPU than the I/O itself.
    """

    def __init__(self, metric: str, memory_bytes: int | None, spill_dir=None, device=None):
        self.metric, self.memory_bytes, self.spill_dir = metric, memory_bytes, spill_dir
        self.device = device
        self.blocks: list[Prepared] = []
        self.in_memory = 0  # bytes of kept vectors
        self.spill: RowFile | None = None
        self.spill_shift: list[torch.Tensor] = []
        self.n = 0
        self.d: int | None = None
        self._scratch: list[list] = []  # [buffer, future of its spill write or None], oldest first
        self._lock = threading.Lock()  # buffer_for (ranking thread) vs append (product thread)

    def _fits(self, nbytes: int) -> bool:
        return self.spill is None and (self.memory_bytes is None or self.in_memory + nbytes <= self.memory_bytes)

    def buffer_for(self, n: int, d: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """A reusable (n, d) buffer to prepare a block into if that block will be
        spilled (None if it will be kept, or off CPU). Two buffers alternate:
        one is written to disk while the next block is prepared into the other."""
        device = torch.device(device or "cpu")
        with self._lock:
            # Safe while another thread appends: a block that does not fit now never will (spilling is monotone).
            if device.type != "cpu" or self._fits(n * d * torch.empty((), dtype=dtype).element_size()):
                return None
            return self._scratch_buffer(n, d, dtype)

    def _scratch_buffer(self, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        for entry in self._scratch:  # drop buffers of another shape
            if entry[0].shape[1] != d or entry[0].dtype != dtype or entry[0].shape[0] < n:
                entry[0] = None
        self._scratch = [e for e in self._scratch if e[0] is not None]
        if len(self._scratch) < 2:  # page-aligned: its spill write can skip the page cache
            buf = torch.from_numpy(aligned_empty((n, d), np.float32 if dtype == torch.float32 else np.float64))
        else:
            buf, future = self._scratch.pop(0)
            if future is not None:
                future.result()  # its previous block is on disk
        self._scratch.append([buf, None])
        return buf[:n]

    @property
    def spilled(self) -> int:
        return 0 if self.spill is None else len(self.spill)

    def append(self, p: Prepared) -> None:
        if len(p) == 0:
            return
        self.d = p.vectors.shape[1]
        self.device = p.vectors.device
        nbytes = p.vectors.numel() * p.vectors.element_size()
        if self._fits(nbytes):
            self.blocks.append(p)
            self.in_memory += nbytes
        else:
            if self.spill is None:
                fd, path = tempfile.mkstemp(prefix="fvtrust-prepared-", suffix=".rows", dir=self.spill_dir)
                os.close(fd)
                dtype = np.float32 if p.vectors.dtype == torch.float32 else np.float64
                self.spill = RowFile(path, self.d, dtype, "w", drop_cache=True, delete=True)
            written = self.spill.append(p.vectors)  # the store holds one dtype
            with self._lock:
                for entry in self._scratch:  # a reused buffer is free again once this write is done
                    if entry[0].data_ptr() == p.vectors.data_ptr():
                        entry[1] = written
            if p.shift is not None:
                self.spill_shift.append(p.shift.cpu())
        self.n += len(p)

    def chunks(self):
        """The kept rows as an iterator of :class:`Prepared` blocks, in order.

        The first two spill reads are queued at once: call this *before*
        preparing the next block and the disk works while the CPU ranks."""
        if self.spill is None:
            return iter(list(self.blocks))
        # Big chunks: a product against few rows is slow per value (tall-skinny BLAS), one against
        # tens of rows runs at matrix-product speed.
        rows = max(1, SPILL_READ_BYTES // self.spill.row_bytes)
        reads = self.spill.blocks(rows, ahead=2, reuse=True)  # each chunk is used before the next is asked for
        shift = torch.cat(self.spill_shift) if self.spill_shift else None
        blocks = list(self.blocks)

        def gen():
            yield from blocks
            i = 0
            for a in reads:
                v = torch.from_numpy(a).to(self.device)
                sh = None if shift is None else shift[i : i + len(a)].to(self.device)
                yield Prepared(v, self.metric, sh)
                i += len(a)

        return gen()

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None


class SimilarityAccumulator:
    """All-pairs similarity filled block by block as rows arrive (e.g. one model batch at a time).

    Without ``reference`` each :meth:`add` compares the new rows with
    themselves and every row added before (only the lower triangle is
    multiplied) and keeps their prepared vectors; :meth:`result` is the
    symmetric (n, n) matrix. With ``reference`` (rows, or :class:`Prepared`)
    that is prepared once and kept instead, and :meth:`result` is
    (n, n_reference). Each :meth:`add` also returns its new result rows.

    Every row is prepared (ranked) exactly once, whatever the memory budget:
    preparation is the expensive step, the products are cheap. Kept prepared
    rows stay in memory up to ``memory_bytes`` (None: ``KEEP_BYTES``, 4 GiB;
    ``float('inf')``: no limit); beyond that they are spilled to a temporary file in
    ``spill_dir`` (default: the system's temp dir) and read back, two chunks
    ahead (the reads start while the new block is being ranked), for each later
    block. Memory: the budget plus one block and two read chunks of ``SPILL_READ_BYTES`` (256 MiB); disk: the spilled rows (d x 8 bytes per row in float64, 4 in
    float32). Bigger blocks mean fewer passes over the spill. Use as a context
    manager (or call :meth:`close`) to remove the spill file early.
    """

    def __init__(
        self,
        metric: str = "spearman",
        reference=None,
        *,
        block_rows: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float64,
        nan_policy: str = "propagate",
        chunk_features: int | None = None,
        memory_bytes: int | None = None,
        spill_dir=None,
    ):
        self.metric = _check_metric(metric)
        self.nan_policy = _check_nan_policy(nan_policy)
        self.dtype = _check_dtype(dtype)
        self.block_rows, self.chunk_features = block_rows, chunk_features
        self.device = None if device is None else torch.device(device)
        budget = KEEP_BYTES if memory_bytes is None else memory_bytes
        budget = None if budget == float("inf") else budget
        self.reference = None
        if isinstance(reference, _PreparedStore):  # from similarity_blocks: B prepared block by block
            self.reference = reference
            self.device = reference.device
        elif reference is not None:
            ref = _Rows(reference, "reference", self.device)
            self.device = ref.device
            self.reference = _PreparedStore(metric, budget, spill_dir, self.device)
            self.reference.append(_prepare_rows(ref, metric, self.dtype, nan_policy, block_rows))
        self._kept = _PreparedStore(metric, budget, spill_dir, self.device)  # prepared blocks (no reference)
        self._strips: list[torch.Tensor] = []  # result rows per add()
        self.n = 0  # rows multiplied
        self._prepared = 0  # rows prepared (ahead of n while similarity_blocks pipelines)
        self._d: int | None = None

    @property
    def d(self) -> int | None:
        return (self.reference if self.reference is not None else self._kept).d

    @property
    def spilled_rows(self) -> int:
        """Prepared rows currently kept on disk rather than in memory."""
        return (self.reference if self.reference is not None else self._kept).spilled

    def add(self, rows) -> torch.Tensor:
        """Prepare ``rows`` and return their similarities (float64 CPU) with the
        reference, or with all rows so far including themselves."""
        kept = (self.reference if self.reference is not None else self._kept).chunks()  # spill reads start now
        return self._multiply(self._prepare(rows), kept)

    def _prepare(self, rows) -> Prepared:
        """The ranking half of :meth:`add`. :func:`similarity_blocks` runs it for
        block k + 1 while :meth:`_multiply` works on block k in another thread:
        numpy's sort holds the GIL, so ranking keeps one core busy and the
        products (torch releases the GIL) can use the other."""
        r = _Rows(rows, "rows", self.device)
        self.device = r.device
        d = self.d if self._d is None else self._d
        if d is not None and r.d != d:
            raise FvtrustError(f"rows have {r.d} features but earlier rows had {d}")
        self._d = r.d
        buf = None if self.reference is not None else self._kept.buffer_for(r.n, r.d, self.dtype, r.device)
        p = _prepare_rows(r, self.metric, self.dtype, self.nan_policy, self.block_rows, self._prepared, buf)
        self._prepared += r.n
        return p

    def _multiply(self, p: Prepared, kept=None) -> torch.Tensor:
        """The product half of :meth:`add`, for blocks in the order they were prepared."""
        if kept is None:
            kept = (self.reference if self.reference is not None else self._kept).chunks()
        if self.reference is not None:
            strip = torch.cat([_gram(p, q, self.chunk_features).cpu() for q in kept], dim=1)
        else:
            own = _symmetrize(_gram(p, p, self.chunk_features))
            parts = [_gram(p, q, self.chunk_features).cpu() for q in kept]
            strip = torch.cat(parts + [own.cpu()], dim=1)
            self._kept.append(p)
        self._strips.append(strip)
        self.n += len(p)
        return strip

    def result(self) -> torch.Tensor:
        """The (n, n) or (n, n_reference) float64 CPU matrix of everything added."""
        if self.n == 0:
            raise FvtrustError("no rows were added")
        if self.reference is not None:
            return torch.cat(self._strips)
        s = torch.zeros((self.n, self.n), dtype=torch.float64)
        i = 0
        for strip in self._strips:
            m = strip.shape[0]
            s[i : i + m, : i + m] = strip
            i += m
        return _symmetrize(s)

    def close(self) -> None:
        """Delete the spill files (results already computed are kept)."""
        self._kept.close()
        if self.reference is not None:
            self.reference.close()

    def __enter__(self) -> SimilarityAccumulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def similarity_blocks(
    blocks_a: Iterable | Callable[[], Iterable],
    blocks_b: Iterable | Callable[[], Iterable] | None = None,
    metric: str = "spearman",
    **options,
) -> torch.Tensor:
    """All-pairs similarity of rows that arrive as blocks (arrays or tensors).

    * ``blocks_b is None``: rows of A against each other (symmetric).
    * ``blocks_b`` an iterable, or a callable returning one: B is read once,
      prepared block by block and kept; A streams past it.

    Each row of A and B is prepared exactly once. Kept prepared rows beyond
    ``memory_bytes`` (default 4 GiB) are spilled to disk and re-read per A
    block (see :class:`SimilarityAccumulator`), so inputs far larger than
    memory work at the speed of the in-memory path plus what the disk cannot
    hide behind the products. Bigger A blocks mean fewer passes over the spill.
    ``options`` are those of :func:`similarity` plus ``memory_bytes`` and
    ``spill_dir``. Each block is fully consumed before the next one is
    requested, so a reader may hand out one reused buffer after another
    (``RowFile.blocks(..., reuse=True)``). Returns a float64 CPU tensor.
    """
    if callable(blocks_a):
        blocks_a = blocks_a()
    if blocks_b is not None and callable(blocks_b):
        blocks_b = blocks_b()
    reference = None
    keep = {k: options[k] for k in ("memory_bytes", "spill_dir") if k in options}
    budget = keep.get("memory_bytes")
    budget = KEEP_BYTES if budget is None else (None if budget == float("inf") else budget)
    try:
        if blocks_b is not None:
            reference = _PreparedStore(metric, budget, keep.get("spill_dir"), options.get("device"))
            prep = _prep_options(options)
            d = None
            for b in blocks_b:
                if _is_empty(b):
                    continue
                p = _prepare_for(b, metric, reference, **prep)
                if d is not None and p.vectors.shape[1] != d:
                    raise FvtrustError(f"B blocks have {p.vectors.shape[1]} features but earlier ones had {d}")
                d = p.vectors.shape[1]
                reference.append(p)
            if reference.n == 0:
                raise FvtrustError("blocks_b yielded no rows")
        # Block k + 1 is ranked (one core: numpy's sort holds the GIL) while block k's
        # products run on a second thread; products stay in block order.
        with SimilarityAccumulator(metric, reference, **options) as acc, \
                ThreadPoolExecutor(1, thread_name_prefix="fvtrust-products") as products:
            pending = None
            for blk in blocks_a:
                if _is_empty(blk):
                    continue
                p = acc._prepare(blk)
                if pending is not None:
                    pending.result()
                pending = products.submit(acc._multiply, p)
            if pending is not None:
                pending.result()
            if acc.n == 0:
                raise FvtrustError("blocks_a yielded no rows")
            return acc.result()
    finally:
        if reference is not None:
            reference.close()


def _prep_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("chunk_features", "memory_bytes", "spill_dir")}
