"""compare-methods: the measures on known inputs, a tiny end-to-end run, the CLI, and the anchors when installed."""
import json

import pytest
import torch
from click.testing import CliRunner

from fvtrust.compare import measures as Ms
from fvtrust.compare.anchors import anchor_python, run_anchors
from fvtrust.compare.methods import check_methods
from fvtrust.compare.run import compare_methods
from fvtrust.errors import FvtrustError
from fvtrust.visualize.maco import Maco


def test_diversity_is_one_minus_mean_pairwise_correlation():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 1, 6, 6, generator=g)
    same = base.expand(2, 3, 1, 6, 6)
    assert Ms.diversity(same) == pytest.approx(0.0, abs=1e-12)
    a = torch.rand(1, 2, 1, 6, 6, generator=g)
    r = torch.corrcoef(a.view(2, -1).double())[0, 1].item()
    assert Ms.diversity(a) == pytest.approx(1 - r, abs=1e-10)
    assert Ms.diversity(a[:, :1]) != Ms.diversity(a[:, :1])  # one replicate: undefined (NaN)


def test_faithfulness_counts_visualizations_classified_as_their_unit(trained_fashion):
    from fvtrust.data import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    with torch.no_grad():
        pred = trained_fashion(x[:200]).argmax(1)
    ok0 = x[:200][(pred == 0) & (y[:200] == 0)][:2]
    ok1 = x[:200][(pred == 1) & (y[:200] == 1)][:2]
    vis = torch.stack([ok0, ok1])  # right class for both units
    assert Ms.faithfulness(trained_fashion, [0, 1], vis) == 1.0
    assert Ms.faithfulness(trained_fashion, [1, 0], vis) == 0.0


def test_unknown_method():
    with pytest.raises(FvtrustError, match="unknown method"):
        check_methods("maco,fancy")


def test_grouped_sanity_is_one_for_natural_images_as_visualizations(random_fashion):
    """Visualizations that *are* held-out images of their group score like same-group natural pairs."""
    g = torch.Generator().manual_seed(0)
    groups = [torch.rand(4, 1, 28, 28, generator=g) * 0.5, torch.rand(4, 1, 28, 28, generator=g) * 0.5 + 0.5]
    vis = torch.stack([grp[:2] for grp in groups])
    res = Ms.grouped_sanity(random_fashion, groups, vis, layers="block2,fc")
    assert res["kind"] == "top-activating groups" and len(res["values"]) >= 1
    # nat-vs-vis pairs include identical images (similarity 1): at least the same-group level
    assert res["mean"] >= 0.9


@pytest.mark.slow
def test_compare_methods_end_to_end_tiny(trained_fashion, tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path / "cache"))
    res = compare_methods(trained_fashion, "fc", [0, 1], steps=3, replicates=2, fit_limit=200, heldout_limit=300,
                          per_class_natural=8, sanity_layers="block4,fc", out=tmp_path / "out")
    names = [r["method"] for r in res["methods"]]
    assert names == ["lucent-standard", "pixel", "maco", "accentuation", "redirect"]
    for r in res["methods"]:
        assert r["sanity"]["kind"] == "class" and r["image_steps"] == 2 * 2 * 3
        assert set(r["sanity"]["layers"]) | set(r["sanity"]["dropped"]) == {"block4", "fc"}
        assert 0 <= r["faithfulness"] <= 1 and r["seconds_per_image_step"] > 0
    assert sorted(x["method"] for x in res["ranking"]) == sorted(names)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["ranking"] == res["ranking"] and (tmp_path / "out" / "maco_alpha.png").is_file()


def test_cli_compare_methods_bad_method_is_one_line(tmp_path):
    from fvtrust.cli import main

    r = CliRunner().invoke(main, ["compare-methods", "fashion-cnn", "--layer", "fc", "--methods", "nope", "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown method" in r.output


def test_missing_anchor_is_reported_not_raised(random_fashion, monkeypatch):
    monkeypatch.setattr("fvtrust.compare.anchors.anchor_python", lambda python=None: None)
    monkeypatch.setattr("fvtrust.compare.anchors._importable", lambda pkg: False)
    spec = Maco(data=torch.rand(8, 1, 28, 28))
    out = run_anchors(["horama"], random_fashion, "fc", [0], replicates=1, steps=1, seed=0, objective="neuron",
                      spectrum=spec)
    assert "not installed" in out["horama-maco"]


@pytest.mark.slow
@pytest.mark.skipif(anchor_python() is None, reason="anchors venv not installed (scripts/install.sh --test)")
def test_anchors_run_beside_fvtrust(trained_fashion, tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path / "cache"))
    spec = Maco(data="fashion-mnist", limit=200)
    out = run_anchors(["horama", "faccent"], trained_fashion, "fc", [1], replicates=1, steps=4, seed=0,
                      objective="neuron", spectrum=spec, proximity_layer="block3")
    for name in ("horama-maco", "faccent"):
        run = out[name]
        if isinstance(run, str) and ("ModuleNotFoundError" in run or "ImportError" in run or "not installed" in run):
            pytest.skip(f"optional anchor {name} is not fully installed here: {run}")
        assert not isinstance(run, str), run
        assert run.images.shape == (1, 1, 1, 28, 28) and 0 <= run.images.min() and run.images.max() <= 1
        assert run.seconds > 0 and len(run.settings["seconds_per_call"]) == 1
