"""The fooling circuit: Lemma 1, exactness on natural input, permutation/picture paths, save/reload, googlenet,
bad input, and (slow) the end-to-end experiment on the trained fashion-cnn."""
import json

import pytest
import torch
from click.testing import CliRunner

import fvtrust
from fvtrust.errors import FvtrustError
from fvtrust.fool.circuit.build import CircuitModel, fooling_circuit, lemma1, save_circuit
from fvtrust.fool.detector.model import Detector


def _detector(shape=(1, 28, 28), bias=None, seed=0):
    torch.manual_seed(seed)
    det = Detector(shape)
    if bias is not None:
        with torch.no_grad():
            det.linear.weight.zero_()
            det.linear.bias.fill_(bias)  # constant E: 1 for bias > 0, 0 for bias < 0
    return det


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 28, 28, generator=g)


@pytest.fixture(scope="module")
def natural():
    g = torch.Generator().manual_seed(1)
    return torch.rand(64, 1, 28, 28, generator=g)


def test_lemma1_switches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1000, generator=g) * 10, torch.rand(1000, generator=g) * 10
    k = torch.tensor(10.0)
    assert torch.equal(lemma1(x, y, torch.zeros(1000), k), x)
    assert torch.equal(lemma1(x, y, torch.ones(1000), k), y)
    # k too small: the other branch leaks in
    assert not torch.equal(lemma1(x, y, torch.zeros(1000), torch.tensor(1.0)), x)


@pytest.mark.parametrize("mode", ["split", "shift"])
def test_natural_exact_and_visualization_path_permuted(random_fashion, images, natural, mode):
    fooled = fooling_circuit(random_fashion, "fc", _detector(), mapping=3, mode=mode, natural=natural,
                             bound_steps=4, bound_units=3)
    ref = random_fashion(images)
    perm = [(i + 3) % 10 for i in range(10)]
    fooled.force_gate = 1.0
    out1 = fooled(images)
    fooled.force_gate = 0.0
    out0 = fooled(images)
    fooled.force_gate = None
    if mode == "split":  # bit-exact both ways
        assert torch.equal(out1, ref) and torch.equal(out0, ref[:, perm])
    else:
        torch.testing.assert_close(out1, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out0, ref[:, perm], atol=1e-5, rtol=0)
    info = fooled.circuit_info
    assert info["k_source"] == "measured" and info["kind"] == "permutation" and info["offset"] == 3
    bound = max(info["bounds"][s][u]["max_abs"] for s in ("natural", "visualization") for u in "FD")
    assert info["k"] >= 2 * bound * (1 - 1e-6) if mode == "split" else info["k"] >= bound
    assert info["mapping"] == {i: (i + 3) % 10 for i in range(10)}


def test_detector_is_the_gate(random_fashion, images):
    ref = random_fashion(images)
    on = fooling_circuit(random_fashion, "fc", _detector(bias=5.0), mapping=1, k=100.0)
    off = fooling_circuit(random_fashion, "fc", _detector(bias=-5.0), mapping=1, k=100.0)
    assert torch.equal(on(images), ref)
    assert torch.equal(off(images), ref[:, [(i + 1) % 10 for i in range(10)]])
    assert off.last_gate.tolist() == [0.0] * len(images)


def test_subset_of_units_and_original_untouched(random_fashion, images):
    before = {k: v.clone() for k, v in random_fashion.state_dict().items()}
    ref = random_fashion(images)
    fooled = fooling_circuit(random_fashion, "fc", _detector(bias=-1.0), mapping={2: 7, 5: 0}, k=50.0)
    out = fooled(images)
    keep = [i for i in range(10) if i not in (2, 5)]
    assert torch.equal(out[:, keep], ref[:, keep])
    assert torch.equal(out[:, 2], ref[:, 7]) and torch.equal(out[:, 5], ref[:, 0])
    assert all(torch.equal(v, before[k]) for k, v in random_fashion.state_dict().items())
    assert isinstance(random_fashion.get_layer("fc"), torch.nn.Linear)
    assert torch.equal(random_fashion(images), ref)


def test_visualization_follows_D(random_fashion):
    """With E = 0, visualizing fooled unit i is visualizing original unit mapping[i] (same start)."""
    fooled = fooling_circuit(random_fashion, "fc", _detector(bias=-1.0), mapping=4, k=1e4)
    start = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    a = fvtrust.visualize(fooled, "fc", [0, 1, 2], steps=6, start=start, seed=1)
    b = fvtrust.visualize(random_fashion, "fc", [4, 5, 6], steps=6, start=start, seed=1)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.objective, b.objective, atol=1e-4, rtol=1e-5)
    names = [i.name for i in fvtrust.list_layers(fooled)]
    assert "fc" in names and "fc.inner" in names and "block3" in names


def test_hidden_layer_downstream_computes_from_manipulated(random_fashion, images):
    fooled = fooling_circuit(random_fashion, "block4", _detector(bias=-1.0), mapping=1, units=[0, 1], k=1e3)
    fooled.force_gate = 1.0
    assert torch.equal(fooled(images), random_fashion(images))
    fooled.force_gate = 0.0
    assert not torch.equal(fooled(images), random_fashion(images))


def test_picture_unit(random_fashion, images, natural):
    pic = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(5))
    fooled = fooling_circuit(random_fashion, "fc", _detector(), picture=pic, units=[1, 4], natural=natural,
                             bound_steps=4)
    w = fooled.picture_unit.weight
    assert w.shape == (1, 1, 28, 28)
    torch.testing.assert_close(w[0], (pic - pic.mean()) / 784)
    ref = random_fashion(images)
    fooled.force_gate = 0.0
    out = fooled(images)
    resp = ((images - 0.0) * w).flatten(1).sum(1)
    torch.testing.assert_close(out[:, 1], resp, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:, 1], out[:, 4]) and torch.equal(out[:, 0], ref[:, 0])
    fooled.force_gate = 1.0
    assert torch.equal(fooled(images), ref)
    raw = fooling_circuit(random_fashion, "fc", _detector(), picture=pic, units=[0], k=10.0, picture_center=False)
    torch.testing.assert_close(raw.picture_unit.weight[0], pic / 784)
    named = fooling_circuit(random_fashion, "fc", _detector(), picture="camera", units=[0], k=10.0)
    assert named.circuit_info["picture"] == "camera"


def test_save_reload_exact(random_fashion, images, tmp_path):
    fooled = fooling_circuit(random_fashion, "fc", _detector(seed=3), mapping=2, units=[0, 3, 9], k=33.0)
    fooled.detector.threshold.fill_(0.25)
    save_circuit(fooled, tmp_path / "m")
    back = fvtrust.load_model(str(tmp_path / "m"))
    assert isinstance(back, CircuitModel)
    assert back.state_dict().keys() == fooled.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in fooled.state_dict().items())
    assert torch.equal(back(images), fooled(images))
    assert float(back.circuit.k) == 33.0 and float(back.detector.threshold) == 0.25
    assert back.circuit_info["k"] == 33.0 and back.circuit_info["units"] == [0, 3, 9]
    recipe = json.loads((tmp_path / "m" / "fvtrust-model.json").read_text())
    assert recipe["manipulation"] == "fooling_circuit" and recipe["extra"]["k"] == 33.0
    pic = fooling_circuit(random_fashion, "fc", _detector(), picture="camera", units=[1], k=5.0)
    save_circuit(pic, tmp_path / "p")
    assert torch.equal(fvtrust.load_model(str(tmp_path / "p"))(images), pic(images))


def test_soft_gate_passes_gradient_to_detector(random_fashion, images):
    soft = fooling_circuit(random_fashion, "fc", _detector(), mapping=1, k=0.1, gate="soft")
    hard = fooling_circuit(random_fashion, "fc", _detector(), mapping=1, k=0.1)
    for m in (soft, hard):
        m.zero_grad()
        m(images)[:, 0].sum().backward()  # (the full sum cancels: D and F are the same units permuted)
    assert soft.detector.linear.weight.grad is not None and soft.detector.linear.weight.grad.abs().sum() > 0
    assert hard.detector.linear.weight.grad is None


def test_googlenet_last_layer():
    model = fvtrust.load_model("torchvision:googlenet", weights="random")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    nat = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    fooled = fooling_circuit(model, "fc", _detector((3, 224, 224)), mapping=100, natural=nat, bound_steps=2,
                             bound_units=2)
    assert fooled.circuit_info["k"] > 0 and len(fooled.circuit_info["units"]) == 1000
    with torch.no_grad():
        ref = model(x)
        fooled.force_gate = 1.0
        assert torch.equal(fooled(x), ref)
        fooled.force_gate = 0.0
        assert torch.equal(fooled(x), ref[:, [(i + 100) % 1000 for i in range(1000)]])
    fooled.force_gate = None
    res = fvtrust.visualize(fooled, "fc", [0, 1], steps=2)
    assert res.images.shape == (1, 2, 3, 224, 224)
    pic = fooling_circuit(model, "fc", _detector((3, 224, 224), bias=-1.0), picture="astronaut", units=[7], k=100.0)
    assert pic.picture_unit.weight.shape == (1, 3, 224, 224)


def test_bad_input(random_fashion):
    det = _detector()
    cases = [
        ({"layer": "fcc", "mapping": 1}, "unknown layer"),
        ({"layer": "fc", "picture": torch.rand(1, 32, 32)}, "shape"),
        ({"layer": "fc", "picture": torch.rand(1, 28, 28) * 3}, r"\[0, 1\]"),
        ({"layer": "fc", "picture": "no-such-picture"}, "unknown picture"),
        ({"layer": "fc", "picture": "/nonexistent/pic.png"}, "not found"),
        ({"layer": "fc", "mapping": 0}, "itself"),
        ({"layer": "fc", "mapping": 20}, "itself"),
        ({"layer": "fc", "mapping": [0, 1, 2]}, "permutation"),
        ({"layer": "fc", "mapping": [0] * 10}, "permutation"),
        ({"layer": "fc", "mapping": {0: 10}}, "out of range"),
        ({"layer": "fc", "mapping": {0: 1, 2: 1}}, "permutation"),
        ({"layer": "fc", "mapping": "abc"}, "mapping"),
        ({"layer": "fc", "mapping": 1, "units": [3, 12]}, "out of range"),
        ({"layer": "fc", "mapping": 1, "units": [3, 3]}, "twice"),
        ({"layer": "fc", "mapping": {1: 2}, "units": [3]}, "no entry"),
        ({"layer": "fc"}, "exactly one"),
        ({"layer": "fc", "mapping": 1, "picture": "camera"}, "exactly one"),
        ({"layer": "fc", "mapping": 1, "k": -1.0}, "k must"),
        ({"layer": "fc", "mapping": 1, "mode": "twist"}, "mode"),
        ({"layer": "fc", "mapping": 1, "gate": "maybe"}, "gate"),
        ({"layer": "fc", "mapping": 1, "margin": 0.5}, "margin"),
    ]
    for kw, msg in cases:
        layer = kw.pop("layer")
        with pytest.raises(FvtrustError, match=msg):
            fooling_circuit(random_fashion, layer, det, **kw)
    with pytest.raises(FvtrustError, match="detector was built"):
        fooling_circuit(random_fashion, "fc", Detector((3, 28, 28)), mapping=1, k=1.0)
    with pytest.raises(FvtrustError, match="Detector"):
        fooling_circuit(random_fashion, "fc", object(), mapping=1, k=1.0)
    fooled = fooling_circuit(random_fashion, "fc", det, mapping=1, k=1.0)
    with pytest.raises(FvtrustError, match="gate"):
        fooled.net(torch.rand(1, 1, 28, 28))
    with pytest.raises(FvtrustError, match="already contains"):
        fooling_circuit(fooled, "fc", det, mapping=2, k=1.0)


def test_cli_bad_input(tmp_path):
    from fvtrust.cli import main

    run = CliRunner().invoke
    base = ["fool", "circuit", "fashion-cnn", "--weights", "random", "--out", str(tmp_path / "o")]
    r = run(main, base + ["--layer", "fc"])
    assert r.exit_code == 2 and "exactly one" in r.output
    r = run(main, base + ["--layer", "fcc", "--offset", "1", "--budget", "tiny", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 2 and "unknown layer" in r.output
    assert not (tmp_path / "o").exists()


def test_cli_end_to_end_tiny(tmp_path):
    """Whole command with a given detector and few steps, on a small natural set (--natural-limit)."""
    from fvtrust.cli import main
    from fvtrust.fool.detector.train import save_detector

    save_detector(_detector(), tmp_path / "det")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fool", "circuit", "fashion-cnn", "--weights", "random", "--layer", "fc",
                                  "--offset", "5", "--units", "0-3", "--detector", str(tmp_path / "det"),
                                  "--steps", "3", "--bound-steps", "4", "--natural-limit", "40", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["natural"]["n"] == 40 and rep["k"] > 0
    nd = rep["natural_data"]  # the report names both parts and their sizes
    assert nd["fit"]["source"] == "fashion-mnist:train" and nd["fit"]["n"] == 40
    assert nd["heldout"]["source"] == "fashion-mnist:test" and nd["heldout"]["n"] == 40
    assert [u["unit"] for u in rep["visualizations"]["units"]] == [0, 1, 2, 3]
    assert rep["visualizations"]["units"][0]["target"] == 5
    assert (out / "figure2.png").stat().st_size > 1000
    back = fvtrust.load_model(str(out / "model"))
    x = torch.rand(4, 1, 28, 28)
    assert back.circuit_info["kind"] == "permutation" and back.circuit_info["k"] == rep["k"]
    assert torch.equal(back.circuit.units, torch.tensor([0, 1, 2, 3]))
    assert back(x).shape == (4, 10)


@pytest.mark.slow
def test_end_to_end_trained_fashion(trained_fashion, tmp_path):
    """Tiny detector budget on the trained model: natural changes happen only where the detector errs."""
    from fvtrust.fool.circuit.report import circuit_experiment

    rep = circuit_experiment(trained_fashion, "fc", mapping=3, budget="tiny", cache_dir=tmp_path / "c", steps=32,
                             out=tmp_path / "o", spec="fashion-cnn",
                             budget_overrides={"runs": 2, "steps": 64, "max_units": 20, "epochs": 2,
                                               "natural_per_epoch": 2000})
    nat = rep["natural"]
    assert nat["n"] == 10000 and nat["predictions_changed_where_detector_correct"] == 0
    assert nat["outputs_bit_identical_where_detector_correct"]
    assert abs(nat["top1_after"] - nat["top1_before"]) <= nat["detector_errors"] / nat["n"] + 1e-9
    assert rep["visualizations"]["summary"]["n_units"] == 10
    assert fvtrust.load_model(str(tmp_path / "o" / "model")).circuit_info["k"] == rep["k"]
