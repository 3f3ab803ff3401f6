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


def brute_force(model, x, y, vis, classes, per_nat, layer, metric, strides, seed=0):
    """Independent reference: Python loops over the pairs, scipy per pair, per-class means averaged.

    Every pair of each condition is listed from the paper's definitions; the sub-sampled ones must be
    among them (with stride 1 they are all of them), and the statistics are recomputed here: the condition
    mean is the average over classes of per-class means (different classes: class c's mean is the average
    over c' of the mean over the pairs of c and c'), std and n_pairs over all kept pairs pooled.
    """
    with torch.no_grad():
        pred = model(x).argmax(1)
    nat = []
    for c in classes:
        idx = [i for i in range(len(y)) if y[i] == c][:per_nat]
        nat.append([i for i in idx if pred[i] == c])
    act = activations(model, x, layer)
    vact = activations(model, vis.flatten(0, 1), layer).reshape(len(classes), vis.shape[1], -1)
    every = {c: set() for c in A.CONDITIONS}  # (class(es), dataset or vis index pair) from the definitions
    for k in range(len(classes)):
        every["same_class"] |= {(k, a, b) for ai, a in enumerate(nat[k]) for b in nat[k][ai + 1:]}
        every["natural_vs_visualization"] |= {(k, i, v) for i in nat[k] for v in range(vis.shape[1])}
        for k2 in range(k + 1, len(classes)):
            every["different_class"] |= {((k, k2), i, j) for i in nat[k] for j in nat[k2]}
    kept = A.enumerate_pairs([len(n) for n in nat], [vis.shape[1]] * len(classes), strides, seed)
    out = {}
    for c in A.CONDITIONS:
        per_block, pooled = {}, []
        for _, _, where, local in kept[c]:
            vals = []
            for i, j in local.tolist():
                if c == "same_class":
                    key, a, b = (where, nat[where][i], nat[where][j]), act[nat[where][i]], act[nat[where][j]]
                elif c == "different_class":
                    key = (where, nat[where[0]][i], nat[where[1]][j])
                    a, b = act[nat[where[0]][i]], act[nat[where[1]][j]]
                else:
                    key, a, b = (where, nat[where][i], j), act[nat[where][i]], vact[where, j]
                assert key in every[c], (c, key)
                vals.append(ref_metric(metric, a, b))
            per_block[where] = np.array(vals)
            pooled += vals
        n_kept = sum(len(v) for v in per_block.values())
        assert len({tuple(p) for blk in kept[c] for p in [(blk[2], *q) for q in blk[3].tolist()]}) == n_kept
        if all(s == 1 for s in strides.values()):
            assert n_kept == len(every[c])
        block_mean = {w: np.nanmean(v) if (~np.isnan(v)).any() else np.nan for w, v in per_block.items()}
        if c == "different_class":
            per_class = [np.nanmean([m for w, m in block_mean.items() if k in w]) for k in range(len(classes))]
        else:
            per_class = [block_mean.get(k, np.nan) for k in range(len(classes))]
        pooled = np.array(pooled)
        ok = pooled[~np.isnan(pooled)]
        out[c] = {"mean": np.nanmean(per_class), "pooled_mean": ok.mean(), "std": ok.std(), "n_pairs": len(pooled),
                  "n_undefined": int(np.isnan(pooled).sum()), "per_class_mean": per_class}
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
    differs = False
    for metric in ("spearman", "pearson", "cosine"):  # with a common stride, cosine compares the same pairs
        s = A.resolve_strides(stride, [metric])[metric]
        assert s == ({"same_class": 1, "different_class": 1, "natural_vs_visualization": 1} if stride == "all"
                     else {"same_class": 2, "different_class": 3, "natural_vs_visualization": 4})
        for li, layer in enumerate(names):
            want = brute_force(m, x, y, vis, [0, 1, 2], 6, layer, metric, s)
            got = res["metrics"][metric]["conditions"]
            for c in A.CONDITIONS:
                assert got[c]["n_pairs"][li] == want[c]["n_pairs"], (metric, layer, c)
                assert got[c]["n_undefined"][li] == want[c]["n_undefined"]
                for key in ("mean", "pooled_mean", "std"):
                    assert abs(got[c][key][li] - want[c][key]) < TOL, (metric, layer, c, key)
                np.testing.assert_allclose(got[c]["per_class_mean"][li], want[c]["per_class_mean"], atol=TOL)
                differs |= abs(want[c]["mean"] - want[c]["pooled_mean"]) > 1e-4
    assert differs  # uneven classes (misclassified images excluded): class averaging is not pooling


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


def test_stride_counts():
    paper = A.resolve_strides("paper", ["spearman", "cosine"])
    assert paper["spearman"] == {"same_class": 10, "different_class": 100, "natural_vs_visualization": 5}
    assert paper["cosine"] == {"same_class": 1, "different_class": 1, "natural_vs_visualization": 1}
    counts = A.count_pairs([50] * 10, [10] * 10, paper["spearman"])
    assert counts == {"same_class": 1225, "different_class": 1125, "natural_vs_visualization": 1000}
    assert A.count_pairs([50] * 10, [10] * 10, paper["cosine"]) == {
        "same_class": 12250, "different_class": 112500, "natural_vs_visualization": 5000}
    # stride 1 keeps every pair, in row-major order
    pairs = A.enumerate_pairs([3, 4], [2, 2], paper["cosine"])
    assert pairs["same_class"][1][3].tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert pairs["natural_vs_visualization"][0][3].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]


def _usage(pairs, nat_counts, vis_counts):
    """How often each natural image / visualization takes part, per condition (from the kept pairs)."""
    nat = {c: [np.zeros(n, int) for n in nat_counts] for c in A.CONDITIONS}
    vis = [np.zeros(n, int) for n in vis_counts]
    for c, blocks in pairs.items():
        for _, _, where, local in blocks:
            i, j = local[:, 0].numpy(), local[:, 1].numpy()
            if c == "same_class":
                np.add.at(nat[c][where], np.concatenate([i, j]), 1)
            elif c == "different_class":
                np.add.at(nat[c][where[0]], i, 1)
                np.add.at(nat[c][where[1]], j, 1)
            else:
                np.add.at(nat[c][where], i, 1)
                np.add.at(vis[where], j, 1)
    return nat, vis


@pytest.mark.parametrize("nat_counts", [[50] * 10, [44, 50, 48, 45, 46, 50, 40, 49, 49, 45]])
def test_paper_strides_spread_over_every_image(nat_counts):
    """Issue 19, defect 1: the paper keeps every 10th / 100th / 5th comparison, i.e. a fraction 1/s of the
    pairs; those pairs must come from all images, not lock onto fixed positions of a row-major list
    (there, 10 visualizations and s = 5 used visualizations #0 and #5 of every class only)."""
    vis_counts = [10] * len(nat_counts)
    strides = A.resolve_strides("paper", ["spearman"])["spearman"]
    pairs = A.enumerate_pairs(nat_counts, vis_counts, strides)
    sizes = {"same_class": [n * (n - 1) // 2 for n in nat_counts],
             "different_class": [a * b for i, a in enumerate(nat_counts) for b in nat_counts[i + 1:]],
             "natural_vs_visualization": [a * b for a, b in zip(nat_counts, vis_counts)]}
    for c, blocks in pairs.items():
        s, n = strides[c], [len(b[3]) for b in blocks]
        assert sum(n) == -(-sum(sizes[c]) // s) == A.count_pairs(nat_counts, vis_counts, strides)[c]  # ceil(N/s)
        assert all(abs(k - size / s) < 1 for k, size in zip(n, sizes[c])), c  # each block: its share, +-1
        for (a_blk, b_blk, _, local) in blocks:  # distinct, in range, i < j within a class
            assert len({tuple(p) for p in local.tolist()}) == len(local)
            a = nat_counts[a_blk[1]]
            b = a if b_blk is None else (nat_counts if b_blk[0] == "nat" else vis_counts)[b_blk[1]]
            assert (local[:, 0] < a).all() and (local[:, 1] < b).all() and (local >= 0).all()
            if b_blk is None:
                assert (local[:, 0] < local[:, 1]).all()
    nat, vis = _usage(pairs, nat_counts, vis_counts)
    for k, used in enumerate(vis):  # every visualization, equally often (100 pairs over 10 of them: 10 each)
        assert used.min() >= 1 and used.max() - used.min() <= 1, (k, used)
    for k in range(len(nat_counts)):
        assert nat["natural_vs_visualization"][k].min() >= 1  # 2 pairs per natural image
        assert np.ptp(nat["natural_vs_visualization"][k]) <= 1
        assert nat["same_class"][k].min() >= 1  # ~122 pairs over 50 images
        assert np.ptp(nat["same_class"][k]) <= 3
    # different classes, every 100th: 25 pairs per class pair, so no block reaches all 50 images of a class,
    # but each class meets 9 others with different images: nearly every image takes part
    used = np.concatenate([u > 0 for u in nat["different_class"]])
    assert used.mean() >= 0.95, used.mean()


def test_pair_selection_is_seeded_and_metric_free():
    strides = {"same_class": 3, "different_class": 7, "natural_vs_visualization": 4}

    def flat(p):
        return [(c, str(b[2]), b[3].tolist()) for c, blocks in p.items() for b in blocks]

    a = A.enumerate_pairs([9, 8, 10], [5, 5, 5], strides)
    assert flat(a) == flat(A.enumerate_pairs([9, 8, 10], [5, 5, 5], strides, seed=0))
    assert flat(a) != flat(A.enumerate_pairs([9, 8, 10], [5, 5, 5], strides, seed=1))
    res = A.resolve_strides((3, 7, 4), ["spearman", "pearson", "cosine"])
    assert res["spearman"] == res["pearson"] == res["cosine"] == strides  # same strides -> same pairs
    # tiny blocks may keep no pair at all (a fraction of a pair), never more than they have
    p = A.enumerate_pairs([2, 1], [1, 1], {"same_class": 5, "different_class": 5, "natural_vs_visualization": 5})
    assert sum(len(b[3]) for blocks in p.values() for b in blocks) == 3
    with pytest.raises(FvtrustError, match="pair_seed"):
        A.run(tiny_model(), (torch.rand(3, 1, 6, 6), torch.zeros(3)), tiny_vis(), pair_seed="x")


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


def test_a_layer_over_budget_goes_to_a_rowfile(tiny, tmp_path):
    from fvtrust.sanity.activations import collect
    from fvtrust.sanity.similarity import similarity

    m, x, *_ = tiny
    layer = discover_layers(m, x[:4])[0]
    mem = next(collect(m, x, [layer], ["spearman"], batch_size=5, dtype=torch.float64))
    out = collect(m, x, [layer], ["spearman"], batch_size=5, dtype=torch.float64, budget_bytes=1, spill_dir=tmp_path)
    rows = next(out)
    p = rows.prepared["spearman"]
    assert rows.spilled and [f.suffix for f in next(tmp_path.iterdir()).iterdir()] == [".rows"]
    assert torch.equal(p.vectors.nan_to_num(7.0), mem.prepared["spearman"].vectors.nan_to_num(7.0))
    assert torch.equal(p.shift, mem.prepared["spearman"].shift)
    assert torch.allclose(similarity(p), similarity(mem.prepared["spearman"]), atol=0, equal_nan=True)
    out.close()  # the consumer moves on: the spill file goes
    assert list(tmp_path.iterdir()) == []


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
