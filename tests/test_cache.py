"""Caches under damage and contention: damaged or foreign entries are recomputed, one writer per directory,
a full disk fails with one line and leaves nothing half-written."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fvtrust import cache
from fvtrust.errors import FvtrustError

PAYLOADS = {
    "safetensors": {"images": torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4), "step": torch.tensor([1, 2])},
    "npz": {"angles": np.linspace(0, 1, 7), "mode": np.asarray("store"), "n": np.asarray(3)},
    "json": {"mean": [0.25, None, float("nan")], "n": 3, "name": "block1"},
}


def _equal(fmt, a, b):
    if fmt == "json":
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _garble(p: Path):
    raw = bytearray(p.read_bytes())
    raw[-20] ^= 0x01  # one bit in the payload, far from any header
    p.write_bytes(bytes(raw))


def _invalid(p: Path):
    p.write_bytes(b"{ not json, not safetensors, not a zip")


def _empty(p: Path):
    p.write_bytes(b"")


@pytest.mark.parametrize("fmt", cache.FORMATS)
def test_round_trip(fmt, tmp_path):
    p = cache.write_entry(tmp_path / f"e.{fmt}", fmt, PAYLOADS[fmt], "k1")
    assert _equal(fmt, cache.read_entry(p, fmt, "k1"), PAYLOADS[fmt])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", [_truncate, _garble, _invalid, _empty], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("fmt", cache.FORMATS)
def test_damaged_entry_is_reported_deleted_and_not_loaded(fmt, damage, tmp_path, capsys):
    p = cache.write_entry(tmp_path / f"e.{fmt}", fmt, PAYLOADS[fmt], "k1")
    damage(p)
    assert cache.read_entry(p, fmt, "k1") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recomputing" in err[0]
    assert not p.exists()


@pytest.mark.parametrize("fmt", cache.FORMATS)
def test_foreign_entry_is_stale(fmt, tmp_path, capsys):
    """Written for another model or settings (another fingerprint), even under the expected name."""
    p = cache.write_entry(tmp_path / f"e.{fmt}", fmt, PAYLOADS[fmt], "other-model")
    assert cache.read_entry(p, fmt, "this-model") is None
    assert "fingerprint" in capsys.readouterr().err


def test_linearity_cache_recomputes_damaged_and_foreign_units(random_fashion, trained_fashion, tmp_path):
    from fvtrust.linearity import path_metrics

    starts = torch.rand(2, 1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=3, cache_dir=tmp_path / "c", transforms="none")
    first = path_metrics(trained_fashion, "block3", [0, 1], starts, **kw)
    files = sorted((tmp_path / "c").glob("unit*.npz"))
    assert len(files) == 2
    again = path_metrics(trained_fashion, "block3", [0, 1], starts, **kw)
    assert again.diagnostics["cached_units"] == [0, 1]
    _truncate(files[0])
    # unit 1's entry replaced by one computed for another model (random weights) under the expected name
    other = path_metrics(random_fashion, "block3", [0, 1], starts, steps=3, cache_dir=tmp_path / "o",
                         transforms="none")
    foreign = sorted((tmp_path / "o").glob("unit1-*.npz"))[0]
    files[1].write_bytes(foreign.read_bytes())
    redo = path_metrics(trained_fashion, "block3", [0, 1], starts, **kw)
    assert redo.diagnostics["cached_units"] == []
    np.testing.assert_array_equal(redo.angles, first.angles)
    np.testing.assert_array_equal(redo.distances, first.distances)
    assert not np.array_equal(other.objective_final, first.objective_final)


def test_detector_chunks_recomputed_when_damaged(trained_fashion, tmp_path):
    from fvtrust.fool.detector.data import generate_visualizations

    units = [("fc", 0), ("fc", 1), ("block3", 0)]
    a = generate_visualizations(trained_fashion, units, runs=1, steps=2, snapshots=2, cache_dir=tmp_path)
    chunks = sorted(a.cache_dir.glob("chunk-*.safetensors"))
    assert len(chunks) == 2  # one per layer
    _garble(chunks[1])
    b = generate_visualizations(trained_fashion, units, runs=1, steps=2, snapshots=2, cache_dir=tmp_path)
    assert torch.equal(a.images, b.images) and torch.equal(a.step, b.step)


def test_pipeline_step_result_damaged_or_from_other_settings_reruns(tmp_path):
    from fvtrust.report.pipeline import Context, Step, run_pipeline

    calls = []

    def step(ctx, sdir):
        calls.append(ctx.mode == "quick")
        return {"value": 1}

    steps = [Step("s", "a step", step)]
    run_pipeline(steps, Context(out=tmp_path, mode="quick"))
    run_pipeline(steps, Context(out=tmp_path, mode="quick"))
    assert calls == [True]  # cached
    run_pipeline(steps, Context(out=tmp_path, mode="full"))
    assert calls == [True, False]  # another mode: not the cached result
    (tmp_path / "steps" / "s" / "result.json").write_text('{"status": "ok", "val')
    res = run_pipeline(steps, Context(out=tmp_path, mode="full"))
    assert calls == [True, False, False] and res["s"]["value"] == 1


# -- locks ------------------------------------------------------------------------------------------------------

def _hold(target: Path, kind: str, seconds: float) -> subprocess.Popen:
    """Another process that holds `target`'s lock (cache dir or output dir) until it ends or is killed.

    It takes the very lock file fvtrust uses, with filelock alone (no torch import: quick to start).
    """
    if kind == "cache":
        target.mkdir(parents=True, exist_ok=True)
        lock_file = target / cache.LOCK_NAME
    else:
        lock_file = cache.output_lock_file(target)
    code = (f"import time; from filelock import FileLock\n"
            f"with FileLock({str(lock_file)!r}):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_fails_with_one_line_or_waits(tmp_path, monkeypatch, capsys):
    d = tmp_path / "c"
    holder = _hold(d, "cache", 60)
    try:
        with pytest.raises(FvtrustError, match="in use by another fvtrust process"):
            with cache.locked(d, wait=False):
                pass
        monkeypatch.setenv("FVTRUST_LOCK_TIMEOUT", "0.3")
        with pytest.raises(FvtrustError, match="stayed in use"):
            with cache.locked(d):
                pass
        assert "waiting for another fvtrust process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setenv("FVTRUST_LOCK_TIMEOUT", "30")
    with cache.locked(d):  # free again: the dead holder's lock is gone with it
        pass


def test_waiting_process_gets_the_lock_when_the_holder_finishes(tmp_path):
    d = tmp_path / "c"
    holder = _hold(d, "cache", 1.0)
    t0 = time.time()
    with cache.locked(d):
        waited = time.time() - t0
    holder.wait()
    assert waited > 0.2


def test_cli_refuses_an_out_another_run_is_writing(tmp_path, monkeypatch):
    from fvtrust.cli import main

    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path / "fc"))
    out = tmp_path / "out"
    holder = _hold(out, "out", 60)
    try:
        r = CliRunner().invoke(main, ["theory", "--samples", "2", "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another fvtrust process" in lines[0]
    assert not out.exists()


def test_stale_temp_files_and_staging_folders_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path / "fc"))
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / ".x.json.abc.tmp").write_text("half")
    (tmp_path / ".out.staging.123").mkdir()
    with cache.output_lock(out):
        pass
    assert not (out / "sub" / ".x.json.abc.tmp").exists()
    assert not (tmp_path / ".out.staging.123").exists()


# -- full disk --------------------------------------------------------------------------------------------------

def _assert_one_line_nothing_half_written(r, parent: Path, out: Path):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fvtrust: error: ") and "space" in lines[0].lower(), r.stderr
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if ".staging." in p.name or p.name.endswith(".tmp")] == []


def test_full_disk_by_patched_write(tmp_path, monkeypatch):
    """Every write gets half its bytes onto disk, then ENOSPC (what a full disk does)."""
    from fvtrust.cli import main

    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path / "fc"))
    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["visualize", "fashion-cnn", "fc", "--units", "0,1", "--steps", "2", "--out",
                                  str(out)])
    monkeypatch.setattr(Path, "write_bytes", real)
    _assert_one_line_nothing_half_written(r, tmp_path, out)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_on_a_tiny_tmpfs(tmp_path, monkeypatch):
    from fvtrust.cli import main

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path / "fc"))
        out = mnt / "out"
        r = CliRunner().invoke(main, ["visualize", "fashion-cnn", "fc", "--units", "all", "--steps", "2", "--out",
                                      str(out)])
        _assert_one_line_nothing_half_written(r, mnt, out)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_safetensors_entries_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders its metadata at random per process; fvtrust's entries must not depend on that."""
    import subprocess
    import sys

    code = ("import sys, torch; from fvtrust.cache import encode; "
            "sys.stdout.buffer.write(encode('safetensors', {'b': torch.arange(3.), 'a': torch.ones(2, 2)}, 'k'))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout for _ in range(4)}
    assert len(outs) == 1
    from safetensors.torch import load

    from fvtrust.cache import canonical_safetensors, decode, safetensors_metadata

    raw = outs.pop()
    assert decode("safetensors", raw, "k")["b"].tolist() == [0.0, 1.0, 2.0]
    assert safetensors_metadata(raw) == {"fvtrust.key": "k", "fvtrust.sha256": safetensors_metadata(raw)["fvtrust.sha256"]}
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0 and canonical_safetensors(raw) == raw
    assert torch.equal(load(raw)["a"], torch.ones(2, 2))
