"""RowFile: the out-of-core row store behind streamed similarity."""

import numpy as np
import pytest
import torch

from fvtrust.errors import FvtrustError
from fvtrust.sanity.rowfile import RowFile


@pytest.mark.parametrize("drop_cache", [False, True])
def test_rows_round_trip_in_order(tmp_path, drop_cache):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(23, 17)).astype(np.float32)
    path = tmp_path / "x.rows"
    with RowFile(path, 17, np.float32, "w", drop_cache=drop_cache) as f:
        f.append(X[:5])
        f.append(torch.from_numpy(X[5:6]))  # tensors too
        f.append(X[6:].reshape(17, 17, 1))  # flattened after the first dim
        assert len(f) == 23
        np.testing.assert_array_equal(f.read(), X)  # waits for the queued writes
    assert path.stat().st_size == X.nbytes
    with RowFile(path, 17, np.float32, drop_cache=drop_cache) as f:
        assert len(f) == 23
        got = list(f.blocks(4, start=2, stop=21))
        assert [len(b) for b in got] == [4, 4, 4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(got), X[2:21])
        assert got[0].flags.writeable
        ahead = f.blocks(5, ahead=3)  # reads are queued at the call, consumed in order
        np.testing.assert_array_equal(np.concatenate(list(ahead)), X)
        np.testing.assert_array_equal(f.read(20, 99), X[20:])
        assert list(f.blocks(4, start=23)) == []
    with RowFile(path, 17, np.float32, "a") as f:
        f.append(X[:1])
    assert RowFile(path, 17, np.float32).n == 24


def test_bad_files_are_fvtrust_errors(tmp_path):
    path = tmp_path / "x.rows"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(FvtrustError, match="whole number"):
        RowFile(path, 3, np.float32)
    with pytest.raises(FvtrustError, match="cannot open"):
        RowFile(tmp_path / "missing.rows", 3)
    with pytest.raises(FvtrustError, match="mode"):
        RowFile(path, 3, mode="x")
    with RowFile(tmp_path / "y.rows", 3, np.float64, "w", delete=True) as f:
        with pytest.raises(FvtrustError, match="values"):
            f.append(np.zeros((2, 4)))
        with pytest.raises(FvtrustError, match="row range"):
            f.read(2, 1)
    assert not (tmp_path / "y.rows").exists()  # delete=True removes it on close


@pytest.mark.parametrize("drop_cache", [False, True])
def test_reused_buffers_and_memory_map(tmp_path, drop_cache):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(41, 1031)).astype(np.float64)  # rows straddle 4 KiB pages: O_DIRECT reads realign
    path = tmp_path / "x.rows"
    with RowFile(path, X.shape[1], np.float64, "w", drop_cache=drop_cache) as f:
        for i in range(0, len(X), 7):
            f.append(X[i : i + 7])
        assert f.as_array().shape == X.shape  # flushes the queued writes first
    with RowFile(path, X.shape[1], np.float64, drop_cache=drop_cache) as f:
        if drop_cache:
            assert f.direct_fd >= 0  # ext4/xfs/btrfs take O_DIRECT (tmpfs would fall back to dropping pages)
        seen, ptrs = [], set()  # the memory behind each block
        for b in f.blocks(5, start=3, ahead=2, reuse=True):
            seen.append(b.copy())  # a reused block is valid until the next one is requested
            owner = b
            while isinstance(owner, np.ndarray) and owner.base is not None:
                owner = owner.base
            ptrs.add(id(owner.obj if isinstance(owner, memoryview) else owner))
        np.testing.assert_array_equal(np.concatenate(seen), X[3:])
        assert len(ptrs) <= 3  # a ring of ahead + 1 buffers
        np.testing.assert_array_equal(f.read(40), X[40:])  # the last, partial page
        m = f.as_array()
        np.testing.assert_array_equal(m[[0, 17, 40]], X[[0, 17, 40]])
        m[0] = 0.0  # copy-on-write: the file keeps its rows
        np.testing.assert_array_equal(f.read(0, 1), X[:1])


def test_page_aligned_rows_skip_the_page_cache(tmp_path, monkeypatch):
    """drop_cache writes go through O_DIRECT when buffer, offset and length are page-aligned."""
    import os

    from fvtrust.sanity.rowfile import aligned_empty

    used = []
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: used.append(fd) or pwrite(fd, data, off))
    rng = np.random.default_rng(2)
    X = rng.normal(size=(9, 1024)).astype(np.float32)  # 4 KiB rows
    aligned = aligned_empty((4, 1024), np.float32)
    with RowFile(tmp_path / "x.rows", 1024, np.float32, "w", drop_cache=True) as f:
        aligned[:] = X[:4]
        f.append(aligned).result()  # aligned: O_DIRECT
        shifted = aligned_empty((1025,), np.float32)[1:].reshape(1, 1024)  # 4 bytes past a page
        shifted[:] = X[4:5]
        f.append(shifted).result()  # misaligned in memory: page cache, then dropped
        aligned[:] = X[5:9]
        f.append(aligned).result()  # aligned again (offset 5 rows = 5 pages)
        assert used == [f.direct_fd, f.fd, f.direct_fd]
        np.testing.assert_array_equal(f.read(), X)
