"""Rows of one width and dtype in a flat binary file, written and read block by block.

Why a file of its own: the sanity check at the paper's size compares rows that
do not fit in memory (50,000 images x 802,816 values is 160 GB in float32).
:class:`RowFile` is the out-of-core store behind the streamed similarity
(:class:`~fvtrust.sanity.similarity.SimilarityAccumulator` spills prepared rows
to one) and a plain way to hand activations to it from disk.

* I/O happens on one background thread, in submission order: ``append`` returns
  at once (the write overlaps the caller's compute), ``blocks`` reads the next
  block while the caller works on the current one. ``os.pwrite``/``os.preadv``
  release the GIL, so the overlap is real.
* ``drop_cache=True``: written pages are flushed (``fdatasync``) and dropped from
  the OS page cache, and each block's pages are dropped again right before it is
  read (``posix_fadvise(POSIX_FADV_DONTNEED)``). Reads then come from storage,
  not from RAM: the honest setting for a benchmark, and the polite one for a
  file that exists because memory is short (caching it would only evict
  something else). On systems without ``posix_fadvise`` the flag does nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fvtrust.errors import FvtrustError

_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def drop_cached_pages(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the OS to evict a file range from its page cache (clean pages only)."""
    if _DONTNEED is not None:
        os.posix_fadvise(fd, offset, length, _DONTNEED)


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
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rowfile")
        self._pending: list[Future] = []

    # ------------------------------------------------------------------ write
    def append(self, rows) -> None:
        """Queue ``rows`` (k, d) for writing after the current end; returns at once."""
        a = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        a = np.ascontiguousarray(a.reshape(len(a), -1), dtype=self.dtype)
        if a.shape[1] != self.d:
            raise FvtrustError(f"rows have {a.shape[1]} values but {self.path} holds {self.d} per row")
        offset = self.n * self.row_bytes
        self.n += len(a)
        self._pending.append(self._io.submit(self._write, a, offset))
        still = []
        for f in self._pending:  # a failed earlier write surfaces here, not at close
            if f.done():
                f.result()
            else:
                still.append(f)
        self._pending = still

    def _write(self, a: np.ndarray, offset: int) -> None:
        view = memoryview(a).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        if self.drop_cache:
            os.fdatasync(self.fd)  # dirty pages cannot be dropped
            drop_cached_pages(self.fd, offset, len(view))

    def flush(self) -> None:
        """Wait for queued writes; re-raise the first failure."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    # ------------------------------------------------------------------- read
    def _read(self, i: int, j: int) -> np.ndarray:
        out = np.empty((j - i, self.d), dtype=self.dtype)
        view, offset = memoryview(out).cast("B"), i * self.row_bytes
        if self.drop_cache:
            drop_cached_pages(self.fd, offset, len(view))
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise FvtrustError(f"{self.path} ended early: rows {i}..{j} requested, file truncated?")
            done += got
        return out

    def read(self, i: int = 0, j: int | None = None) -> np.ndarray:
        """Rows ``i:j`` as a fresh (writable) array, after queued writes."""
        j = self.n if j is None else min(j, self.n)
        if not 0 <= i <= j:
            raise FvtrustError(f"bad row range {i}:{j} for {self.path} with {self.n} rows")
        return self._io.submit(self._read, i, j).result()

    def blocks(self, rows: int, start: int = 0, stop: int | None = None, ahead: int = 1):
        """Rows ``start:stop`` as arrays of ``rows`` rows, with ``ahead`` blocks read in advance.

        The first reads are queued when this is *called*, not when iteration
        starts, so a caller can start them, compute something else, and find
        the data waiting."""
        stop = self.n if stop is None else min(stop, self.n)
        rows, ahead = max(1, int(rows)), max(1, int(ahead))
        spans = [(i, min(i + rows, stop)) for i in range(start, stop, rows)]
        queued = [self._io.submit(self._read, *span) for span in spans[:ahead]]

        def gen():
            for k in range(len(spans)):
                if k + ahead < len(spans):
                    queued.append(self._io.submit(self._read, *spans[k + ahead]))
                yield queued.pop(0).result()

        return gen()

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
