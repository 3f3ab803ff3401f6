"""Average ranks: the per-row numpy path (CPU, float32-exact values) and the
batched torch path (GPU, other dtypes) must agree bit for bit, and equal scipy."""

import numpy as np
import pytest
import scipy.stats
import torch

from fvtrust.sanity import ranks
from fvtrust.sanity.ranks import average_ranks, centred_ranks, unit_ranks


def edge_rows(d=60, seed=0):
    """float32 rows covering every branch of the numpy path (zeros left out of the sort)."""
    rng = np.random.default_rng(seed)
    relu = np.maximum(rng.normal(size=d), 0)
    mixed = rng.normal(size=d)
    signed_zeros = np.where(rng.random(d) < 0.5, -0.0, 0.0)
    half = d // 2
    rows = [
        relu,  # zeros are the largest tie group
        relu.round(1),  # ties among the nonzero values too
        np.zeros(d),  # all zeros: constant
        np.full(d, -2.5),  # constant, negative
        mixed,  # no zeros, no ties: not shifted
        np.r_[0.0, np.abs(mixed[1:]) + 0.1],  # one zero (the minimum), no ties: not shifted either
        np.where(mixed > 0, mixed, signed_zeros),  # -0.0 and 0.0 are one group
        rng.integers(-2, 3, d),  # ties on both sides of zero
        np.r_[np.zeros(half), np.ones(d - half)],  # two equal largest groups: zeros first
        np.r_[-np.ones(half), np.zeros(d - half)],  # two equal largest groups: zeros second
        np.r_[np.full(d - 10, 3.0), np.zeros(10)],  # a nonzero group larger than the zeros
        np.r_[np.inf, -np.inf, np.zeros(d - 4), 1.0, -1.0],  # infinities
        np.eye(1, d, 7)[0],  # one nonzero value
        -relu,  # negative values only, with zeros
        np.where(np.arange(d) % 2 == 0, 1.0, 0.0),  # binary
    ]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


@pytest.fixture
def torch_only(monkeypatch):
    """Route every call to the batched torch path."""
    monkeypatch.setattr(ranks, "_float32_rows", lambda x: None)


def _both(fn, monkeypatch):
    fast = fn()
    monkeypatch.setattr(ranks, "_float32_rows", lambda x: None)
    slow = fn()
    monkeypatch.undo()
    return fast, slow


def _same(a, b):
    return torch.equal(torch.nan_to_num(a, 9.0), torch.nan_to_num(b, 9.0)) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_path_equals_torch_path_bit_for_bit(monkeypatch, threads):
    x = edge_rows()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, slow = _both(lambda: centred_ranks(x, with_mode=True), monkeypatch)
        for f, s in zip(fast, slow):
            assert f.dtype == s.dtype and _same(f, s)
        for dtype in (torch.float64, torch.float32):
            for with_shift in (False, True):
                def run():
                    out = torch.empty(x.shape, dtype=dtype)
                    shift = torch.empty(len(x), dtype=torch.float64) if with_shift else None
                    unit_ranks(x, out, shift)
                    return out, shift
                (fo, fs), (so, ss) = _both(run, monkeypatch)
                assert _same(fo, so)
                if with_shift:
                    assert _same(fs, ss)
    finally:
        torch.set_num_threads(old)


def test_float32_rows_equal_rankdata():
    x = edge_rows(d=201, seed=3)
    assert torch.equal(average_ranks(x), torch.from_numpy(scipy.stats.rankdata(x.numpy(), axis=1)))
    unit = torch.empty(x.shape, dtype=torch.float64)
    unit_ranks(x, unit)
    r = scipy.stats.rankdata(x.numpy(), axis=1)
    c = r - r.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        want = c / np.linalg.norm(c, axis=1, keepdims=True)
    np.testing.assert_allclose(unit.numpy(), want, rtol=0, atol=1e-15)


def test_which_inputs_take_the_numpy_path():
    x = edge_rows(d=30)
    assert ranks._float32_rows(x) is not None
    assert ranks._float32_rows(x.double()) is not None  # float64 that float32 holds exactly
    assert ranks._float32_rows(x.double() + 1e-9) is None  # float32 would merge distinct values
    assert ranks._float32_rows((x * 4).to(torch.int16)) is not None
    assert ranks._float32_rows(torch.tensor([[2**25, 2**25 + 1]])) is None  # int64 beyond float32
    nan = x.double()
    nan[0, 0] = float("nan")
    assert ranks._float32_rows(nan) is None
    wide = torch.tensor([[2**25, 2**25 + 1]])
    assert torch.equal(average_ranks(wide), torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def test_a_forked_child_ranks_with_its_own_pool():
    import multiprocessing as mp

    x = edge_rows()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = average_ranks(x)  # the parent's pool now has threads
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(average_ranks, (x,)).get(timeout=30)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got.nan_to_num(9.0), want.nan_to_num(9.0))
