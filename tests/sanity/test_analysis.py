"""The sanity-check analysis (§3, App. C.3): conditions against a brute-force scipy
reference, sub-sampling order and counts, misclassified exclusion, normalization,
smoothing, layer discovery, spilling, resuming, inputs, CLI."""

import json
import warnings

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from click.testing import CliRunner
from torch import nn

from fvtrust.errors import FvtrustError
from fvtrust.models.wrappers import FvModel
from fvtrust.sanity import analysis as A
from fvtrust.sanity.activations import discover_layers
from fvtrust.sanity.inputs import load_visualizations, quantize

TOL = 1e-6


# ------------------------------------------------------------------ tiny model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(27, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def tiny_pool(n=600):
    g = torch.Generator().manual_seed(1)
    pool = torch.rand(n, 1, 6, 6, generator=g)
    return pool ** (torch.rand(n, 1, 1, 1, generator=g) * 3 + 0.3)  # varied contrast


def tiny_model():
    torch.manual_seed(0)
    m = FvModel(Tiny(), mean=(0.0,), std=(1.0,), input_shape=(1, 6, 6), spec="tiny", num_classes=3,
                class_names=["a", "b", "c"])
    with torch.no_grad():  # centre the logits so that all three classes get predicted
        m.net.fc.bias -= m(tiny_pool()).mean(0)
    return m


def tiny_data(model, per_class=6, n_wrong=(1, 0, 2)):
    """Natural images labelled so that each class has `per_class` images the model gets right,
    plus n_wrong[c] labelled c that it gets wrong, interleaved (dataset order matters)."""
    g = torch.Generator().manual_seed(2)
    pool = tiny_pool()
    with torch.no_grad():
        pred = model(pool).argmax(1)
    xs, ys, wrong = [], [], []
    for c in range(3):
        right = pool[pred == c][:per_class]
        bad = pool[pred != c][c * 3:c * 3 + n_wrong[c]]
        assert len(right) == per_class and len(bad) == n_wrong[c]
        imgs = [(img, False) for img in right]
        for k, b in enumerate(bad):
            imgs.insert(2 * k + 1, (b, True))
        for img, is_wrong in imgs:
            xs.append(img)
            ys.append(c)
            wrong.append(is_wrong)
    # interleave classes so "first N of each class" is exercised
    order = torch.randperm(len(xs), generator=g)
    x = torch.stack(xs)[order]
    y = torch.tensor(ys)[order]
    w = torch.tensor(wrong)[order]
    return x, y, w


def tiny_vis(n_per=3, seed=2):
    return torch.rand(3, n_per, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def activations(model, images, name):
    out = {}
    h = dict(model.net.named_modules())[name].register_forward_hook(lambda m, i, o: out.setdefault("v", o.clone()))
    with torch.no_grad():
        model(images)
    h.remove()
    return out["v"].flatten(1).double().numpy()


def ref_metric(metric, a, b):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if metric == "spearman":
            return scipy.stats.spearmanr(a, b).statistic
        if metric == "pearson":
            return scipy.stats.pearsonr(a, b).statistic
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return np.nan if na == 0 or nb == 0 else float(a @ b / (na * nb))


def brute_force(model, x, y, vis, classes, per_nat, layer, metric, strides):
    """Independent reference: Python loops over pairs in the documented order, scipy per pair."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    nat = []
    for c in classes:
        idx = [i for i in range(len(y)) if y[i] == c][:per_nat]
        nat.append([i for i in idx if pred[i] == c])
    act = activations(model, x, layer)
    vact = activations(model, vis.flatten(0, 1), layer).reshape(len(classes), vis.shape[1], -1)
    lists = {c: [] for c in A.CONDITIONS}
    for k in range(len(classes)):
        for a in range(len(nat[k])):
            for b in range(a + 1, len(nat[k])):
                lists["same_class"].append((act[nat[k][a]], act[nat[k][b]]))
    for k in range(len(classes)):
        for k2 in range(k + 1, len(classes)):
            for i in nat[k]:
                for j in nat[k2]:
                    lists["different_class"].append((act[i], act[j]))
    for k in range(len(classes)):
        for i in nat[k]:
            for v in range(vis.shape[1]):
                lists["natural_vs_visualization"].append((act[i], vact[k, v]))
    out = {}
    for c, pairs in lists.items():
        kept = pairs[::strides[c]]
        vals = np.array([ref_metric(metric, a, b) for a, b in kept])
        ok = vals[~np.isnan(vals)]
        out[c] = {"mean": ok.mean(), "std": ok.std(), "n_pairs": len(kept), "n_undefined": int(np.isnan(vals).sum())}
    return out


def assert_close(a, b, path="result", tol=1e-12):
    """Nested dicts/lists equal, floats up to ``tol`` (block-wise and tiled products round differently)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}", tol)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_close(u, v, f"{path}[{i}]", tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol, path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def tiny():
    m = tiny_model()
    x, y, wrong = tiny_data(m)
    return m, x, y, wrong, tiny_vis()


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("stride", ["all", (2, 3, 4)])
def test_conditions_match_scipy_brute_force(tiny, stride, path, monkeypatch):
    m, x, y, _, vis = tiny
    if path == "sparse":  # pairs gathered by the engine instead of one full similarity matrix
        monkeypatch.setattr(A, "DENSE_ROWS", 0)
    res = A.run(m, (x, y), vis, classes=[0, 1, 2], per_class_natural=6, pair_stride=stride, dtype="float64")
    names = [lay["name"] for lay in res["layers"]]
    assert names == ["conv", "relu", "pool", "fc"]  # flatten repeats pool: merged
    strides = A.resolve_strides(stride, ["spearman"])["spearman"]
    for metric in ("spearman", "pearson", "cosine"):
        if stride != "all" and metric != "spearman":
            continue
        s = A.resolve_strides(stride, [metric])[metric]
        for li, layer in enumerate(names):
            want = brute_force(m, x, y, vis, [0, 1, 2], 6, layer, metric, s)
            got = res["metrics"][metric]["conditions"]
            for c in A.CONDITIONS:
                assert got[c]["n_pairs"][li] == want[c]["n_pairs"], (metric, layer, c)
                assert got[c]["n_undefined"][li] == want[c]["n_undefined"]
                assert abs(got[c]["mean"][li] - want[c]["mean"]) < TOL, (metric, layer, c)
                assert abs(got[c]["std"][li] - want[c]["std"]) < TOL, (metric, layer, c)
    assert strides == ({"same_class": 1, "different_class": 1, "natural_vs_visualization": 1} if stride == "all"
                       else {"same_class": 2, "different_class": 3, "natural_vs_visualization": 4})


def test_float32_default_close_to_float64(tiny):
    m, x, y, _, vis = tiny
    r32 = A.run(m, (x, y), vis, per_class_natural=6, metrics=["spearman"], pair_stride="all")
    r64 = A.run(m, (x, y), vis, per_class_natural=6, metrics=["spearman"], pair_stride="all", dtype="float64")
    a = np.array(r32["metrics"]["spearman"]["conditions"]["natural_vs_visualization"]["mean"])
    b = np.array(r64["metrics"]["spearman"]["conditions"]["natural_vs_visualization"]["mean"])
    assert np.abs(a - b).max() < 1e-6


def test_misclassified_natural_images_are_excluded(tiny):
    m, x, y, wrong, vis = tiny
    res = A.run(m, (x, y), vis, per_class_natural=6, metrics=["cosine"], pair_stride="all")
    nat = res["natural"]
    assert nat["selected_per_class"] == [6, 6, 6]
    # first 6 labelled images per class, minus the wrong ones among them
    want_excluded, counts = [], []
    for c in range(3):
        idx = (y == c).nonzero().squeeze(1)[:6]
        want_excluded += [int(i) for i in idx if wrong[i]]
        counts.append(int((~wrong[idx]).sum()))
    assert sorted(nat["excluded_indices"]) == sorted(want_excluded)
    assert nat["correct_per_class"] == counts
    assert len(want_excluded) > 0
    n_same = sum(k * (k - 1) // 2 for k in counts)
    assert res["metrics"]["cosine"]["conditions"]["same_class"]["n_pairs"][0] == n_same


def test_stride_counts_and_order():
    paper = A.resolve_strides("paper", ["spearman", "cosine"])
    assert paper["spearman"] == {"same_class": 10, "different_class": 100, "natural_vs_visualization": 5}
    assert paper["cosine"] == {"same_class": 1, "different_class": 1, "natural_vs_visualization": 1}
    counts = A.count_pairs([50] * 10, [10] * 10, paper["spearman"])
    assert counts == {"same_class": 1225, "different_class": 1125, "natural_vs_visualization": 1000}
    assert A.count_pairs([50] * 10, [10] * 10, paper["cosine"]) == {
        "same_class": 12250, "different_class": 112500, "natural_vs_visualization": 5000}
    # the stride counts across class blocks: [3, 4] natural -> 3 + 6 same-class pairs, every 2nd -> 5
    pairs = A.enumerate_pairs([3, 4], [2, 2], {"same_class": 2, "different_class": 5, "natural_vs_visualization": 3})
    same = [(blk[2], tuple(p)) for blk in pairs["same_class"] for p in blk[3].tolist()]
    assert same == [(0, (0, 1)), (0, (1, 2)), (1, (0, 2)), (1, (1, 2)), (1, (2, 3))]
    diff = [tuple(p) for blk in pairs["different_class"] for p in blk[3].tolist()]
    assert diff == [(0, 0), (1, 1), (2, 2)]  # 3 x 4 rows, every 5th of row-major order
    natvis = [(blk[2], tuple(p)) for blk in pairs["natural_vs_visualization"] for p in blk[3].tolist()]
    # 6 + 8 pairs, every 3rd: global positions 0, 3 | 6, 9, 12 -> class 1 local 0, 3, 6
    assert natvis == [(0, (0, 0)), (0, (1, 1)), (1, (0, 0)), (1, (1, 1)), (1, (3, 0))]


def test_normalize_and_drop_rule():
    same = [1.0, 0.5, 0.01, 0.304, np.nan, 0.2]
    diff = [0.0, 0.1, 0.0, 0.295, 0.1, 0.3]
    natvis = [0.5, 0.3, 0.01, 0.3, 0.2, 0.25]
    vals, kept = A.normalize(same, diff, natvis)
    # gap of exactly 0.01 is kept (only strictly smaller is dropped), 0.009 dropped, NaN dropped, negative gap kept
    assert kept.tolist() == [True, True, True, False, False, True]
    assert vals[0] == pytest.approx(0.5) and vals[1] == pytest.approx(0.5) and vals[2] == pytest.approx(1.0)
    assert vals[5] == pytest.approx(0.5)
    curve = A.normalized_curve(same, diff, natvis, list("abcdef"))
    assert curve["layers"] == ["a", "b", "c", "f"] and curve["dropped"] == ["d", "e"]


def test_smoothing_is_the_papers_convolve():
    x = np.random.default_rng(0).normal(size=23)
    np.testing.assert_allclose(A.smooth(x), scipy.ndimage.convolve(x, np.ones(7) / 7), rtol=0, atol=1e-15)
    np.testing.assert_allclose(A.smooth(x), scipy.ndimage.convolve(x, np.ones(7) / 7, mode="reflect"), atol=1e-15)
    # band: std over a moving window of 5 with the same (reflect = numpy "symmetric") padding
    padded = np.pad(x, 2, mode="symmetric")
    want = np.array([padded[i:i + 5].std() for i in range(len(x))])
    np.testing.assert_allclose(A.moving_std(x), want, atol=1e-12)
    curve = A.normalized_curve(np.ones(23), np.zeros(23), x, [str(i) for i in range(23)])
    np.testing.assert_allclose(curve["smoothed"], A.smooth(x))


def test_random_classes_reproduce_the_paper():
    assert A.random_classes(1000, 10, 42) == [20, 71, 102, 106, 121, 270, 435, 614, 700, 860]
    assert A.random_classes(10, 10, 42) == list(range(10))  # replacement would repeat: without replacement
    assert len(set(A.random_classes(10, 4, 42))) == 4
    with pytest.raises(FvtrustError, match="cannot draw 11"):
        A.random_classes(10, 11)


def test_layer_discovery(random_fashion):
    probe = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    layers = discover_layers(random_fashion, probe)
    names = [lay.name for lay in layers]
    assert names[:4] == ["block1.conv", "block1.bn", "block1.relu", "pool1"]  # execution order
    by = {lay.name: lay for lay in layers}
    assert by["block1.relu"].aliases == ["block1"]
    assert by["gap"].aliases == ["flatten", "dropout"]
    assert names[-1] == "fc" and "block1" not in names
    explicit = discover_layers(random_fashion, probe, ["fc", "block1", "block1.relu"])
    assert [lay.name for lay in explicit] == ["block1.relu", "block1", "fc"]  # forward order, no merging
    with pytest.raises(FvtrustError, match="unknown layer 'blok1'.*block1"):
        discover_layers(random_fashion, probe, ["blok1"])


def test_reused_module_gives_one_layer_per_call():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.b(self.act(self.a(self.act(x.flatten(1)))))

    m = FvModel(Reuse(), mean=(0.0,), std=(1.0,), input_shape=(1, 2, 2), spec="reuse", num_classes=3)
    layers = discover_layers(m, torch.rand(2, 1, 2, 2))
    assert [lay.name for lay in layers] == ["act", "a", "act#2", "b"]
    assert [lay.call for lay in layers] == [0, 0, 1, 0]


def test_spilled_layers_give_the_same_numbers(tiny, tmp_path):
    m, x, y, _, vis = tiny
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-6)):
        kw = {"per_class_natural": 6, "metrics": ["spearman", "cosine"], "pair_stride": (2, 3, 2), "dtype": dtype}
        mem = A.run(m, (x, y), vis, **kw)
        spilled = A.run(m, (x, y), vis, budget_bytes=1, spill_dir=tmp_path, **kw)
        assert_close(mem["metrics"]["spearman"]["conditions"], spilled["metrics"]["spearman"]["conditions"], tol=tol)
        assert_close(mem["metrics"]["cosine"]["conditions"], spilled["metrics"]["cosine"]["conditions"], tol=tol)
    assert list(tmp_path.iterdir()) == []  # spill files are removed


def test_resume_skips_finished_layers(tiny, tmp_path, monkeypatch):
    m, x, y, _, vis = tiny
    kw = {"per_class_natural": 6, "metrics": ["pearson"], "pair_stride": "all", "cache_dir": tmp_path}
    first = A.run(m, (x, y), vis, **kw)
    assert len(list(tmp_path.glob("*.json"))) == len(first["layers"])

    def boom(*a, **k):
        raise AssertionError("a cached layer was recomputed")

    monkeypatch.setattr(A, "layer_conditions", boom)
    again = A.run(m, (x, y), vis, **kw)
    assert again["metrics"] == first["metrics"]
    # different inputs are not served from the cache
    with pytest.raises(AssertionError, match="recomputed"):
        A.run(m, (x, y), vis * 0.5, **kw)


# ------------------------------------------------------------------ bad input


def test_bad_input(tiny):
    m, x, y, _, vis = tiny
    nat = (x, y)
    with pytest.raises(FvtrustError, match="class 5 out of range.*3 classes"):
        A.run(m, nat, vis, classes=[0, 5, 1])
    with pytest.raises(FvtrustError, match="unknown class 'bee'"):
        A.run(m, nat, vis, classes=["a", "bee", "c"])
    with pytest.raises(FvtrustError, match="unknown similarity metric 'spearmann'.*spearman"):
        A.run(m, nat, vis, metrics="spearmann")
    with pytest.raises(FvtrustError, match="unknown layer 'rel'"):
        A.run(m, nat, vis, layers=["rel"])
    with pytest.raises(FvtrustError, match="only 3 visualizations.*per_class=4"):
        A.run(m, nat, vis, per_class=4)
    with pytest.raises(FvtrustError, match="class 0 has only 7 natural images.*per_class_natural=8"):
        A.run(m, nat, vis, per_class_natural=8)
    with pytest.raises(FvtrustError, match="bad pair_stride"):
        A.run(m, nat, vis, pair_stride=(10, 0, 5))
    with pytest.raises(FvtrustError, match="visualizations must be"):
        A.run(m, nat, vis[:2])
    with pytest.raises(FvtrustError, match="distinct"):
        A.run(m, nat, vis, classes=[0, 0, 1])


def _write_vis_dir(path, units, images, step=8, layer="fc"):
    from fvtrust.visualize.output import save_visualization
    from fvtrust.visualize.render import VisualizationResult

    res = VisualizationResult(images.unsqueeze(0), torch.zeros(1, len(units)), (step,), list(units), layer, {})
    save_visualization(res, path, spec="tiny")


def test_visualization_folder_roundtrip_and_errors(tmp_path):
    imgs = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    units = [0, 0, 1, 1, 2, 2]
    _write_vis_dir(tmp_path / "v", units, imgs)
    got, _meta = load_visualizations(tmp_path / "v", [0, 1, 2], 2, input_shape=(1, 6, 6), layer="fc")
    assert got.shape == (3, 2, 1, 6, 6)
    assert torch.equal(got.flatten(0, 1), quantize(imgs))  # bit-identical to in-memory quantization
    with pytest.raises(FvtrustError, match="only 2 visualization.*unit 1.*per_class=3"):
        load_visualizations(tmp_path / "v", [1, 2], 3, input_shape=(1, 6, 6))
    with pytest.raises(FvtrustError, match="no visualization of unit 7"):
        load_visualizations(tmp_path / "v", [0, 7], 2, input_shape=(1, 6, 6))
    with pytest.raises(FvtrustError, match="visualizes layer 'fc'.*'logits'"):
        load_visualizations(tmp_path / "v", [0], 2, input_shape=(1, 6, 6), layer="logits")
    with pytest.raises(FvtrustError, match="needs \\(1, 8, 8\\)"):
        load_visualizations(tmp_path / "v", [0], 2, input_shape=(1, 8, 8))
    with pytest.raises(FvtrustError, match="folder not found"):
        load_visualizations(tmp_path / "missing", [0], 2, input_shape=(1, 6, 6))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FvtrustError, match="no visualization.json"):
        load_visualizations(tmp_path / "empty", [0], 2, input_shape=(1, 6, 6))
    (tmp_path / "empty" / "visualization.json").write_text("{not json")
    with pytest.raises(FvtrustError, match="malformed"):
        load_visualizations(tmp_path / "empty", [0], 2, input_shape=(1, 6, 6))
    (tmp_path / "empty" / "visualization.json").write_text(json.dumps({"layer": "fc", "thresholds": [8]}))
    with pytest.raises(FvtrustError, match="malformed"):
        load_visualizations(tmp_path / "empty", [0], 2, input_shape=(1, 6, 6))
    (tmp_path / "v" / "unit0001_step0008.png").unlink()
    with pytest.raises(FvtrustError, match="missing"):
        load_visualizations(tmp_path / "v", [1], 2, input_shape=(1, 6, 6))


def test_plots_and_sanity_check_outputs(tiny, tmp_path):
    from fvtrust.sanity import sanity_check

    m, x, y, _, vis = tiny
    res = sanity_check(m, out=tmp_path / "o", natural=(x, y), visualizations=vis, per_class=3, per_class_natural=6,
                       metrics="spearman,cosine", command="test")
    files = sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_file())
    assert files == ["absolute_cosine.png", "absolute_spearman.png", "normalized_cosine.png",
                     "normalized_spearman.png", "similarity.json", "visualizations.png"]
    doc = json.loads((tmp_path / "o" / "similarity.json").read_text())  # strict JSON: NaN written as null
    assert doc["command"] == "test" and doc["classes"] == [0, 1, 2]
    assert doc["metrics"]["spearman"]["normalized"]["layers"] == [
        n for n in res["metrics"]["spearman"]["normalized"]["layers"]]


def test_cli_rejects_bad_input(tmp_path):
    from fvtrust.cli import main

    r = CliRunner().invoke(main, ["sanity-check", "fashion-cnn", "--weights", "random", "--classes", "0,1",
                                  "--random-classes", "3", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "either --classes or --random-classes" in r.output
    r = CliRunner().invoke(main, ["sanity-check", "fashion-cnn", "--weights", "random", "--visualizations",
                                  str(tmp_path / "nope"), "--per-class-natural", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "visualization folder not found" in r.output
    assert not (tmp_path / "o" / "similarity.json").exists()


@pytest.mark.slow
def test_cli_end_to_end_trained_fashion(tmp_path, trained_fashion):
    from fvtrust.cli import main

    out = tmp_path / "run"
    args = ["sanity-check", "fashion-cnn", "--random-classes", "3", "--seed", "42", "--per-class", "2",
            "--per-class-natural", "10", "--steps", "32", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "similarity.json").read_text())
    assert doc["classes"] == A.random_classes(10, 3, 42)
    assert doc["command"].startswith("fvtrust sanity-check fashion-cnn --random-classes 3")
    assert {f"{k}_{m}.png" for k in ("absolute", "normalized") for m in ("spearman", "pearson", "cosine")} <= {
        p.name for p in out.iterdir()}
    for m in ("spearman", "pearson", "cosine"):
        c = doc["metrics"][m]["conditions"]
        # trained net: same-class natural pairs are more alike than different-class ones in the last layers
        assert c["same_class"]["mean"][-1] > c["different_class"]["mean"][-1]
    assert doc["natural"]["accuracy"] > 0.7
    # the written visualizations are a valid --visualizations folder giving the same numbers
    r2 = CliRunner().invoke(main, args[:-2] + ["--visualizations", str(out / "visualizations"),
                                               "--out", str(tmp_path / "again")])
    assert r2.exit_code == 0, r2.output
    doc2 = json.loads((tmp_path / "again" / "similarity.json").read_text())
    assert doc2["metrics"] == doc["metrics"]
