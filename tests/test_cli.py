import json

from click.testing import CliRunner

from fvtrust.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_models_lists_specs():
    r = run("models", "--json")
    assert r.exit_code == 0
    specs = [s["spec"] for s in json.loads(r.output)]
    assert "fashion-cnn" in specs and "torchvision:googlenet" in specs and "torchvision:resnet50" in specs


def test_layers_json():
    r = run("layers", "fashion-cnn", "--json")
    assert r.exit_code == 0, r.output
    layers = {d["name"]: d for d in json.loads(r.output)}
    assert layers["fc"]["units"] == 10


def test_errors_are_one_line(tmp_path):
    for args, needle in [(("layers", "nosuchmodel"), "unknown model spec"),
                         (("visualize", "fashion-cnn", "fcc", "--out", str(tmp_path / "o"), "--weights", "random"),
                          "unknown layer 'fcc'"),
                         (("visualize", "fashion-cnn", "fc", "--units", "10", "--out", str(tmp_path / "o"),
                           "--weights", "random"), "out of range"),
                         (("visualize", "fashion-cnn", "fc", "--steps", "4", "--thresholds", "8",
                           "--out", str(tmp_path / "o"), "--weights", "random"), "thresholds"),
                         (("evaluate", "fashion-cnn", "--data-dir", str(tmp_path / "none")), "not found")]:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written half-way


def test_visualize_cli_writes_outputs(tmp_path):
    out = tmp_path / "vis"
    r = run("visualize", "fashion-cnn", "fc", "--units", "0,3", "--steps", "4", "--thresholds", "1,4",
            "--weights", "random", "--out", str(out))
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "visualization.json").read_text())
    assert meta["units"] == [0, 3] and meta["thresholds"] == [1, 4]
    assert len(meta["objective"]) == 2 and len(meta["objective"][0]) == 2
    for names in meta["files"].values():
        for n in names:
            assert (out / n).is_file()
    assert (out / "grid.png").is_file()


def test_visualize_cli_flags_reach_the_api(tmp_path):
    out = tmp_path / "vis"
    r = run("visualize", "fashion-cnn", "fc", "--units", "0,3", "--steps", "2", "--shared-start", "--no-fast",
            "--precision", "bf16", "--weights", "random", "--out", str(out))
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "visualization.json").read_text())["settings"]
    assert settings["shared_start"] is True and settings["fast"] is False and settings["precision"] == "bf16"
