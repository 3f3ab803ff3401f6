"""The paper's own setting, offline: a user's nn.Module, pretrained weights from the hub cache, their folder."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fvtrust
from fvtrust.errors import FvtrustError


class Normalized(nn.Module):
    """A research-style CNN: normalization inside forward, Conv-BN-ReLU in an nn.Sequential."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(torch.relu(self.features(x - self.mean) + 0.0))


def _trained_bn(net):
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_wrap_and_as_model_contract():
    net = _trained_bn(Normalized())
    m = fvtrust.wrap(net, input_shape=(3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(m(x), net(x)) and m.num_classes == 5  # nothing normalized twice
    assert fvtrust.as_model(m) is m
    assert fvtrust.as_model(net, example=x).input_shape == (3, 16, 16)
    with pytest.raises(FvtrustError, match=r"call fvtrust.wrap\(net, input_shape="):
        fvtrust.as_model(Normalized())
    with pytest.raises(FvtrustError, match="input_shape must be"):
        fvtrust.wrap(net, input_shape=(16, 16))
    with pytest.raises(FvtrustError, match="does not run on input of shape"):
        fvtrust.wrap(net, input_shape=(2, 16, 16))


def test_layer_names_are_the_users_module_paths():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.net(x))

    m = fvtrust.wrap(Outer(), input_shape=(3, 2, 2))
    names = [i.name for i in fvtrust.list_layers(m)]
    assert "net.1" in names and "fc" in names and "net" in names
    assert m.get_layer("net.1") is m.net.net[1]  # not stripped to "1"
    with pytest.raises(FvtrustError, match="unknown layer '1'"):
        m.get_layer("1")


def test_plain_module_through_the_api():
    """visualize (one wrap), silent_units (no wrap: natural data tells the shape), path_metrics (likewise)."""
    net = _trained_bn(Normalized())
    torch.manual_seed(1)
    natural = torch.rand(64, 3, 16, 16)
    heldout = torch.rand(32, 3, 16, 16)
    res = fvtrust.visualize(fvtrust.wrap(net, input_shape=(3, 16, 16)), "head.2", [0, 1], steps=8)
    assert res.final.shape == (2, 3, 16, 16)
    from fvtrust.fool import silent_units
    from fvtrust.fool.silent.report import heldout_outputs

    fooled = silent_units(net, "features.4", target="astronaut", natural=natural, units=[0, 1, 2], margin=0.5)
    assert fooled.silent_info["conv"] == "features.4"
    out = heldout_outputs(fvtrust.as_model(net, example=natural), fooled, heldout)
    assert out["fraction_outputs_bit_identical"] == 1.0
    # the BN of features.7 is followed by a residual-style "+ 0.0" inside forward, not by a ReLU: refused
    with pytest.raises(FvtrustError, match="not a Conv-BN-ReLU block.*valid: .*features.0"):
        silent_units(net, "features.7", target="astronaut", natural=natural)
    from fvtrust.linearity import path_metrics

    starts = torch.rand(2, 2, 3, 16, 16)
    pm = path_metrics(net, "features.4", [0, 1], starts, steps=4)
    assert len(pm.aga) == 2


def test_torchvision_residual_blocks_are_traced():
    from fvtrust.models.trace import conv_bn_relu_blocks

    m18 = fvtrust.load_model("torchvision:resnet18", weights="random")
    convs = {b.conv for b in conv_bn_relu_blocks(m18)}
    assert "layer4.1.conv1" in convs and "layer4.1.conv2" not in convs  # BasicBlock: bn2 -> + identity -> relu
    with pytest.raises(FvtrustError, match="residual addition"):
        from fvtrust.fool.silent.build import resolve_block

        resolve_block(m18, "layer4.1.conv2")


@pytest.mark.parametrize("spec,layer", [("torchvision:resnet18", "layer4.1.conv1"),
                                        ("torchvision:resnet50", "layer4.1.conv2")])
@pytest.mark.slow
def test_silent_units_bit_identical_on_resnets(spec, layer):
    from fvtrust.fool import silent_units
    from fvtrust.fool.silent.report import heldout_outputs

    torch.manual_seed(0)
    m = fvtrust.load_model(spec, weights="random")
    natural = fvtrust.natural("pictures", model=m)
    fooled = silent_units(m, layer, target="astronaut", natural=natural, units=[0, 1, 2, 3])
    out = heldout_outputs(m, fooled, natural.heldout)
    assert out["fraction_outputs_bit_identical"] == 1.0 and out["max_output_difference"] == 0.0


def _hub_checkpoint(tmp_path, monkeypatch, name):
    """Write a random-init checkpoint where torch.hub looks for `name`'s DEFAULT weights; return the enum."""
    import os

    import torchvision.models as tvm

    enum = tvm.get_model_weights(name).DEFAULT
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    kw = {"aux_logits": True, "init_weights": True} if name == "googlenet" else {}
    net = tvm.get_model(name, weights=None, **kw)
    for mod in net.modules():  # non-trivial BN statistics, like a trained net
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), ckpt / os.path.basename(enum.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return enum


@pytest.mark.parametrize("name", ["googlenet", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_pretrained_from_hub_cache_matches_torchvision(tmp_path, monkeypatch, name):
    import torchvision.models as tvm

    enum = _hub_checkpoint(tmp_path, monkeypatch, name)
    m = fvtrust.load_model(f"torchvision:{name}")  # DEFAULT weights, offline, from $TORCH_HOME
    ref = tvm.get_model(name, weights=enum).eval()
    assert m.class_names == enum.meta["categories"] and m.num_classes == 1000
    x = torch.rand(2, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(m(x), ref((x - mean) / std), atol=1e-5)
    assert fvtrust.load_model(f"torchvision:{name}", weights=enum.name).num_classes == 1000


def test_pretrained_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr("torch.hub.download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FvtrustError, match="torch hub cache"):
        fvtrust.load_model("torchvision:resnet18")


def test_inception_v3_random_and_input_size():
    m = fvtrust.load_model("torchvision:inception_v3", weights="random")
    assert m.input_shape == (3, 299, 299) and m.net.AuxLogits is None and len(m.class_names) == 1000


def test_timm_random_and_file(tmp_path):
    timm = pytest.importorskip("timm")
    m = fvtrust.load_model("timm:resnet18", weights="random")
    assert m.input_shape == (3, 224, 224) and m.num_classes == 1000 and len(m.class_names) == 1000
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    loaded = fvtrust.load_model("timm:resnet18", weights=str(path))
    x = torch.rand(1, 3, 224, 224)
    cfg = ref.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref((x - mean) / std), atol=1e-5)
    with pytest.raises(FvtrustError, match="unknown timm model"):
        fvtrust.load_model("timm:resnet18x", weights="random")


def _factory_file(tmp_path, body):
    f = tmp_path / "mynet.py"
    f.write_text(textwrap.dedent(body))
    return f


def test_py_spec(tmp_path):
    f = _factory_file(tmp_path, """
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), (1, 8, 8)

        def broken():
            raise RuntimeError("no GPU driver")
    """)
    m = fvtrust.load_model(f"py:{f}:build")
    assert m.input_shape == (1, 8, 8) and m.num_classes == 3 and m.spec.startswith("py:")
    with pytest.raises(FvtrustError, match=r"broken\(\) raised RuntimeError: no GPU driver"):
        fvtrust.load_model(f"py:{f}:broken")
    with pytest.raises(FvtrustError, match="has no function 'nope'"):
        fvtrust.load_model(f"py:{f}:nope")
    # a model saved from a py: spec reloads from the same file
    from fvtrust.models import save_model

    save_model(m, tmp_path / "saved")
    again = fvtrust.load_model(str(tmp_path / "saved"))
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(again(x), m(x))


def test_folder_labels_follow_the_model(imagenet_folder, tmp_path, image_folder_factory):
    m = fvtrust.load_model("torchvision:resnet18", weights="random")
    data = fvtrust.natural(str(imagenet_folder), model=m)
    assert data.labelled and sorted(set(data.targets().tolist())) == [0, 1, 2]  # tench, goldfish, white shark
    assert len(data.fit) + len(data.heldout) == 12 and len(data.evaluation) == 12
    assert not set(data.fit.dataset.indices) & set(data.heldout.dataset.indices)
    x, y = data.heldout.tensors()
    assert x.shape[1:] == (3, 224, 224) and 0 <= x.min() and x.max() <= 1
    # folder names = class names; an explicit class index wins
    make_image_folder = image_folder_factory
    named = make_image_folder(tmp_path / "named", classes=("tench", "goldfish"), per_class=2)
    assert sorted(set(fvtrust.natural(str(named), model=m).targets().tolist())) == [0, 1]
    idx = tmp_path / "index.json"
    idx.write_text(json.dumps({"tench": 7, "goldfish": 9}))
    assert sorted(set(fvtrust.natural(str(named), model=m, class_index=str(idx)).targets().tolist())) == [7, 9]
    # classes that match nothing: usable images, but labelled steps refuse in one line
    odd = make_image_folder(tmp_path / "odd", classes=("cats",), per_class=2)
    d = fvtrust.natural(str(odd), model=m)
    with pytest.raises(FvtrustError, match="do not match the model's 1000 classes; give --class-index"):
        d.require_labels("accuracy")
    with pytest.raises(FvtrustError, match="class index has no entry for folder"):
        fvtrust.natural(str(odd), model=m, class_index={"dogs": 1})


def test_natural_limit_and_parts(imagenet_folder):
    m = fvtrust.load_model("torchvision:resnet18", weights="random")
    d = fvtrust.natural(str(imagenet_folder), model=m, limit=3)
    assert len(d.fit) == 3 and len(d.heldout) == 3 and len(d.evaluation) == 3
    # the cap keeps a representative (seeded) subset, not the first class only
    assert len(set(d.evaluation.targets().tolist())) > 1
    f = fvtrust.natural("fashion-mnist", model=fvtrust.load_model("fashion-cnn"), limit=100)
    assert f.fit.source == "fashion-mnist:train" and f.heldout.source == "fashion-mnist:test" and len(f.fit) == 100


def _cli(*args):
    from fvtrust.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_bad_input_is_one_line(tmp_path, imagenet_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cls").mkdir()
    bad = tmp_path / "bad"
    (bad / "n01440764").mkdir(parents=True)
    (bad / "n01440764" / "x.jpg").write_bytes(b"not a jpeg")
    f = _factory_file(tmp_path, "def broken():\n    raise ValueError('boom')\n")
    cases = [
        (["evaluate", "torchvision:resnet18", "--weights", "random", "--data", empty], "no valid file|not an ImageNet"),
        (["evaluate", "torchvision:resnet18", "--weights", "random", "--data", bad], "cannot read image"),
        (["evaluate", "torchvision:resnet18", "--weights", "random", "--data", tmp_path / "nope"], "unknown data"),
        (["evaluate", "torchvision:resnet18", "--weights", "random"], "no default natural data: give --data"),
        (["evaluate", f"py:{f}:broken"], r"broken\(\) raised ValueError: boom"),
        (["evaluate", "fashion-cnn", "--data", imagenet_folder], "do not match the model's 10 classes"),
    ]
    if not torch.cuda.is_available():
        cases.append((["evaluate", "fashion-cnn", "--device", "cuda"], "no CUDA GPU is usable here"))
    for args, pattern in cases:
        r = _cli(*args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.output, r.output
        import re

        assert re.search(pattern, lines[0]), (pattern, lines[0])


def test_device_cuda_runs_when_a_gpu_is_there():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here; --device cuda is checked to fail in one line instead")
    r = _cli("evaluate", "fashion-cnn", "--device", "cuda", "--limit", "256", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["n"] == 256


def test_evaluate_on_a_folder(imagenet_folder):
    r = _cli("evaluate", "torchvision:resnet18", "--weights", "random", "--data", imagenet_folder, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["n"] == 12 and out["natural_data"]["path"] == str(imagenet_folder.resolve())


@pytest.mark.slow
def test_fool_and_sanity_on_a_folder(tmp_path, imagenet_folder):
    """fool silent / circuit and sanity-check on a random-init torchvision model with --data FOLDER."""
    folder = str(imagenet_folder.resolve())
    common = ["--weights", "random", "--data", folder]
    # 6 fit images bound the natural maximum loosely: a wide margin keeps the 6 held-out ones silent
    r = _cli("fool", "silent", "torchvision:resnet18", "--layer", "layer4.1.conv1", "--units", "0-3", "--margin", "1.0",
             "--steps", "4", "--target", "astronaut", *common, "--out", tmp_path / "silent")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "silent" / "report.json").read_text())
    nd = rep["natural_data"]
    assert nd["path"] == folder and nd["fit"]["n"] + nd["heldout"]["n"] == 12 and nd["fit"]["role"] == "fit"
    assert rep["heldout_images"] == nd["heldout"]["n"] and rep["fraction_outputs_bit_identical"] == 1.0
    r = _cli("fool", "circuit", "torchvision:resnet18", "--layer", "fc", "--offset", "100", "--units", "0-3",
             "--budget", "tiny", "--steps", "4", "--bound-steps", "4", "--harden-rounds", "0",
             "--cache", tmp_path / "c", *common, "--out", tmp_path / "circuit")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "circuit" / "report.json").read_text())
    assert rep["natural_data"]["path"] == folder and rep["natural"]["n"] == rep["natural_data"]["heldout"]["n"]
    r = _cli("sanity-check", "torchvision:resnet18", "--classes", "0,1,2", "--per-class", "2", "--steps", "4",
             "--per-class-natural", "4", "--misclassified", "auto",
             "--layers", "layer1,layer4,fc", "--all-pairs", *common, "--out", tmp_path / "sanity")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sanity" / "similarity.json").read_text())
    assert res["natural_data"]["path"] == folder and res["natural_data"]["parts"]["evaluation"]["n"] == 12


@pytest.mark.slow
def test_reproduce_googlenet_on_a_folder(tmp_path, imagenet_folder):
    from fvtrust.report import reproduce

    doc = reproduce(tmp_path / "rep", model="torchvision:googlenet", weights="random", data=imagenet_folder,
                    budget="smoke")
    assert {k: v["status"] for k, v in doc["steps"].items()} == {k: "ok" for k in doc["steps"]}, \
        {k: v.get("error") for k, v in doc["steps"].items()}
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "torchvision:googlenet" in page and "fashion" not in page.lower()
    assert doc["meta"]["setting"]["natural_data"]["path"] == str(imagenet_folder.resolve())


def test_manipulated_plain_module_reloads_with_its_base(tmp_path):
    from fvtrust.fool import silent_units
    from fvtrust.models import save_model
    from fvtrust.models.saved import load_saved

    net = _trained_bn(Normalized())
    natural = torch.rand(32, 3, 16, 16)
    fooled = silent_units(net, "features.0", target="astronaut", natural=natural, units=[0, 1])
    info = fooled.silent_info
    save_model(fooled, tmp_path / "m", manipulation="silent_units",
               args={"layer": "features.0", "units": info["units"], "pool": info["pool"], "map_size": info["map_size"]})
    with pytest.raises(FvtrustError, match="plain Normalized module.*base=fvtrust.wrap"):
        fvtrust.load_model(str(tmp_path / "m"))
    back = load_saved(tmp_path / "m", base=fvtrust.wrap(net, input_shape=(3, 16, 16)))
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(back(x), fooled(x))
