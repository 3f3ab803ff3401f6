"""The audit's resumable cache: per-chunk entries, reused on rerun, verified, chunk-size invariant."""
from __future__ import annotations

import math

import pytest
import torch

from fvtrust.audit.core import audit

ARGS = dict(units="0-6", steps=6, top_k=4, path_starts=2, path_points=4, natural_limit=200)


def _signals(res):
    return [(u["unit"], u["score"], u["signals"]) for u in res.units]


def test_rerun_reads_every_chunk_and_recomputes_nothing(tmp_path, monkeypatch):
    from fvtrust.audit import core

    first = audit("fashion-cnn", "block3", cache_dir=tmp_path, chunk_units=3, **ARGS)
    entries = sorted(p.name for p in tmp_path.glob("audit-*.safetensors"))
    assert len(entries) == 1 + 2 * 3  # the ranking + chunks of 3, 3, 1 units, each in two stages
    monkeypatch.setattr(core, "_probe_chunk", lambda *a: pytest.fail("a finished chunk was recomputed"))
    monkeypatch.setattr(core, "_signal_chunk", lambda *a: pytest.fail("a finished chunk was recomputed"))
    again = audit("fashion-cnn", "block3", cache_dir=tmp_path, chunk_units=3, **ARGS)
    assert again.units == first.units
    assert torch.equal(again.visualizations, first.visualizations)
    assert again.seconds["visualize"] == 0.0


def test_damaged_chunk_is_recomputed(tmp_path, capsys):
    first = audit("fashion-cnn", "block3", cache_dir=tmp_path, chunk_units=3, **ARGS)
    chunk = sorted(tmp_path.glob("audit-*-signals-00001-*.safetensors"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[-5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    again = audit("fashion-cnn", "block3", cache_dir=tmp_path, chunk_units=3, **ARGS)
    assert "recomputing it" in capsys.readouterr().err
    assert again.units == first.units
    # other settings never reuse these entries
    other = audit("fashion-cnn", "block3", cache_dir=tmp_path, chunk_units=3, **{**ARGS, "seed": 1})
    assert len(list(tmp_path.glob("audit-*-rank.safetensors"))) == 2
    assert other.units != first.units


def test_result_does_not_depend_on_chunking():
    """Units are visualized batch-invariantly: whole-batch and chunked audits agree (to float rounding:
    a 1-unit chunk ran a different conv kernel and moved one pixel by 1 ulp here)."""
    whole = audit("fashion-cnn", "block3", chunk_units=32, **ARGS)
    parts = audit("fashion-cnn", "block3", chunk_units=2, **ARGS)
    assert (whole.visualizations - parts.visualizations).abs().max() < 1e-5
    for (u, s, a), (v, t, b) in zip(_signals(whole), _signals(parts)):
        assert u == v and math.isclose(s, t, abs_tol=1e-4)
        for k in a:
            if isinstance(a[k], float):
                assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5), (u, k)
