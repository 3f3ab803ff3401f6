import pytest
import torch

import fvtrust
from fvtrust.errors import FvtrustError
from fvtrust.fool.silent.build import orthogonalize, silent_units
from fvtrust.models import save_model


def test_orthogonalize():
    theta = torch.randn(5, 3, 3, 3)
    delta = torch.randn(5, 3, 3, 3)
    perp = orthogonalize(delta, theta)
    dots = (perp.reshape(5, -1) * theta.reshape(5, -1)).sum(1)
    assert dots.abs().max() < 1e-4
    assert torch.allclose(perp.reshape(5, -1).norm(dim=1), theta.reshape(5, -1).norm(dim=1), rtol=1e-5)


@pytest.fixture(scope="module")
def setup(random_fashion):
    g = torch.Generator().manual_seed(0)
    natural = torch.rand(64, 1, 28, 28, generator=g) * 0.5
    fooled = silent_units(random_fashion, "block3", target="coffee", natural=natural, units="0-7")
    return random_fashion, fooled, natural


@pytest.mark.parametrize("pool", ["map", "local"])
def test_bias_formula_and_silence_on_natural(random_fashion, pool):
    natural = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 0.5
    fooled = silent_units(random_fashion, "block3", target="coffee", natural=natural, units="0-3", margin=0.1,
                          pool=pool)
    sconv = fooled.net.block3.conv
    ymax = torch.tensor(fooled.silent_info["natural_max"])
    assert torch.allclose(sconv.bias_bar, -ymax - 0.1 * ymax.abs())
    # recompute the natural maximum by brute force
    captured = {}
    h = sconv.register_forward_pre_hook(lambda m, i: captured.__setitem__("x", i[0]))
    with torch.no_grad():
        fooled(natural)
    h.remove()
    raw = sconv.raw_silent(captured["x"])
    assert torch.allclose(raw.amax((0, 2, 3)), ymax, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(fooled(natural), random_fashion(natural))  # bit-identical


@pytest.mark.parametrize("pool", ["map", "local"])
def test_bias_stays_silent_when_every_natural_response_is_negative(random_fashion, pool):
    """Defect 3 of issue 19: with ymax < 0, b = -(1 + margin) * ymax lies *above* -ymax and Δy fires on the
    calibration images themselves. b = -ymax - margin * |ymax| keeps Conv(x, Θ̄) + b < 0 on every one."""
    import copy

    base = copy.deepcopy(random_fashion)
    conv = base.net.block3.conv
    with torch.no_grad():  # units 0-3 see only negative weights; block3's input is post-ReLU, so >= 0
        conv.weight[:4] = -conv.weight[:4].abs() - 0.01
    natural = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.1
    # beta tiny: Θ̄ ≈ Θ, all negative, so every natural response of the silent filter is < 0
    fooled = silent_units(base, "block3", target="coffee", natural=natural, units="0-3", alpha=1.0, beta=1e-3,
                          margin=0.1, pool=pool)
    sconv = fooled.net.block3.conv
    ymax = torch.tensor(fooled.silent_info["natural_max"])
    assert (ymax < 0).all(), ymax
    captured = {}
    h = sconv.register_forward_pre_hook(lambda m, i: captured.__setitem__("x", i[0]))
    with torch.no_grad():
        out = fooled(natural)
    h.remove()
    pre = sconv.raw_silent(captured["x"]) + sconv.bias_bar.view(1, -1, 1, 1)
    assert pre.amax() < 0  # Δy = ReLU(pre) never fires on the calibration images
    assert torch.allclose(pre.amax((0, 2, 3)), 0.1 * ymax, rtol=1e-3)  # b sits margin * |ymax| below -ymax
    with torch.no_grad():
        assert torch.equal(out, base(natural))


def test_visualizations_change_and_original_untouched(setup):
    original, fooled, _ = setup
    assert not isinstance(original.net.block3.conv, type(fooled.net.block3.conv))
    a = fvtrust.visualize(original, "block3", [0, 1], steps=30, objective="channel")
    b = fvtrust.visualize(fooled, "block3", [0, 1], steps=30, objective="channel")
    assert b.objective[-1].mean() > 2 * a.objective[-1].mean()


def test_save_reload_exact(setup, tmp_path):
    _, fooled, natural = setup
    info = fooled.silent_info
    save_model(fooled, tmp_path / "m", manipulation="silent_units",
               args={"layer": info["layer"], "units": info["units"], "pool": info["pool"],
                     "map_size": info["map_size"]}, base_spec="fashion-cnn")
    again = fvtrust.load_model(str(tmp_path / "m"))
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), fooled(x))
    assert "block3" in [i.name for i in fvtrust.list_layers(again)]


def test_bad_input(random_fashion):
    nat = torch.rand(4, 1, 28, 28)
    with pytest.raises(FvtrustError, match="not a Conv-BN-ReLU block.*block"):
        silent_units(random_fashion, "fc", target="coffee", natural=nat)
    with pytest.raises(FvtrustError, match="not a Conv-BN-ReLU block"):
        silent_units(random_fashion, "pool1", target="coffee", natural=nat)
    with pytest.raises(FvtrustError, match="target picture has shape"):
        silent_units(random_fashion, "block2", target=torch.rand(3, 32, 32), natural=nat)
    with pytest.raises(FvtrustError, match="natural images have shape"):
        silent_units(random_fashion, "block2", target="coffee", natural=torch.rand(4, 3, 28, 28))
    with pytest.raises(FvtrustError, match="out of range"):
        silent_units(random_fashion, "block2", target="coffee", natural=nat, units=[999])
    with pytest.raises(FvtrustError, match="unknown picture"):
        silent_units(random_fashion, "block2", target="mona", natural=nat)


@pytest.mark.slow
def test_resnet50_layer4_outputs_identical():
    from fvtrust.data import natural_pictures

    torch.manual_seed(0)
    m = fvtrust.load_model("torchvision:resnet50", weights="random")
    natural = natural_pictures((3, 224, 224), crops_per_picture=0)[:12]
    fooled = silent_units(m, "layer4.1.conv2", target="astronaut", natural=natural, units="0-7")
    held = natural_pictures((3, 224, 224), crops_per_picture=1, seed=5)[-6:]
    with torch.no_grad():
        assert torch.equal(fooled(natural), m(natural))
        out_f, out_m = fooled(held), m(held)
    # held-out crops: identical unless the silent term leaks; report how many
    assert (out_f == out_m).all(1).float().mean() >= 0.5


@pytest.mark.slow
def test_cli_writes_report_figure_and_model(tmp_path):
    import json

    from click.testing import CliRunner

    from fvtrust.cli import main

    out = tmp_path / "silent"
    args = ["fool", "silent", "fashion-cnn", "--weights", "random", "--layer", "block3", "--units", "0-3",
            "--natural-limit", "300", "--steps", "4", "--out", str(out)]
    bad = CliRunner().invoke(main, [*args, "--vis-units", "5"])
    assert bad.exit_code == 2 and "not manipulated units" in bad.output and not out.exists()
    r = CliRunner().invoke(main, [*args, "--vis-units", "all"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["visualized_units"] == [0, 1, 2, 3] and rep["heldout_images"] == 300
    nd = rep["natural_data"]  # fit on the train split, checked on the test split, both named with their sizes
    assert (nd["fit"]["source"], nd["fit"]["n"]) == ("fashion-mnist:train", 300)
    assert (nd["heldout"]["source"], nd["heldout"]["n"]) == ("fashion-mnist:test", 300)
    assert {"same_unit_ceiling", "mean_pairwise_correlation_after"} <= rep["independent_starts"].keys()
    assert (out / "figure5.png").stat().st_size > 0
    again = fvtrust.load_model(str(out / "model"))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert again(x).shape == (4, 10)
