"""The similarity engine must equal scipy on the data the sanity check feeds it:
post-ReLU rows (heavy ties, all-zero rows), constant rows, mixed signs, NaN."""

import sys
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from fvtrust.errors import FvtrustError
from fvtrust.sanity.ranks import average_ranks
from fvtrust.sanity.similarity import (
    Prepared,
    SimilarityAccumulator,
    paired_similarity,
    prepare,
    similarity,
    similarity_at,
    similarity_blocks,
)

TOL = 1e-6


def _spearman(a, b):
    return scipy.stats.spearmanr(a, b).statistic


def _pearson(a, b):
    return scipy.stats.pearsonr(a, b).statistic


def _cosine(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return np.nan if na == 0 or nb == 0 else float(np.dot(a, b) / (na * nb))


REFERENCE = {"spearman": _spearman, "pearson": _pearson, "cosine": _cosine}


def reference(A, B, metric):
    """scipy (or float64 numpy) one pair at a time: the slow ground truth."""
    f = REFERENCE[metric]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        return np.array([[f(a, b) for b in B] for a in A], dtype=np.float64)


def assert_matches(got, want):
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.abs(got[ok] - want[ok]).max(initial=0.0) < TOL


def same(a, b, atol=0.0):
    """Equal up to ``atol``, NaN where the other is NaN (torch.equal says NaN != NaN)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=atol, equal_nan=True)


def tricky_rows(d=40, seed=0):
    """Rows that break naive rank correlations."""
    rng = np.random.default_rng(seed)
    relu = np.maximum(rng.normal(size=d), 0)
    mixed = rng.normal(size=d)
    rows = [
        np.maximum(rng.normal(size=d), 0).round(1),  # post-ReLU, heavy ties
        relu,  # post-ReLU: one big zero tie group
        np.zeros(d),  # all-zero post-ReLU row: constant
        np.full(d, 2.5),  # constant, non-zero
        np.full(d, 0.1),  # constant whose float mean is not exactly 0.1
        mixed,  # mixed signs, no ties
        rng.integers(-2, 3, d).astype(float),  # mixed signs, heavy ties
        relu.copy(),  # identical to another row
        -mixed,  # perfectly anti-correlated
        3 * relu + 1,  # monotone transform: Spearman 1, Pearson 1
        np.where(np.arange(d) % 2 == 0, 1.0, 0.0),  # binary
    ]
    return np.stack(rows)


@pytest.mark.parametrize("metric", ["spearman", "pearson", "cosine"])
def test_all_pairs_match_scipy(metric):
    X = tricky_rows()
    got = similarity(X, metric=metric)
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert_matches(got, reference(X, X, metric))
    assert same(got, got.T)  # exactly symmetric


@pytest.mark.parametrize("metric", ["spearman", "pearson", "cosine"])
def test_a_versus_b_matches_scipy(metric):
    X = tricky_rows()
    A, B = X[:4], X[3:]
    got = similarity(torch.from_numpy(A), torch.from_numpy(B), metric=metric)
    assert got.shape == (4, len(B))
    assert_matches(got, reference(A, B, metric))


def test_large_relu_rows_match_scipy():
    rng = np.random.default_rng(1)
    base = rng.normal(size=20_000)
    X = np.maximum(base + rng.normal(size=(4, 20_000)) * [[0.1], [0.5], [1.0], [3.0]], 0).astype(np.float32)
    assert_matches(similarity(X), reference(X, X, "spearman"))


def test_float64_relu_rows_are_exact_to_1e14():
    """The zero group is shifted out of float64 products too: without that, its
    ~half of identical terms push the error to ~1e-13 here (1e-11 at 802,816)."""
    rng = np.random.default_rng(0)
    d = 20_000
    X = np.maximum(rng.normal(size=d) + rng.normal(size=(6, d)) * np.linspace(0.2, 2, 6)[:, None] - 0.1, 0)
    for rows in (X, X.astype(np.float32)):  # torch and numpy ranking paths
        two_c = (2 * scipy.stats.rankdata(rows, axis=1) - (d + 1)).astype(np.int64)
        g = two_c @ two_c.T  # exact integers
        norm = np.sqrt(np.diag(g).astype(np.float64))
        exact = g / np.outer(norm, norm)
        assert np.abs(similarity(rows).numpy() - exact).max() < 2e-14


def test_two_features_and_one_feature():
    X = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.0, 5.0]])
    assert_matches(similarity(X), reference(X, X, "spearman"))
    assert torch.isnan(similarity(np.ones((2, 1)))).all()  # one value: constant, NaN as scipy


def test_infinities_rank_like_scipy():
    X = np.array([[np.inf, 1.0, -np.inf, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [-np.inf, 0, 0, 0, np.inf]])
    assert_matches(similarity(X), reference(X, X, "spearman"))
    assert torch.isnan(similarity(X, metric="pearson")[0]).all()


def test_nan_rows_propagate_like_scipy():
    X = tricky_rows()
    X[1, 5] = np.nan
    got = similarity(X)
    assert torch.isnan(got[1]).all() and torch.isnan(got[:, 1]).all()
    assert_matches(got, reference(X, X, "spearman"))
    assert_matches(similarity(X, metric="pearson"), reference(X, X, "pearson"))


def test_nan_policy_raise_names_the_row():
    X = tricky_rows()
    X[6, 0] = np.nan
    with pytest.raises(FvtrustError, match="row 6"):
        similarity(X, nan_policy="raise", block_rows=4)
    with pytest.raises(FvtrustError, match="row 6"):
        similarity_blocks([X[:4], X[4:]], nan_policy="raise")
    with pytest.raises(FvtrustError, match="omit"):
        similarity(X, nan_policy="omit")


def test_average_ranks_equal_rankdata():
    X = tricky_rows()
    assert torch.equal(average_ranks(X), torch.from_numpy(scipy.stats.rankdata(X, axis=1)))
    X[2, 3] = np.nan
    assert torch.isnan(average_ranks(X)[2]).all()


def test_input_kinds_agree():
    X = tricky_rows(d=24)
    want = similarity(X)
    cube = X.reshape(len(X), 2, 3, 4)  # >2-D: flattened after the first dim
    assert same(similarity(cube), want)
    assert same(similarity(torch.from_numpy(cube)), want)
    assert same(similarity(X.tolist()), want)
    assert same(similarity(np.asfortranarray(X)), want)
    assert similarity(X[0]).shape == (1, 1)  # 1-D: one row
    ints = np.random.default_rng(0).integers(0, 4, (5, 30))
    assert_matches(similarity(ints), reference(ints, ints, "spearman"))
    assert_matches(similarity(ints.astype(np.uint16)), reference(ints, ints, "spearman"))
    assert_matches(similarity(ints > 1), reference(ints > 1, ints > 1, "spearman"))
    half = torch.from_numpy(X).half()
    assert_matches(similarity(half), reference(half.double().numpy(), half.double().numpy(), "spearman"))


@pytest.mark.parametrize("metric", ["spearman", "cosine"])
def test_streaming_equals_direct(metric):
    X = tricky_rows()
    want = similarity(X, metric=metric)
    assert same(similarity(X, metric=metric, block_rows=1), want)
    blocks = [X[:3], X[3:4], X[4:]]
    assert same(similarity_blocks(blocks, metric=metric), want, 1e-15)
    vs_b = similarity_blocks(iter(blocks), blocks[::-1], metric)
    assert same(vs_b, similarity(X, np.concatenate(blocks[::-1]), metric), 1e-15)
    restream = similarity_blocks(lambda: iter(blocks), lambda: iter(blocks), metric)
    assert same(restream, want, 1e-15)

    acc = SimilarityAccumulator(metric)
    strips = [acc.add(b) for b in blocks]
    assert [s.shape for s in strips] == [(3, 3), (1, 4), (len(X) - 4, len(X))]
    assert same(acc.result(), want, 1e-15)
    ref_acc = SimilarityAccumulator(metric, reference=X[:5])
    for b in blocks:
        ref_acc.add(b)
    assert same(ref_acc.result(), want[:, :5], 1e-15)


@pytest.mark.parametrize("metric,dtype", [("spearman", torch.float64), ("spearman", torch.float32),
                                          ("pearson", torch.float32), ("cosine", torch.float64)])
def test_spilled_streaming_equals_in_memory(metric, dtype, tmp_path):
    """A memory budget smaller than the prepared rows spills them to disk; results do not change."""
    X = np.concatenate([tricky_rows(), tricky_rows(seed=1)])  # 22 rows, NaN-free, every edge case twice
    want = similarity(X, metric=metric, dtype=dtype)
    tol = 1e-15 if dtype == torch.float64 else TOL  # float32: BLAS rounds other block shapes differently
    row_bytes = X.shape[1] * (8 if dtype == torch.float64 else 4)
    opts = dict(metric=metric, dtype=dtype, memory_bytes=3 * row_bytes, spill_dir=tmp_path)
    blocks = [X[:3], X[3:4], np.zeros((0, X.shape[1])), X[4:11], X[11:]]
    assert same(similarity_blocks(blocks, **opts), want, tol)
    vs_b = similarity_blocks(blocks[::-1], lambda: iter(blocks), **opts)
    assert same(vs_b, similarity(np.concatenate(blocks[::-1]), X, metric=metric, dtype=dtype), tol)
    with SimilarityAccumulator(metric, reference=X, dtype=dtype, memory_bytes=row_bytes, spill_dir=tmp_path) as acc:
        for b in blocks:
            if len(b):
                acc.add(b)
        assert acc.spilled_rows == len(X)  # the budget holds no whole reference block: all of it on disk
        assert same(acc.result(), want, tol)
    with SimilarityAccumulator(metric, dtype=dtype, memory_bytes=4 * row_bytes, spill_dir=tmp_path) as acc:
        for b in blocks:
            if len(b):
                acc.add(b)
        assert acc.spilled_rows == len(X) - 4  # the first two blocks fit, everything after goes to disk
        assert same(acc.result(), want, tol)
    with SimilarityAccumulator(metric, dtype=dtype, memory_bytes=float("inf"), spill_dir=tmp_path) as acc:
        for b in blocks[:2]:
            acc.add(b)
        assert acc.spilled_rows == 0  # no limit: nothing goes to disk
    assert list(tmp_path.iterdir()) == []  # spill files are removed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reused_spill_buffers_do_not_mix_blocks(dtype, tmp_path, monkeypatch):
    """Spilled blocks are prepared into two alternating buffers and read back
    through a ring of buffers: many small blocks and small read chunks must
    still give the in-memory result."""
    sim = sys.modules[similarity_blocks.__module__]
    X = np.concatenate([tricky_rows(), tricky_rows(seed=1)])
    row_bytes = X.shape[1] * (8 if dtype == torch.float64 else 4)
    monkeypatch.setattr(sim, "SPILL_READ_BYTES", 3 * row_bytes)  # 3-row read chunks, 2 ahead
    want = similarity(X, dtype=dtype)
    tol = 1e-15 if dtype == torch.float64 else TOL
    blocks = [X[i : i + 2] for i in range(0, len(X), 2)]
    opts = dict(dtype=dtype, memory_bytes=2 * row_bytes, spill_dir=tmp_path)
    with SimilarityAccumulator(**opts) as acc:
        for b in blocks:
            acc.add(b)
        assert acc.spilled_rows == len(X) - 2 and len(acc._kept._scratch) == 2
        assert same(acc.result(), want, tol)
    vs_b = similarity_blocks(blocks[::-1], blocks, **opts)  # B spilled block by block too
    assert same(vs_b, similarity(np.concatenate(blocks[::-1]), X, dtype=dtype), tol)


def test_streaming_checks_widths_across_blocks():
    X = tricky_rows()
    with pytest.raises(FvtrustError, match="features"):
        similarity_blocks([X[:3]], [X[:, :10]])
    with pytest.raises(FvtrustError, match="features"):
        similarity_blocks([X[:3]], [X, X[:, :10]])


def test_prepared_rows_are_reusable():
    X = tricky_rows()
    p = prepare(X)
    assert isinstance(p, Prepared) and len(p) == len(X)
    assert p.valid.tolist() == [True, True, False, False, False] + [True] * 6
    assert same(similarity(p), similarity(X), 1e-15)
    assert same(similarity(X[:2], p), similarity(X[:2], X), 1e-15)
    with pytest.raises(FvtrustError, match="prepared for 'spearman'"):
        similarity(p, metric="cosine")


@pytest.mark.parametrize("metric", ["spearman", "pearson", "cosine"])
def test_float32_stays_within_1e6(metric):
    """float32 vectors: accurate on activations (zeros are shifted out of the sum)."""
    rng = np.random.default_rng(2)
    X = np.maximum(rng.normal(size=(6, 5000)) * 0.3 + rng.normal(size=5000), 0)  # correlated, ~half zeros
    X = np.concatenate([X, tricky_rows(d=5000)[[1, 2, 3, 5, 7, 8]]])  # + zero, constant, mixed-sign rows
    want = similarity(X, metric=metric)
    f32 = dict(metric=metric, dtype=torch.float32)
    assert same(similarity(X, chunk_features=512, **f32), want, TOL)
    assert same(similarity(X[:3], X, **f32), want[:3], TOL)
    assert same(similarity_blocks([X[:4], X[4:]], **f32), want, TOL)
    pairs = np.array([(0, 1), (2, 3), (5, 9), (9, 5)])
    assert same(similarity_at(X, pairs, **f32), want[pairs[:, 0], pairs[:, 1]], TOL)
    assert same(paired_similarity(X, X[::-1].copy(), **f32), want.flip(1).diagonal(), TOL)
    p = prepare(X, metric, dtype="float32")
    assert p.vectors.dtype == torch.float32 and p.shift.dtype == torch.float64
    assert same(p.unit_vectors(), prepare(X, metric).unit_vectors(), 1e-7)
    # Huge tie groups away from zero (binary, quantized) keep identical float32
    # terms in the sum: still close, but use float64 when 1e-6 matters.
    Q = tricky_rows(d=5000)
    assert same(similarity(Q, **f32), similarity(Q, metric=metric), 1e-5)


@pytest.mark.parametrize("metric", ["spearman", "pearson", "cosine"])
def test_paired_similarity_is_the_diagonal(metric):
    X = tricky_rows()
    A, B = X, np.roll(X, 1, axis=0)
    got = paired_similarity(A, B, metric, block_rows=3)
    assert_matches(got, np.diag(reference(A, B, metric)))


@pytest.mark.parametrize("n_pairs", [3, 200])  # sparse -> per-pair dots, dense -> sub-matrix products
def test_similarity_at_matches_full_matrix(n_pairs):
    rng = np.random.default_rng(3)
    X = tricky_rows()
    pairs = rng.integers(0, len(X), (n_pairs, 2))
    full = similarity(X)
    want = full[pairs[:, 0], pairs[:, 1]]
    assert same(similarity_at(X, pairs), want, 1e-15)
    B = X[::-1].copy()
    want_b = similarity(X, B)[pairs[:, 0], pairs[:, 1]]
    assert same(similarity_at(X, torch.from_numpy(pairs), B), want_b, 1e-15)
    assert similarity_at(X, np.zeros((0, 2), int)).shape == (0,)


def test_bad_input_is_an_fvtrust_error():
    X = tricky_rows()
    with pytest.raises(FvtrustError, match="did you mean"):
        similarity(X, metric="spearmann")
    with pytest.raises(FvtrustError, match="features"):
        similarity(X, X[:, :10])
    with pytest.raises(FvtrustError, match="empty"):
        similarity(np.zeros((0, 5)))
    with pytest.raises(FvtrustError, match="empty"):
        similarity(np.zeros((3, 0)))
    with pytest.raises(FvtrustError, match="scalar"):
        similarity(np.float64(3.0))
    with pytest.raises(FvtrustError, match="numeric"):
        similarity(np.array([["a", "b"]]))
    with pytest.raises(FvtrustError, match="dtype"):
        similarity(X, dtype=torch.float16)
    with pytest.raises(FvtrustError, match="equal shapes"):
        paired_similarity(X, X[:3])
    with pytest.raises(FvtrustError, match="out of range"):
        similarity_at(X, [(0, len(X))])
    with pytest.raises(FvtrustError, match=r"\(k, 2\)"):
        similarity_at(X, [0, 1, 2])
    with pytest.raises(FvtrustError, match="earlier rows"):
        acc = SimilarityAccumulator()
        acc.add(X)
        acc.add(X[:, :5])
    with pytest.raises(FvtrustError, match="no rows"):
        similarity_blocks([])
    with pytest.raises(FvtrustError, match="no rows"):
        SimilarityAccumulator().result()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_matches_cpu(dtype):
    X = torch.from_numpy(tricky_rows(d=3000, seed=4))
    want = similarity(X)
    got = similarity(X.cuda(), dtype=dtype)
    assert got.device.type == "cpu"
    assert same(got, want, 1e-6 if dtype == torch.float32 else 1e-12)


def test_memmap_rows_are_read_in_blocks(tmp_path):
    X = tricky_rows().astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "acts.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    mm.flush()
    ro = np.load(tmp_path / "acts.npy", mmap_mode="r")
    want = similarity(X)
    assert same(similarity(ro, block_rows=2), want)
    assert same(similarity_at(ro, [(0, 1), (5, 8)]), want[[0, 5], [1, 8]], 1e-15)
    Y = X.copy()
    Y[9, 2] = np.nan
    with pytest.raises(FvtrustError, match="row 9"):
        similarity_at(Y, [(0, 1), (9, 8)], nan_policy="raise", block_rows=1)


@pytest.mark.parametrize("dot_cost", [1, 64])  # 1: sparse tiles use per-pair dots
def test_tiled_paths_match_scipy(monkeypatch, dot_cost):
    import importlib

    # the module, not the `similarity` function that fvtrust.sanity re-exports under the same name
    sim = importlib.import_module("fvtrust.sanity.similarity")
    monkeypatch.setattr(sim, "GRAM_ROWS", 3)  # many tiles on a small matrix
    monkeypatch.setattr(sim, "DOT_COST", dot_cost)
    X = tricky_rows()
    want = reference(X, X, "spearman")
    assert_matches(similarity(X), want)
    pairs = np.random.default_rng(5).integers(0, len(X), (40, 2))
    assert_matches(similarity_at(X, pairs), want[pairs[:, 0], pairs[:, 1]])
    assert_matches(similarity_at(X, pairs, X[::-1].copy()), want[pairs[:, 0], len(X) - 1 - pairs[:, 1]])
