import json

from click.testing import CliRunner

from fvtrust.cli import main

BASE = ["linearity", "fashion-cnn", "block1", "--units", "0-3", "--m", "3", "--steps", "4",
        "--data", "pictures"]


def test_with_scores_writes_json_and_figure12(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("unit,score\n0,0.9\n1,0.1\n2,0.5\n3,0.7\n9,0.2\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, BASE + ["--scores", str(scores), "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "linearity.json").read_text())
    assert (out / "figure12.png").stat().st_size > 0
    assert doc["metrics"]["units"] == [0, 1, 2, 3] and len(doc["metrics"]["agpa"][0]) == 3
    assert len(doc["correlation"]["aga_curve"]["r"]) == 3 and doc["correlation"]["n"] == [2, 3, 4]
    assert len(doc["top_activating"]["indices"][0]) == 3
    assert "Spearman AGA" in res.output
    # rerun: every unit comes from the cache (keyed by weights: the packaged ones are fixed)
    res = CliRunner().invoke(main, BASE + ["--scores", str(scores), "--out", str(out)])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "linearity.json").read_text())
    assert again["metrics"]["diagnostics"]["cached_units"] == [0, 1, 2, 3]
    assert again["metrics"]["aga"] == doc["metrics"]["aga"]


def test_without_scores_writes_path_curves(tmp_path):
    res = CliRunner().invoke(main, BASE + ["--param", "raw", "--transforms", "none", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "path_curves.png").is_file() and not (tmp_path / "figure12.png").exists()
    doc = json.loads((tmp_path / "linearity.json").read_text())
    assert doc["correlation"] is None and doc["metrics"]["settings"]["param"] == "raw"


def test_score_errors_fail_before_compute(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("unit,score\n0,0.9\n1,0.1\n")
    res = CliRunner().invoke(main, BASE + ["--scores", str(scores), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no score for unit(s) 2, 3" in res.output
    scores.write_text("unit,score\n0,zero\n")
    res = CliRunner().invoke(main, BASE + ["--scores", str(scores), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "scores.csv:2" in res.output
    assert not (tmp_path / "o").exists()


def test_model_without_default_data_needs_data(tmp_path):
    res = CliRunner().invoke(main, ["linearity", "torchvision:resnet18", "layer1", "--weights", "random",
                                    "--units", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no default natural data: give --data" in res.output
