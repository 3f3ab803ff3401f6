"""The visualization detector E: Table 3 layout, data generation (cached, resumable), training, reports."""
import json

import pytest
import torch
from click.testing import CliRunner

from fvtrust.errors import FvtrustError
from fvtrust.fool.detector import data as dd
from fvtrust.fool.detector.train import (
    build_detector,
    evaluate_detector,
    load_detector,
    resolve_budget,
    save_detector,
    train_detector,
)
from fvtrust.fool.detector.model import Detector, table3_layout


def test_table3_layout_is_the_paper_at_224_and_adapted_at_28():
    assert [(k, s) for k, s, _ in table3_layout(224)] == [(3, 3), (5, 2), (5, 2), (5, 2), (5, 2), (3, 2)]
    assert [o for _, _, o in table3_layout(224)] == [75, 38, 19, 10, 5, 3]
    assert table3_layout(28) == [(3, 1, 28), (5, 2, 14), (5, 2, 7), (5, 2, 4), (5, 1, 4), (3, 1, 4)]
    det = Detector((3, 224, 224))
    convs = [m for m in det.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and all(c.out_channels == 16 for c in convs)
    assert det.linear.in_features == 16 * 3 * 3
    assert Detector((1, 28, 28))(torch.rand(4, 1, 28, 28)).shape == (4,)


def test_gate_hard_has_no_gradient_soft_has():
    det = Detector((1, 28, 28))
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    hard = det.gate(x, "hard")
    assert set(hard.tolist()) <= {0.0, 1.0} and not hard.requires_grad
    soft = det.gate(x, "soft")
    soft.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        det.linear.bias.fill_(1e4)
    assert det.gate(x).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(FvtrustError, match="gate"):
        det.gate(x, "fuzzy")
    with pytest.raises(FvtrustError, match="shape"):
        det(torch.rand(2, 3, 28, 28))


def test_snapshot_steps_log_spaced():
    s = dd.snapshot_steps(512)
    assert len(s) == 15 and s[0] == 1 and s[-1] == 512 and list(s) == sorted(set(s))
    assert dd.snapshot_steps(4, 15) == (1, 2, 3, 4)
    with pytest.raises(FvtrustError):
        dd.snapshot_steps(0)


def test_units_add_hidden_layers_and_split_by_unit(random_fashion):
    assert dd.hidden_layers(random_fashion, "fc", 200) == ["fc", "block4", "block3"]
    assert dd.hidden_layers(random_fashion, "fc", 5) == ["fc"]
    units = dd.detector_units(random_fashion, "fc", max_units=30, seed=1)
    assert len(units) == 30 and units[:10] == [("fc", u) for u in range(10)]
    assert {lay for lay, _ in units} == {"fc", "block4", "block3"}
    assert len(set(units)) == 30
    train, test = dd.split_units(30, 0.1, seed=0)
    assert len(test) == 3 and not set(train) & set(test) and len(train) + len(test) == 30
    with pytest.raises(FvtrustError):
        dd.detector_units(random_fashion, "fcc")


def _count_visualize(monkeypatch, fail_at=None):
    """Count visualize calls made by the data generator; optionally raise at call number `fail_at`."""
    import importlib

    V = importlib.import_module("fvtrust.visualize")  # the package (fvtrust.visualize is also a function name)

    calls = []
    real = V.visualize

    def wrapped(*a, **kw):
        calls.append(kw.get("seed"))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(V, "visualize", wrapped)
    return calls


def test_generation_is_cached_and_resumes_after_interrupt(random_fashion, tmp_path, monkeypatch):
    units = [("fc", 0), ("fc", 1), ("fc", 2), ("block4", 5), ("block4", 6)]
    kw = {"runs": 2, "steps": 4, "snapshots": 3, "cache_dir": tmp_path, "chunk_runs": 4}
    calls = _count_visualize(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        dd.generate_visualizations(random_fashion, units, **kw)
    (cache,) = list(tmp_path.glob("vis-*"))
    assert sorted(p.name for p in cache.glob("chunk-*")) == ["chunk-00000.safetensors", "chunk-00001.safetensors"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["chunks"] == [[0, 1], [2], [3, 4]]  # one layer per chunk
    monkeypatch.undo()
    calls = _count_visualize(monkeypatch)
    vs = dd.generate_visualizations(random_fashion, units, **kw)
    assert len(calls) == 1  # only the unfinished chunk
    assert len(vs) == 5 * 2 * 3 and vs.images.dtype == torch.uint8
    assert sorted(set(vs.step.tolist())) == [1, 2, 4]
    assert sorted(set(vs.unit.tolist())) == [0, 1, 2, 3, 4] and sorted(set(vs.run.tolist())) == [0, 1]
    again = dd.generate_visualizations(random_fashion, units, **kw)
    assert len(calls) == 1 and torch.equal(again.images, vs.images)
    assert len(vs.select([1, 3])) == 2 * 2 * 3
    # a fresh generation from scratch gives the same images as the resumed one
    monkeypatch.undo()
    fresh = dd.generate_visualizations(random_fashion, units, **dict(kw, cache_dir=tmp_path / "other"))
    assert torch.equal(fresh.images, vs.images)


def test_train_and_evaluate_separable_data():
    g = torch.Generator().manual_seed(0)
    natural = torch.zeros(200, 1, 28, 28)
    natural[:, :, 8:20, 8:20] = torch.rand(200, 1, 12, 12, generator=g) * 0.5 + 0.5  # dark background, bright object
    visual = 0.5 + 0.1 * torch.randn(200, 1, 28, 28, generator=g).clamp(-4, 4)       # grey noise
    det = train_detector(natural[:150], visual[:150], budget=resolve_budget("tiny", epochs=4, natural_per_epoch=150, batch_size=16),
                         seed=0)
    rep = evaluate_detector(det, natural[150:], visual[150:], steps=torch.arange(50) % 2)
    assert rep["natural"] >= 0.9 and rep["visualization"] >= 0.9
    assert set(rep["visualization_by_step"]) == {"0", "1"} and rep["n_natural"] == 50
    with pytest.raises(FvtrustError, match="shape"):
        train_detector(natural, torch.rand(5, 3, 28, 28), budget="tiny")


def test_budget_resolution():
    assert resolve_budget("paper").runs == 35 and resolve_budget("paper").snapshots == 15
    assert resolve_budget("quick", runs=3, epochs=None).runs == 3
    with pytest.raises(FvtrustError, match="budget"):
        resolve_budget("huge")


def test_build_detector_pipeline_cached(random_fashion, tmp_path):
    nat = (torch.rand(64, 1, 28, 28) * 0.2, torch.rand(32, 1, 28, 28) * 0.2)
    det, rep = build_detector(random_fashion, "fc", budget="tiny", cache_dir=tmp_path, natural=nat)
    assert not rep["cached"] and rep["n_units"] == 6 and len(rep["test_units"]) == 1
    assert rep["heldout"]["n_natural"] == 32 and rep["heldout"]["n_visualization"] == 1 * 5  # 1 run x 5 snapshots
    assert rep["train_units"] == 5 and rep["units_per_layer"] == {"fc": 6}
    det2, rep2 = build_detector(random_fashion, "fc", budget="tiny", cache_dir=tmp_path, natural=nat)
    assert rep2["cached"] and rep2["heldout"] == rep["heldout"]
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(det(x), det2(x))


def test_save_load_roundtrip(tmp_path):
    det = Detector((1, 28, 28))
    save_detector(det, tmp_path / "d", {"heldout": {"natural": 1.0}})
    back, rep = load_detector(tmp_path / "d")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(back(x), det(x)) and rep["heldout"]["natural"] == 1.0
    with pytest.raises(FvtrustError, match="detector directory"):
        load_detector(tmp_path / "missing")


def test_detector_cli_bad_layer(tmp_path):
    from fvtrust.cli import main

    r = CliRunner().invoke(main, ["fool", "detector", "fashion-cnn", "--weights", "random", "--layer", "fcc",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "fc" in r.output


def test_harden_mines_the_fooled_models_visualizations(random_fashion, tmp_path):
    from fvtrust.fool.circuit.build import fooling_circuit
    from fvtrust.fool.detector.train import detector_data
    from fvtrust.fool.detector.harden import harden_detector

    nat = (torch.rand(64, 1, 28, 28) * 0.2, torch.rand(32, 1, 28, 28) * 0.2)
    data = detector_data(random_fashion, "fc", budget="tiny", cache_dir=tmp_path, natural=nat)
    det = Detector((1, 28, 28))
    with torch.no_grad():
        det.linear.weight.zero_()
        det.linear.bias.fill_(3.0)  # says "natural" to everything: every live step is a negative
    fooled = fooling_circuit(random_fashion, "fc", det, mapping=1, units=[0, 1], k=100.0)
    before = fooled.detector.linear.bias.clone()
    rep = harden_detector(fooled, data, rounds=1, runs=1, steps=4, natural_per_epoch=64)
    assert [r["gate"] for r in rep["rounds"]] == ["forced 0", "live"]
    assert rep["rounds"][0]["negatives"] == 2 * 1 * 4  # units x runs x snapshots of 4 steps (1, 2, 3, 4)
    assert rep["rounds"][1]["said_natural_fraction"] == 1.0 and rep["rounds"][1]["negatives"] == 2 * 4
    assert not torch.equal(fooled.detector.linear.bias, before) and torch.equal(det.linear.bias, before)
    assert rep["heldout_after"]["n_natural"] == 32
    sources = {1, 2}
    assert all(not (lay == "fc" and u in sources) for lay, u in rep["heldout_units_after"])
