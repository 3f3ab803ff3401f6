"""Rows of one width and dtype in a flat binary file, written and read block by block.

Why a file of its own: the sanity check at the paper's size compares rows that
do not fit in memory (50,000 images x 802,816 values is 160 GB in float32).
:class:`RowFile` is fvtrust's one out-of-core row store: the streamed
similarity (:class:`~fvtrust.sanity.similarity.SimilarityAccumulator`) spills
prepared rows to one, :func:`fvtrust.sanity.activations.collect` spills a
layer too large for memory to one, and it is a plain way to hand activations
to the engine from disk.

* I/O happens on one background thread, in submission order: ``append`` returns
  at once (the write overlaps the caller's compute), ``blocks`` reads the next
  blocks while the caller works on the current one. ``os.pwrite``/``os.preadv``
  release the GIL, so the overlap is real.
* ``drop_cache=True``: reads come from storage, not from RAM -- the honest
  setting for a benchmark, and the polite one for a file that exists because
  memory is short (caching it would only evict something else). Written pages
  bypass the page cache with ``O_DIRECT`` where the file system allows it
  (storage straight to or from the caller's buffer, no copy, no cached page):
  always for reads, for writes when the rows are page-aligned in memory and
  in the file (see :func:`aligned_empty`). Other writes are flushed
  (``fdatasync``) and dropped from the cache
  (``posix_fadvise(POSIX_FADV_DONTNEED)``); without ``O_DIRECT`` each block's
  pages are also dropped right before it is read. On systems without
  ``posix_fadvise`` and ``O_DIRECT`` the flag only flushes.
* ``blocks(..., reuse=True)`` reads into a ring of ``ahead + 1`` buffers instead
  of fresh arrays. Fresh arrays cost more CPU than the read itself (the kernel
  faults in and zeroes every page: ~1 s per GiB here, against ~0.1 s per GiB
  for an ``O_DIRECT`` read into a reused buffer), so the engine's spill reads
  reuse; a block is then valid only until the next one is requested.
* :meth:`as_array` maps the file for random row access (through the page
  cache, which is what a memory map is): the activation spill reads class
  blocks of a layer that way.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fvtrust.errors import FvtrustError

_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# O_DIRECT needs file offsets, lengths and buffer addresses aligned to the
# device's logical block size; 4096 covers 512-byte and 4K devices.
_ALIGN = 4096


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array in a page-aligned anonymous mapping: rows written
    from it to a ``drop_cache`` file can skip the page cache (``O_DIRECT``)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * dtype.itemsize, _ALIGN))
    return np.frombuffer(buf, dtype, count).reshape(shape)


def drop_cached_pages(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the OS to evict a file range from its page cache (clean pages only)."""
    if _DONTNEED is not None:
        os.posix_fadvise(fd, offset, length, _DONTNEED)


class _Buffer:
    """A page-aligned anonymous mapping (what O_DIRECT reads into), grown on demand."""

    def __init__(self):
        self.map: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        if self.map is None or len(self.map) < nbytes:
            self.map = mmap.mmap(-1, max(nbytes, _ALIGN))
        return self.map


class RowFile:
    """An (n, d) row matrix of ``dtype`` stored row-major in ``path``.

    ``mode="w"`` creates (truncates) the file, ``"r"`` opens an existing one
    (``n`` from its size), ``"a"`` opens for appending. Use as a context manager
    or call :meth:`close`; ``delete=True`` removes the file on close.
    """

    def __init__(self, path, d: int, dtype=np.float32, mode: str = "r", *, drop_cache: bool = False,
                 delete: bool = False):
        if mode not in ("r", "w", "a"):
            raise FvtrustError(f"RowFile mode must be 'r', 'w' or 'a', got {mode!r}")
        if d < 1:
            raise FvtrustError(f"RowFile needs at least one value per row, got d={d}")
        self.path, self.d, self.dtype = Path(path), int(d), np.dtype(dtype)
        self.row_bytes = self.d * self.dtype.itemsize
        self.drop_cache, self.delete = drop_cache, delete
        flags = {"r": os.O_RDONLY, "w": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "a": os.O_RDWR | os.O_CREAT}[mode]
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise FvtrustError(f"cannot open row file {self.path}: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size % self.row_bytes:
            os.close(self.fd)
            raise FvtrustError(f"{self.path} holds {size} bytes, not a whole number of {self.d}-value "
                               f"{self.dtype} rows")
        self.n = size // self.row_bytes
        self.direct_fd = -1  # O_DIRECT descriptor (drop_cache only)
        if drop_cache and _O_DIRECT:
            try:
                self.direct_fd = os.open(self.path, (os.O_RDONLY if mode == "r" else os.O_RDWR) | _O_DIRECT)
            except OSError:  # tmpfs and some file systems refuse O_DIRECT: drop pages instead
                self.direct_fd = -1
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rowfile")
        self._pending: list[Future] = []

    # ------------------------------------------------------------------ write
    def append(self, rows) -> Future:
        """Queue ``rows`` (k, d) for writing after the current end; returns at once.

        The rows are not copied when they already are a contiguous array of the
        file's dtype: do not change them until the returned future is done."""
        a = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        a = np.ascontiguousarray(a.reshape(len(a), -1), dtype=self.dtype)
        if a.shape[1] != self.d:
            raise FvtrustError(f"rows have {a.shape[1]} values but {self.path} holds {self.d} per row")
        offset = self.n * self.row_bytes
        self.n += len(a)
        future = self._io.submit(self._write, a, offset)
        still = []
        for f in self._pending:  # a failed earlier write surfaces here, not at close
            if f.done():
                f.result()
            else:
                still.append(f)
        self._pending = still + [future]
        return future

    def _write(self, a: np.ndarray, offset: int) -> None:
        view = memoryview(a).cast("B")
        direct = self.direct_fd >= 0 and not (offset % _ALIGN or len(view) % _ALIGN or a.ctypes.data % _ALIGN)
        done = 0
        while done < len(view):
            done += os.pwrite(self.direct_fd if direct else self.fd, view[done:], offset + done)
        if self.drop_cache and not direct:
            os.fdatasync(self.fd)  # dirty pages cannot be dropped
            drop_cached_pages(self.fd, offset, len(view))

    def flush(self) -> None:
        """Wait for queued writes; re-raise the first failure."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    # ------------------------------------------------------------------- read
    def _read(self, i: int, j: int, buf: _Buffer | None = None) -> np.ndarray:
        """Rows ``i:j`` into ``buf`` (reused) or a fresh array."""
        offset, nbytes = i * self.row_bytes, (j - i) * self.row_bytes
        if self.direct_fd >= 0:
            return self._read_direct(i, j, buf or _Buffer())
        if buf is None:
            out = np.empty((j - i, self.d), dtype=self.dtype)
        else:
            out = np.frombuffer(buf.get(nbytes), self.dtype, (j - i) * self.d).reshape(j - i, self.d)
        if self.drop_cache:
            drop_cached_pages(self.fd, offset, nbytes)
        self._fill(self.fd, memoryview(out).cast("B"), offset, i, j)
        return out

    def _read_direct(self, i: int, j: int, buf: _Buffer) -> np.ndarray:
        offset, nbytes = i * self.row_bytes, (j - i) * self.row_bytes
        lo = offset - offset % _ALIGN
        hi = -(-(offset + nbytes) // _ALIGN) * _ALIGN
        raw = buf.get(hi - lo)
        self._fill(self.direct_fd, memoryview(raw)[: hi - lo], lo, i, j, need=offset + nbytes - lo)
        return np.frombuffer(raw, self.dtype, (j - i) * self.d, offset - lo).reshape(j - i, self.d)

    def _fill(self, fd: int, view: memoryview, offset: int, i: int, j: int, need: int | None = None) -> None:
        need = len(view) if need is None else need
        done = 0
        while done < need:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise FvtrustError(f"{self.path} ended early: rows {i}..{j} requested, file truncated?")
            done += got

    def read(self, i: int = 0, j: int | None = None) -> np.ndarray:
        """Rows ``i:j`` as a fresh (writable) array, after queued writes."""
        j = self.n if j is None else min(j, self.n)
        if not 0 <= i <= j:
            raise FvtrustError(f"bad row range {i}:{j} for {self.path} with {self.n} rows")
        return self._io.submit(self._read, i, j).result()

    def blocks(self, rows: int, start: int = 0, stop: int | None = None, ahead: int = 1, *, reuse: bool = False):
        """Rows ``start:stop`` as arrays of ``rows`` rows, with ``ahead`` blocks read in advance.

        The first reads are queued when this is *called*, not when iteration
        starts, so a caller can start them, compute something else, and find
        the data waiting. ``reuse=True``: blocks share a ring of ``ahead + 1``
        buffers, so a block is valid only until the next one is requested."""
        stop = self.n if stop is None else min(stop, self.n)
        rows, ahead = max(1, int(rows)), max(1, int(ahead))
        spans = [(i, min(i + rows, stop)) for i in range(start, stop, rows)]
        ring = [_Buffer() for _ in range(ahead + 1)] if reuse else None

        def submit(k: int) -> Future:
            return self._io.submit(self._read, *spans[k], None if ring is None else ring[k % len(ring)])

        queued = [submit(k) for k in range(min(ahead, len(spans)))]

        def gen():
            for k in range(len(spans)):
                if k + ahead < len(spans):  # block k - 1's buffer is free now: the caller asked for k
                    queued.append(submit(k + ahead))
                yield queued.pop(0).result()

        return gen()

    def as_array(self) -> np.ndarray:
        """The rows as an (n, d) copy-on-write memory map, for random row access.

        Writes to the array stay in memory; the file is not changed. Pending
        appends are flushed first."""
        self.flush()
        if self.n == 0:
            return np.empty((0, self.d), dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="c", shape=(self.n, self.d))

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            self._io.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1
            if self.direct_fd >= 0:
                os.close(self.direct_fd)
                self.direct_fd = -1
            if self.delete:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a forgotten spill file should not outlive the process's interest in it
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: best effort
            pass
