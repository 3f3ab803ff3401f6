"""Scale-out: run a pipeline's independent shards one after another, or on Ray workers.

Why one place: every long pipeline (detector data, the sanity check's layers,
the audit's unit chunks, visualizing many units) already splits its work
into shards that end in one verified cache entry each (`fvtrust.cache`). What
changes with a cluster is only *who computes a shard*. So a pipeline asks
:func:`run_shards` for the shards whose entries are missing; the backend
calls ``fn(*shared, *args)`` for each and hands every payload back to the
driver's ``on_result``, which writes the cache entry exactly as the
single-process code does. The driver then assembles its result from the
cache in the same way whether the shards ran here or on workers, so the
results are the same by construction (and bit-identical wherever the shard
itself is deterministic; see tests/test_scale.py).

Backends:

* sequential (the default): a plain loop in this process; Ray is never imported;
* Ray (`fvtrust.scale.ray`, the optional ``fvtrust[ray]`` extra), chosen with
  ``with fvtrust.scale.workers("auto"):`` or ``--ray auto|local[:N]|ADDRESS``
  on the long commands: one Ray task per shard, one CPU (or, for a model on
  CUDA, one GPU) each. A worker that dies is retried by Ray itself
  (``max_retries``); a driver that dies keeps every shard whose payload it
  received (its entry is written at once), so a rerun computes only the rest.

Workers return payloads to the driver, which alone writes the cache: the
cluster needs no shared storage, only fvtrust installed on every node.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable

_BACKEND: contextvars.ContextVar = contextvars.ContextVar("fvtrust_scale_backend", default=None)


def current():
    """The backend set by :func:`workers` (None: sequential, in this process)."""
    return _BACKEND.get()


@contextlib.contextmanager
def workers(ray: str | None = None):
    """Run the shards of every pipeline called in the body on Ray (`ray`: auto, local[:N] or an address).

    ``ray=None`` changes nothing (the sequential backend; Ray is not imported).
    A Ray instance this context starts is shut down when it ends; one that was
    already running (``ray.init`` by the caller) is left as it is.
    """
    if ray is None:
        yield None
        return
    from .ray import RayBackend

    backend = RayBackend(ray)
    token = _BACKEND.set(backend)
    try:
        yield backend
    finally:
        _BACKEND.reset(token)
        backend.close()


def run_shards(fn: Callable, shards: Iterable, *, on_result: Callable, shared: tuple = (), desc: str = "shards",
               unit: str = "shard", backend=None) -> int:
    """Compute ``fn(*shared, *args)`` for each ``(key, args)`` of `shards`; call ``on_result(key, payload)``.

    `fn` must be a module-level function (workers import it by name) whose
    payload is picklable and depends only on its arguments (no global state),
    so any process may compute it. `shared` holds the large arguments every
    shard needs (a model, natural images): Ray ships them once. ``on_result``
    runs in this process, in the order shards finish (sequential: in order),
    and is where the pipeline writes the shard's cache entry. Returns the
    number of shards computed.
    """
    shards = list(shards)
    if not shards:
        return 0
    backend = current() if backend is None else backend
    if backend is None:
        return _sequential(fn, shards, on_result, shared, desc, unit)
    return backend.run(fn, shards, on_result=on_result, shared=shared, desc=desc, unit=unit)


def _sequential(fn, shards, on_result, shared, desc, unit) -> int:
    from ..progress import progress

    bar = progress(total=len(shards), desc=desc, unit=unit)
    try:
        for key, args in shards:
            on_result(key, fn(*shared, *args))
            bar.update(1)
    finally:
        bar.close()
    return len(shards)


__all__ = ["workers", "run_shards", "current"]
