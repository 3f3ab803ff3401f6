import json

import pytest
import torch

import fvtrust
from fvtrust.errors import FvtrustError
from fvtrust.models import layer_units, parse_units, save_model
from fvtrust.models.hooks import forward_to


def test_fashion_contract(random_fashion):
    m = random_fashion
    assert not m.training and m.input_shape == (1, 28, 28)
    out = m(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    # normalization happens inside: the wrapper equals net(normalize(x))
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(m(x), m.net((x - 0.2860) / 0.3530), atol=1e-6)


def test_layers_and_units(random_fashion):
    names = {i.name: i for i in fvtrust.list_layers(random_fashion)}
    assert names["fc"].units == 10 and names["block2.conv"].shape == (64, 14, 14)
    assert layer_units(random_fashion, "block4") == 128
    with pytest.raises(FvtrustError, match="unknown layer 'blok4'.*block4"):
        layer_units(random_fashion, "blok4")


def test_parse_units():
    assert parse_units("all", 3) == [0, 1, 2]
    assert parse_units("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_units(4, 5) == [4]
    with pytest.raises(FvtrustError, match="out of range.*0..9"):
        parse_units("10", 10, "fc")
    with pytest.raises(FvtrustError, match="bad unit list"):
        parse_units("a,b", 10)


def test_forward_to_stops_early(random_fashion):
    called = []
    h = random_fashion.get_layer("fc").register_forward_hook(lambda *a: called.append(1))
    try:
        acts = forward_to(random_fashion, torch.rand(1, 1, 28, 28), ["block2"])
    finally:
        h.remove()
    assert acts["block2"].shape == (1, 64, 14, 14) and not called
    assert not random_fashion.get_layer("block2")._forward_hooks  # hooks removed


@pytest.mark.parametrize("name,layer,units", [("googlenet", "inception4a", 512), ("resnet50", "layer4.1.conv2", 512)])
def test_torchvision_random_init(name, layer, units):
    m = fvtrust.load_model(f"torchvision:{name}", weights="random")
    assert m.input_shape == (3, 224, 224) and not m.training
    info = {i.name: i for i in fvtrust.list_layers(m)}
    assert info[layer].units == units


def test_torchvision_errors(tmp_path):
    with pytest.raises(FvtrustError, match="unknown torchvision model"):
        fvtrust.load_model("torchvision:resnet5000", weights="random")
    with pytest.raises(FvtrustError, match="unknown weights"):
        fvtrust.load_model("torchvision:resnet18", weights="IMAGENET9K_V9")
    bad = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(FvtrustError, match="do not fit"):
        fvtrust.load_model("torchvision:resnet18", weights=str(bad))


def test_unknown_spec(tmp_path):
    with pytest.raises(FvtrustError, match="unknown model spec 'fashion_cnn'.*fashion-cnn"):
        fvtrust.load_model("fashion_cnn")
    with pytest.raises(FvtrustError, match="without fvtrust-model.json"):
        fvtrust.load_model(str(tmp_path))


def test_weights_file_wrong_shape(tmp_path):
    from safetensors.torch import save_file

    state = {k: torch.zeros(1) for k in fvtrust.load_model("fashion-cnn", weights="random").net.state_dict()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(FvtrustError, match="wrong shape"):
        fvtrust.load_model("fashion-cnn", weights=str(tmp_path / "w.safetensors"))


def test_saved_roundtrip(tmp_path, random_fashion):
    save_model(random_fashion, tmp_path / "m")
    again = fvtrust.load_model(str(tmp_path / "m"))
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(again(x), random_fashion(x))
    recipe = json.loads((tmp_path / "m" / "fvtrust-model.json").read_text())
    assert recipe["base_spec"] == "fashion-cnn"
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(FvtrustError, match="cannot read weights"):
        fvtrust.load_model(str(tmp_path / "m"))


def test_lucent_spec_error_or_load():
    try:
        import lucent.modelzoo  # noqa: F401
    except ImportError:
        with pytest.raises(FvtrustError, match="torch-lucent"):
            fvtrust.load_model("lucent:inceptionv1", weights="random")
        return
    m = fvtrust.load_model("lucent:inceptionv1", weights="random")
    assert m.input_shape == (3, 224, 224)
    assert any(i.name == "mixed4a" for i in fvtrust.list_layers(m))
    # 1000 standard-order logits (issue 19): not lucid's 1008 softmax outputs
    assert m.num_classes == 1000 and len(m.class_names) == 1000 and m.class_names[278] == "kit fox"
    with torch.no_grad():
        out = m(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 1000) and not torch.allclose(out.sum(1), torch.ones(1))  # logits, no softmax


def test_lucid_to_standard_class_order():
    """Issue 19, defect 2: lucid's output i (0 dummy, 1..1000 devkit order, 1001..1007 unused) -> standard k."""
    from torchvision.models import ResNet50_Weights

    from fvtrust.models import lucid_labels as L

    lucid = L.lucid_synsets()
    assert len(lucid) == 1008 and lucid[0] is None and lucid[1001:] == [None] * 7
    std = L.standard_synsets()
    assert len(std) == len(set(std)) == 1000 and std == sorted(std)
    index = L.standard_to_lucid()
    assert sorted(index.tolist()) == list(range(1, 1001))  # a bijection onto the 1000 class outputs
    # a fake model output whose value is lucid's output index: the mapping must pick, per standard class,
    # the lucid output of the same synset
    fake = torch.arange(1008, dtype=torch.float32).expand(2, 1008)
    got = L.to_standard_order(fake)
    assert got.shape == (2, 1000)
    spot = {0: ("n01440764", 449, "tench"), 1: ("n01443537", 450, "goldfish"),
            207: ("n02099601", 125, "golden retriever"), 212: ("n02100735", 2, "English setter"),
            278: ("n02119789", 1, "kit fox"), 543: ("n03255030", 1000, "dumbbell"),
            999: ("n15075141", 889, "toilet tissue")}
    names = L.standard_class_names()
    for k, (wnid, lucid_i, name) in spot.items():
        assert std[k] == wnid and lucid[lucid_i] == wnid and int(got[0, k]) == lucid_i and names[k] == name
    assert names == ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    # the shipped devkit names agree with torchvision's at every standard position but its 2 renamed duplicates
    devkit = {w: n.replace("_", " ") for _, w, n in L._table()}
    differ = [k for k in range(1000) if devkit[std[k]] != names[k]]
    assert [names[k] for k in differ] == ["crane bird", "maillot tank suit"]
    head = torch.nn.Linear(16, 1008)
    new = L.standard_order_head(head)
    x = torch.randn(3, 16)
    assert torch.allclose(new(x), L.to_standard_order(head(x)), atol=1e-6)
    with pytest.raises(FvtrustError, match="--class-index in lucid's order"):
        L.to_standard_order(torch.zeros(1, 1000))
    with pytest.raises(FvtrustError, match="--class-index in lucid's order"):
        L.lucid_synsets("1 n01440764 tench\n")


def test_evaluate_tiny(random_fashion):
    x = torch.rand(30, 1, 28, 28)
    y = random_fashion(x).argmax(1)
    res = fvtrust.evaluate(random_fashion, (x, y), batch_size=7)
    assert res["n"] == 30 and res["top1"] == 1.0 and res["top5"] == 1.0
    res = fvtrust.evaluate(random_fashion, (x, (y + 1) % 10))
    assert res["top1"] == 0.0
    with pytest.raises(FvtrustError, match="do not fit"):
        fvtrust.evaluate(random_fashion, (torch.rand(2, 3, 28, 28), torch.zeros(2, dtype=torch.long)))


def test_random_weights_are_one_network_and_leave_the_global_stream_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = fvtrust.load_model("fashion-cnn", weights="random")
    assert torch.equal(torch.rand(3), expected_next)             # the caller's random stream did not move
    b = fvtrust.load_model("fashion-cnn", weights="random")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    trained = fvtrust.load_model("fashion-cnn")
    assert not torch.equal(a.net.fc.weight, trained.net.fc.weight)
    r1 = fvtrust.load_model("torchvision:resnet18", weights="random")
    r2 = fvtrust.load_model("torchvision:resnet18", weights="random")
    assert torch.equal(r1.net.conv1.weight, r2.net.conv1.weight)
