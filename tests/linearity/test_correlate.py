import numpy as np
import pytest
from scipy import stats

from fvtrust.errors import FvtrustError
from fvtrust.linearity import PathMetrics, correlate, load_scores_csv, spearman_rows
from fvtrust.linearity.plots import figure12, path_curves


def fake_metrics(u=12, m=4, steps=30, seed=0):
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 90, (u, m, steps - 1)) * rng.uniform(0.2, 1, (u, 1, 1))
    dist = rng.uniform(0, 0.5, (u, m, steps - 1))
    z = np.zeros((u, m))
    return PathMetrics("block3", list(range(100, 100 + u)), angles, dist, z + 1, z, z + 1)


def test_matches_scipy_and_the_n_curve_is_aga_of_the_first_n_steps():
    pm = fake_metrics()
    scores = np.random.default_rng(1).normal(size=12)
    scores[3] = scores[4]  # a tie, ranked by average as scipy does
    c = correlate(pm, dict(zip(pm.units, scores)))
    for name in ("aga", "ald"):
        want = stats.spearmanr(getattr(pm, name), scores)
        assert c[name]["r"] == pytest.approx(want.statistic, abs=1e-12)
        assert c[name]["p"] == pytest.approx(want.pvalue, rel=1e-9)
        assert c[f"{name}_curve"]["r"][-1] == pytest.approx(c[name]["r"], abs=1e-12)  # n = N is the whole path
    per_start = {"aga": pm.angles, "ald": pm.distances}
    for n in (2, 3, 10, 30):
        for name, arr in per_start.items():
            upto = arr[:, :, :n - 1].mean(axis=(1, 2))  # AGA_n from the first n - 1 angles (n gradients)
            want = stats.spearmanr(upto, scores)
            k = c["n"].index(n)
            assert c[f"{name}_curve"]["r"][k] == pytest.approx(want.statistic, abs=1e-12)
            assert c[f"{name}_curve"]["p"][k] == pytest.approx(want.pvalue, rel=1e-9)
    np.testing.assert_allclose(pm.running("aga")[:, 0], pm.agpa[:, 0])


def test_spearman_rows_edge_cases():
    y = np.arange(6.0)
    r, p = spearman_rows(np.vstack([y, -y, np.ones(6), [0, 1, np.nan, 3, 4, 5]]), y)
    assert r[0] == pytest.approx(1) and r[1] == pytest.approx(-1) and p[0] == pytest.approx(0, abs=1e-12)
    assert np.isnan(r[2]) and np.isnan(r[3]) and np.isnan(p[3])
    x = np.random.default_rng(0).normal(size=(40, 6))
    for row, rr, pp in zip(x, *spearman_rows(x, y[::-1])):
        want = stats.spearmanr(row, y[::-1])
        assert rr == pytest.approx(want.statistic, abs=1e-12) and pp == pytest.approx(want.pvalue, rel=1e-9)


def test_scores_forms_and_errors():
    pm = fake_metrics(u=5)
    seq = [3.0, 1.0, 2.0, 5.0, 4.0]
    a = correlate(pm, seq)
    b = correlate(pm, {str(u): s for u, s in zip(pm.units, seq)})
    assert a["aga"] == b["aga"]
    with pytest.raises(FvtrustError, match="no interpretability score for unit.*103"):
        correlate(pm, {100: 1, 101: 2, 102: 3, 104: 4})
    with pytest.raises(FvtrustError, match="got 4 scores for 5 units"):
        correlate(pm, seq[:4])
    with pytest.raises(FvtrustError, match="not a finite"):
        correlate(pm, [1, 2, np.nan, 4, 5])


def test_undefined_units_are_excluded():
    pm = fake_metrics(u=6)
    pm.angles[2] = np.nan  # a dead unit: every angle undefined
    c = correlate(pm, np.arange(6.0))
    assert c["excluded"] == {"aga": [102], "ald": []}
    assert c["aga"]["n_units"] == 5
    keep = [0, 1, 3, 4, 5]
    assert c["aga"]["r"] == pytest.approx(stats.spearmanr(pm.aga[keep], np.arange(6.0)[keep]).statistic)


def test_load_scores_csv(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("unit,score\n3,0.5\n 7 , -1e-2\n\n")
    assert load_scores_csv(f) == {3: 0.5, 7: -0.01}
    cases = {"unit,value\n1,2\n": "header must be 'unit,score'",
             "unit,score\n1,0.2,9\n": r"s.csv:2: expected 2 columns",
             "unit,score\n1,0.2\nx,0.3\n": r"s.csv:3: unit must be an integer",
             "unit,score\n1,high\n": "score a number",
             "unit,score\n1,0.2\n1,0.3\n": "unit 1 appears twice",
             "unit,score\n1,nan\n": "not a finite number",
             "unit,score\n": "no rows",
             "": "empty"}
    for text, msg in cases.items():
        f.write_text(text)
        with pytest.raises(FvtrustError, match=msg):
            load_scores_csv(f)
    with pytest.raises(FvtrustError, match="cannot read"):
        load_scores_csv(tmp_path / "missing.csv")


def test_figures():
    pm = fake_metrics()
    c = correlate(pm, np.arange(12.0))
    assert len(figure12(c, "t").axes) == 2
    assert len(path_curves(pm).axes) == 2
