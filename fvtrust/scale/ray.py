"""The Ray backend of `fvtrust.scale` (optional extra: ``pip install 'fvtrust[ray]'``).

Imported only when a user asks for Ray (``--ray``, ``fvtrust.scale.workers``).
One Ray task per shard, ``num_cpus=1`` (Ray then runs torch single-threaded in
it), or ``num_gpus=1`` when the pipeline's model is on CUDA. Worker death is
Ray's business: each task is retried ``FVTRUST_RAY_RETRIES`` times (default
3) on a fresh worker. Errors raised *by* a shard (bad input found late) are
not retried: they would fail again; an FvtrustError comes back as one line.

Where the cluster is (``--ray`` value):

* ``auto``: what ``ray.init()`` finds: the cluster at ``RAY_ADDRESS``, else the
  latest ``ray start`` on this machine, else a new local instance;
* ``local`` / ``local:N``: a new local instance on this machine (N CPU slots);
* anything else: a cluster address (``ray://head:10001``, ``head:6379``).
"""
from __future__ import annotations

import copy
import os
import signal

from ..errors import FvtrustError

INSTALL_HINT = "pip install 'fvtrust[ray]' (or pip install ray)"
KILL_ONCE = "FVTRUST_RAY_KILL_ONCE"  # fault injection for tests: see _shard


def import_ray():
    try:
        import ray
    except ImportError:
        raise FvtrustError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def retries() -> int:
    raw = os.environ.get("FVTRUST_RAY_RETRIES", "3")
    try:
        n = int(raw)
    except ValueError:
        raise FvtrustError(f"FVTRUST_RAY_RETRIES must be a whole number, got {raw!r}") from None
    if n < 0:
        raise FvtrustError(f"FVTRUST_RAY_RETRIES must be >= 0, got {n}")
    return n


def parse_address(spec: str) -> dict:
    """ray.init keyword arguments for a ``--ray`` value (see the module doc)."""
    spec = (spec or "").strip()
    if not spec:
        raise FvtrustError("--ray needs a value: auto, local[:N] or a cluster address (ray://head:10001)")
    if spec == "auto":
        return {}
    if spec == "local" or spec.startswith("local:"):
        n = spec.partition(":")[2]
        if n and not (n.isdigit() and int(n) >= 1):
            raise FvtrustError(f"--ray local:N needs a positive number of CPU slots, got {spec!r}")
        return {"address": "local", **({"num_cpus": int(n)} if n else {})}
    return {"address": spec}


class RayBackend:
    """Connects to (or starts) a Ray cluster; `run` spreads shards over it."""

    def __init__(self, spec: str):
        self.kwargs = parse_address(spec)  # bad values and a missing Ray fail here, in one line, before any work
        self.retries = retries()
        self.spec, self.ray, self.started = spec, import_ray(), False

    def connect(self):
        """Join (or start) the cluster on the first shards to run: a fully cached rerun starts nothing."""
        ray = self.ray
        if ray.is_initialized():
            return
        env = {"FVTRUST_PROGRESS": "0", "FVTRUST_EVENTS_FD": ""}  # workers: no bars, no events on our fd
        if os.environ.get(KILL_ONCE):
            env[KILL_ONCE] = os.environ[KILL_ONCE]
        import logging

        try:
            ray.init(**self.kwargs, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env})
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise FvtrustError(f"cannot connect to Ray at {self.spec!r}: {str(e).splitlines()[0][:200]}") from None
        self.started = True

    def close(self):
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()

    def describe(self) -> dict:
        res = self.ray.cluster_resources()
        return {"backend": "ray", "address": self.spec, "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)}

    def run(self, fn, shards, *, on_result, shared=(), desc="shards", unit="shard") -> int:
        import torch

        from ..progress import progress

        self.connect()
        ray = self.ray
        # a model on CUDA travels as a CPU copy (its device index means nothing on another node) and each
        # shard gets one GPU, onto which _shard moves it; on CPU each shard gets one CPU slot
        cuda = [isinstance(s, torch.nn.Module) and _on_cuda(s) for s in shared]
        gpus = 1 if any(cuda) else 0
        sent = [copy.deepcopy(s).cpu() if c else s for s, c in zip(shared, cuda)]
        refs = [ray.put(s) for s in sent]
        task = ray.remote(_shard).options(num_cpus=0 if gpus else 1, num_gpus=gpus, max_retries=self.retries,
                                          retry_exceptions=False)
        pending = {task.remote(fn, "cuda" if gpus else None, len(refs), *refs, *args): key for key, args in shards}
        bar = progress(total=len(pending), desc=f"{desc} (ray)", unit=unit)
        n = 0
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(done[0])
                on_result(key, self._get(done[0], key))
                n += 1
                bar.update(1)
        finally:
            bar.close()
            for ref in pending:  # the driver stops (error, ^C): no orphaned work keeps the cluster busy
                ray.cancel(ref, force=True)
        return n

    def _get(self, ref, key):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, FvtrustError):
                raise FvtrustError(str(cause)) from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayError) as e:
            raise FvtrustError(f"Ray shard {key!r} failed after {self.retries} retries "
                               f"({type(e).__name__}); rerun the command to resume from the finished shards") from None


def _on_cuda(module) -> bool:
    return any(t.is_cuda for t in list(module.parameters()) + list(module.buffers()))


def _shard(fn, device, n_shared, *args):
    """What a Ray task runs: ``fn(*shared, *rest)`` with the shared models on `device`.

    Fault injection (tests only): when $FVTRUST_RAY_KILL_ONCE names a directory,
    shards number themselves in the order they start (DIR/started-I, created
    atomically across workers); the one numbered by DIR/skip (default 1: the
    second, so the run is under way) records its pid in DIR/killed and
    SIGKILLs its own worker, as a crashing node would. Ray retries the task.
    """
    kill_dir = os.environ.get(KILL_ONCE)
    if kill_dir and os.path.isdir(kill_dir) and not os.path.exists(os.path.join(kill_dir, "killed")):
        _maybe_kill(kill_dir)
    os.environ["FVTRUST_PROGRESS"] = "0"  # also on a cluster the driver did not start
    from .. import progress

    progress._events_fd, progress._events_checked = None, True
    shared = list(args[:n_shared])
    if device is not None:
        shared = [s.to(device) if hasattr(s, "to") and hasattr(s, "parameters") else s for s in shared]
    return fn(*shared, *args[n_shared:])


def _maybe_kill(kill_dir: str) -> None:
    try:
        skip = int(open(os.path.join(kill_dir, "skip")).read())
    except (OSError, ValueError):
        skip = 1
    i = 0
    while True:  # my start number: the first free DIR/started-I
        try:
            os.close(os.open(os.path.join(kill_dir, f"started-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            i += 1
    if i == skip:
        with open(os.path.join(kill_dir, "killed"), "w") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
