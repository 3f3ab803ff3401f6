"""Caches of long computations: every entry verified before use, one writer per directory.

Why: fvtrust's long runs (detector snapshots, sanity layers, linearity units,
reproduce steps) resume from caches after a crash, a kill or a full disk. A
cache is only worth having if a damaged or foreign entry can never leak into
a result. So every entry written here carries

* a **key**: the fingerprint of everything that determined it (model weights,
  settings, inputs). An entry whose key differs (another model or other
  settings, e.g. a cache folder copied between runs) is stale;
* a **sha256 of its payload**. A truncated, half-written or garbled entry
  fails the check (or fails to parse).

Either way :func:`read_entry` reports it on stderr in one line, deletes it
and returns None, and the caller recomputes; it never raises. Three payload
formats, each still readable by its usual tool: ``safetensors`` (a dict of
tensors; key and digest in the header metadata), ``npz`` (a dict of arrays;
key and digest in an extra ``__fvtrust__`` array) and ``json`` (any JSON-able
object, wrapped as ``{"fvtrust_cache": {...}, "data": ...}``).

Concurrency: :func:`locked` holds an inter-process lock (``filelock``) on a
directory for as long as a process writes into it. The second process
either waits (caches shared between runs: it then finds the work done) or
fails with one line (output directories). Holding the lock also makes it
safe to sweep up the temp files a killed writer left behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

from .errors import FvtrustError
from .io import atomic_write_bytes, to_json
from .progress import event

FORMATS = ("safetensors", "npz", "json")
LOCK_NAME = ".fvtrust.lock"
_META = "__fvtrust__"


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (settings dicts, digests): the key of a cache entry."""
    text = json.dumps(parts, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def warn(message: str) -> None:
    print(f"fvtrust: {message}", file=sys.stderr, flush=True)


# -- digests ----------------------------------------------------------------------------------------------------

def _tensor_digest(arrays: dict) -> str:
    """sha256 over (name, dtype, shape, bytes) of each array, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        if hasattr(a, "detach"):  # torch
            import torch

            t = a.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            dtype, shape = str(t.dtype), tuple(t.shape)
        else:
            arr = np.ascontiguousarray(a)
            raw, dtype, shape = arr.tobytes(), arr.dtype.str, arr.shape
        h.update(f"{name}|{dtype}|{shape}|".encode())
        h.update(raw)
    return h.hexdigest()


def _json_digest(data) -> str:
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canon.encode()).hexdigest()


# -- encoding ---------------------------------------------------------------------------------------------------

def encode(fmt: str, payload, key: str) -> bytes:
    """The bytes of one cache entry (see the module doc)."""
    if fmt == "safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in payload.items()}
        return canonical_safetensors(save(tensors, metadata={"fvtrust.key": key,
                                                             "fvtrust.sha256": _tensor_digest(tensors)}))
    if fmt == "npz":
        arrays = {k: np.asarray(v) for k, v in payload.items()}
        if _META in arrays:
            raise ValueError(f"{_META} is reserved")
        meta = json.dumps({"key": key, "sha256": _tensor_digest(arrays)})
        buf = io.BytesIO()
        np.savez(buf, **arrays, **{_META: np.asarray(meta)})
        return buf.getvalue()
    if fmt == "json":
        data = json.loads(to_json(payload))  # what a reader will see (tuples -> lists, numpy -> numbers)
        return (to_json({"fvtrust_cache": {"key": key, "sha256": _json_digest(data)}, "data": data}) + "\n").encode()
    raise ValueError(f"unknown cache format {fmt!r}; use one of {FORMATS}")


def canonical_safetensors(raw: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order.

    Why: safetensors keeps the metadata in a Rust HashMap, whose order is
    randomized per process, so the same tensors and metadata were written as
    different bytes by different processes (this is what once looked like
    "nondeterministic detector weights" after a resume). Sorting the header
    makes equal content equal bytes. The header stays padded with spaces to a
    multiple of 8 bytes, as safetensors does, so tensor data stays aligned;
    data offsets are relative to the end of the header and do not change.
    """
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return struct.pack("<Q", len(header)) + header + raw[8 + n:]


def safetensors_metadata(raw: bytes) -> dict:
    """The header metadata of safetensors bytes ({} if none; raises BadEntry if the header is damaged)."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        return json.loads(raw[8:8 + n]).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001
        raise BadEntry(f"unreadable header ({type(e).__name__})") from None


class BadEntry(Exception):
    """A cache entry that must not be used; the message says why."""


def decode(fmt: str, raw: bytes, key: str | None):
    """The payload of an entry's bytes; raises BadEntry if damaged or (with `key`) stale."""
    try:
        if fmt == "safetensors":
            from safetensors.torch import load

            if len(raw) < 8:
                raise BadEntry("truncated")
            (n,) = struct.unpack("<Q", raw[:8])
            if n > len(raw) - 8:
                raise BadEntry("truncated header")
            meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
            payload = load(raw)
            found, digest = meta.get("fvtrust.key"), meta.get("fvtrust.sha256")
            ok = digest == _tensor_digest(payload)
        elif fmt == "npz":
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                if _META not in z.files:
                    raise BadEntry("no fvtrust metadata")
                meta = json.loads(str(z[_META]))
                payload = {k: z[k] for k in z.files if k != _META}
            found, digest = meta.get("key"), meta.get("sha256")
            ok = digest == _tensor_digest(payload)
        elif fmt == "json":
            doc = json.loads(raw.decode())
            if not isinstance(doc, dict) or not isinstance(doc.get("fvtrust_cache"), dict) or "data" not in doc:
                raise BadEntry("not an fvtrust cache entry")
            found, digest = doc["fvtrust_cache"].get("key"), doc["fvtrust_cache"].get("sha256")
            payload = doc["data"]
            ok = digest == _json_digest(payload)
        else:
            raise ValueError(f"unknown cache format {fmt!r}")
    except BadEntry:
        raise
    except ValueError as e:
        if "unknown cache format" in str(e):
            raise
        raise BadEntry(f"unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    except Exception as e:  # noqa: BLE001 - any parser failure means a damaged entry
        raise BadEntry(f"unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    if not ok:
        raise BadEntry("checksum mismatch (garbled)")
    if key is not None and found != key:
        raise BadEntry(f"written for other inputs or settings (fingerprint {found} != {key})")
    return payload


def write_entry(path, fmt: str, payload, key: str) -> Path:
    """Write one verified entry atomically (temp name + rename)."""
    path = atomic_write_bytes(path, encode(fmt, payload, key))
    event("cache-write", str(path))
    return path


def read_entry(path, fmt: str, key: str | None):
    """The entry's payload, or None if it is missing, damaged or stale (then it is deleted and reported)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        warn(f"cannot read cache entry {path} ({e.strerror}); recomputing it")
        return None
    try:
        payload = decode(fmt, raw, key)
    except BadEntry as e:
        warn(f"cache entry {path} is {e}; recomputing it")
        event("cache-bad", str(path))
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    event("cache-hit", str(path))
    return payload


# -- locks ------------------------------------------------------------------------------------------------------

def lock_timeout() -> float | None:
    """Seconds a process waits for a busy cache (FVTRUST_LOCK_TIMEOUT; default: as long as it takes)."""
    raw = os.environ.get("FVTRUST_LOCK_TIMEOUT")
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise FvtrustError(f"FVTRUST_LOCK_TIMEOUT must be a number of seconds, got {raw!r}") from None


def sweep_temp_files(directory: Path, recursive: bool = False) -> int:
    """Delete the temp files (``.NAME.*.tmp``) and staging folders a killed writer left in `directory`.

    Only call with the directory's lock held: then no live writer owns them.
    """
    import shutil

    n = 0
    glob = directory.rglob if recursive else directory.glob
    for p in list(glob(".*.tmp")):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    for p in list(glob(".*.staging.*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


@contextlib.contextmanager
def locked(directory, *, wait: bool = True, what: str = "cache", lock_file=None, sweep_recursive: bool = False):
    """Hold the inter-process lock of `directory` (created if needed) for the body.

    `wait=True`: a second process waits (reporting that once, on stderr) up to
    :func:`lock_timeout`; `wait=False`: it fails at once with one line. The
    lock is re-entrant within a process. `lock_file` puts the lock elsewhere
    (e.g. beside an output directory that must not exist yet).
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    if lock_file is None:
        directory.mkdir(parents=True, exist_ok=True)
        lock_file = directory / LOCK_NAME
    lock = FileLock(str(lock_file), is_singleton=True)
    first = not lock.is_locked
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise FvtrustError(f"{what} {directory} is in use by another fvtrust process; wait for it to finish "
                               "or choose another directory") from None
        limit = lock_timeout()
        warn(f"waiting for another fvtrust process to finish with {what} {directory} ...")
        t0 = time.time()
        try:
            lock.acquire(timeout=-1 if limit is None else limit)
        except Timeout:
            raise FvtrustError(f"{what} {directory} stayed in use by another fvtrust process for "
                               f"{time.time() - t0:.0f} s (FVTRUST_LOCK_TIMEOUT); try again later") from None
    try:
        if first and directory.is_dir():
            sweep_temp_files(directory, recursive=sweep_recursive)
        yield directory
    finally:
        lock.release()


# -- output directories ----------------------------------------------------------------------------------------

def lock_root() -> Path:
    """Where output-directory locks live: $FVTRUST_CACHE/locks, else ~/.cache/fvtrust/locks (else the temp dir).

    Central, so that checking a bad --out never creates anything beside it.
    """
    import tempfile

    root = Path(os.environ.get("FVTRUST_CACHE") or Path.home() / ".cache" / "fvtrust") / "locks"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK | os.X_OK):
            return root
    except OSError:
        pass
    root = Path(tempfile.gettempdir()) / f"fvtrust-locks-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    root.mkdir(parents=True, exist_ok=True)
    return root


FILE_OUTPUTS = (".safetensors",)  # `train-default --out` may name the weights file itself


def check_writable_dir(out, what: str = "--out") -> Path:
    """Fail with one line unless `out` is (or can be created as) a writable directory; creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir() and out.suffix not in FILE_OUTPUTS:
        raise FvtrustError(f"{what} {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise FvtrustError(f"cannot create {what} {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(probe) else "permission denied"
        raise FvtrustError(f"{what} {out} is not writable ({probe}: {why})")
    return out


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def output_lock_file(out) -> Path:
    """The lock file of output directory `out` (under :func:`lock_root`, named by its absolute path)."""
    absolute = os.path.abspath(out)
    return lock_root() / f"out-{hashlib.sha256(absolute.encode()).hexdigest()[:24]}.lock"


@contextlib.contextmanager
def output_lock(out, what: str = "output directory"):
    """Hold `out`'s lock for the body or fail at once with one line (two runs must not write one OUT).

    Re-entrant (the CLI and the API function it calls may both take it).
    Under the lock, staging folders and temp files that a killed run left
    beside and inside `out` are swept up.
    """
    out = Path(out)
    absolute = Path(os.path.abspath(out))
    with locked(absolute, wait=False, what=what, lock_file=output_lock_file(out), sweep_recursive=True):
        if absolute.parent.is_dir():
            import shutil

            for p in absolute.parent.glob(f".{absolute.name}.staging.*"):
                shutil.rmtree(p, ignore_errors=True)
        yield out
