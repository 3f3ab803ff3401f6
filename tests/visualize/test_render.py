import pytest
import torch
from torch import nn

from fvtrust.errors import FvtrustError
from fvtrust.models.wrappers import FvModel
from fvtrust.visualize import Channel, Neuron, visualize


def tiny_rgb(size=32):
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(8, 6, 3, padding=1))
    net.add_module("relu2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6, 4))
    return FvModel(net, mean=(0.5,) * 3, std=(0.25,) * 3, input_shape=(3, size, size), spec="tiny-rgb",
                   num_classes=4)


def test_shapes_and_range(random_fashion):
    r = visualize(random_fashion, "fc", [0, 1, 2], steps=6, thresholds=(1, 3, 6))
    assert r.images.shape == (3, 3, 1, 28, 28) and r.objective.shape == (3, 3)
    assert 0 <= r.images.min() and r.images.max() <= 1
    assert r.thresholds == (1, 3, 6) and r.units == [0, 1, 2]


def test_objective_increases(random_fashion):
    r = visualize(random_fashion, "block3", [0, 5], steps=40, thresholds=(1, 40), objective="channel")
    assert (r.objective[-1] > r.objective[0]).all()
    low = visualize(random_fashion, "block3", [0, 5], steps=40, thresholds=(1, 40), objective="-channel")
    # the reported objective is the maximized one (minus the channel mean): it rises as the channel falls
    assert (low.objective[-1] >= low.objective[0]).all() and (low.objective[-1] <= 0).all()
    assert (-low.objective[-1] < r.objective[-1]).all()


def test_seed_determinism(random_fashion):
    a = visualize(random_fashion, "fc", [0, 1], steps=5)
    b = visualize(random_fashion, "fc", [0, 1], steps=5)
    c = visualize(random_fashion, "fc", [0, 1], steps=5, seed=1)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)


def test_fast_path_leaves_model_as_it_was():
    m = tiny_rgb()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    nhwc = visualize(m, "conv2", [0, 3], steps=6, objective="channel")
    nchw = visualize(m, "conv2", [0, 3], steps=6, objective="channel", fast=False)
    assert torch.allclose(nhwc.images, nchw.images, atol=1e-4)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous()


def test_shared_start(random_fashion):
    """Shared start: every unit begins from the same noise; the units alone make the images differ."""
    still = visualize(random_fashion, "fc", [0, 1, 2], steps=1, lr=0.0, shared_start=True)
    assert torch.equal(still.images[0, 0], still.images[0, 1]) and torch.equal(still.images[0, 0], still.images[0, 2])
    own = visualize(random_fashion, "fc", [0, 1, 2], steps=1, lr=0.0)
    assert not torch.allclose(own.images[0, 0], own.images[0, 1])
    moved = visualize(random_fashion, "fc", [0, 1], steps=5, shared_start=True)
    assert not torch.allclose(moved.images[0, 0], moved.images[0, 1])
    alone = visualize(random_fashion, "fc", [1], steps=5, shared_start=True)
    assert torch.allclose(alone.images[0, 0], moved.images[0, 1], atol=1e-5)  # still batch-invariant


@pytest.mark.parametrize("param", ["fft", "pixel"])
def test_batch_equals_single_runs(param):
    """One batched optimization gives each unit what a run of its own would."""
    m = tiny_rgb()
    batch = visualize(m, "conv2", [0, 3, 5], steps=8, objective="channel", param=param)
    for i, u in enumerate([0, 3, 5]):
        single = visualize(m, "conv2", [u], steps=8, objective="channel", param=param)
        assert torch.allclose(batch.images[:, i], single.images[:, 0], atol=1e-4)
    chunked = visualize(m, "conv2", [0, 3, 5], steps=8, objective="channel", param=param, chunk_size=2)
    assert torch.allclose(batch.images, chunked.images, atol=1e-5)


def test_start_from_images():
    m = tiny_rgb()
    start = torch.rand(2, 3, 32, 32) * 0.8 + 0.1
    for param in ("fft", "pixel", "raw"):
        r = visualize(m, "conv2", [0, 1], steps=1, start=start, param=param, lr=1e-9, transforms="none",
                      record_images=True)
        assert torch.allclose(r.trajectory[0], start, atol=1e-4), param


def test_record_gradients_match_autograd():
    """With the raw parameterization and no transforms, recorded gradients are d objective / d image."""
    m = tiny_rgb()
    start = torch.rand(2, 3, 32, 32)
    r = visualize(m, "conv2", [1, 2], steps=3, param="raw", transforms="none", objective="channel",
                  start=start, record_gradients=True, lr=0.01)
    assert r.gradients.shape == (3, 2, 3, 32, 32) and r.trajectory.shape == (4, 2, 3, 32, 32)
    x = r.trajectory[1].clone().requires_grad_(True)
    from fvtrust.models.hooks import forward_to

    acts = forward_to(m, x, ["conv2"])["conv2"]
    val = acts[0, 1].mean() + acts[1, 2].mean()
    (g,) = torch.autograd.grad(val, x)
    assert torch.allclose(r.gradients[1], g, atol=1e-6)


def test_grayscale_and_rgb_params():
    m = tiny_rgb()
    r = visualize(m, "fc", [0], steps=3, decorrelate=True)
    assert r.images.shape[2] == 3


def test_bad_input(random_fashion):
    with pytest.raises(FvtrustError, match="unknown layer"):
        visualize(random_fashion, "fc2", [0], steps=2)
    with pytest.raises(FvtrustError, match="out of range"):
        visualize(random_fashion, "fc", [10], steps=2)
    with pytest.raises(FvtrustError, match="thresholds"):
        visualize(random_fashion, "fc", [0], steps=4, thresholds=(8,))
    with pytest.raises(FvtrustError, match="thresholds"):
        visualize(random_fashion, "fc", [0], steps=4, thresholds=(0, 4))
    with pytest.raises(FvtrustError, match="unknown objective"):
        visualize(random_fashion, "fc", [0], steps=2, objective="neurons")
    with pytest.raises(FvtrustError, match="parameterization"):
        visualize(random_fashion, "fc", [0], steps=2, param="dct")
    with pytest.raises(FvtrustError, match="start must have shape"):
        visualize(random_fashion, "fc", [0], steps=2, start=torch.rand(1, 3, 28, 28))
    with pytest.raises(FvtrustError, match="transforms"):
        visualize(random_fashion, "fc", [0], steps=2, transforms="fancy")


def test_weights_untouched_and_no_grad_leak(random_fashion):
    before = {k: v.clone() for k, v in random_fashion.state_dict().items()}
    visualize(random_fashion, "block2", [0], steps=3)
    assert all(torch.equal(before[k], v) for k, v in random_fashion.state_dict().items())
    assert all(p.grad is None for p in random_fashion.parameters())
    assert all(p.requires_grad for p in random_fashion.parameters())


def test_objectives_values():
    acts = {"l": torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)}
    units = torch.tensor([1, 2])
    assert Neuron("l")(acts, units).tolist() == [acts["l"][0, 1, 2, 2].item(), acts["l"][1, 2, 2, 2].item()]
    assert torch.allclose(Channel("l")(acts, units), torch.stack([acts["l"][0, 1].mean(), acts["l"][1, 2].mean()]))
    combo = 2 * Channel("l") - Neuron("l")
    assert torch.allclose(combo(acts, units), 2 * Channel("l")(acts, units) - Neuron("l")(acts, units))
    from fvtrust.visualize.objectives import Direction, Diversity

    d = Direction("l", torch.eye(3))
    assert torch.allclose(d(acts, torch.tensor([0, 0])), torch.nn.functional.cosine_similarity(
        acts["l"], torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1), dim=1).mean((1, 2)))
    div = Diversity("l")(acts, torch.tensor([0, 0]))
    assert div.shape == (2,) and (div <= 0).all()


def test_bf16_precision_reaches_the_fp32_objective():
    """bf16 autocast changes the rounding of the forward, not what is optimized: the objective (always
    measured in float32) rises like fp32's, the images stay close, and the model comes back untouched."""
    m = tiny_rgb(64)  # >= 64 px: the NHWC fast path runs too
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f32 = visualize(m, "conv2", [0, 3, 5], steps=30, thresholds=(1, 30), objective="channel")
    b16 = visualize(m, "conv2", [0, 3, 5], steps=30, thresholds=(1, 30), objective="channel", precision="bf16")
    assert b16.settings["precision"] == "bf16" and f32.settings["precision"] == "fp32"
    assert b16.images.dtype == torch.float32 and b16.objective.dtype == torch.float32
    assert (b16.objective[-1] > b16.objective[0]).all()
    assert torch.allclose(b16.objective[-1], f32.objective[-1], rtol=0.1)
    assert not torch.equal(b16.images, f32.images)  # bf16 really ran
    assert (b16.images - f32.images).abs().mean() < 0.05
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    with pytest.raises(FvtrustError, match="precision"):
        visualize(m, "conv2", [0], steps=1, precision="fp16")
