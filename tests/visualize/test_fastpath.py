import torch
from torch import nn

import fvtrust
from fvtrust.models.hooks import forward_to
from fvtrust.models.wrappers import FvModel
from fvtrust.visualize.fastpath import _conv_bn_pairs, fast_inference


class SkipNet(nn.Module):
    """conv1 -> bn1 is foldable; conv2's output also feeds a skip, so bn2 must not be folded into it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        return self.relu2(self.bn2(z) + z)


def model():
    torch.manual_seed(0)
    net = SkipNet()
    for bn in (net.bn1, net.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return FvModel(net, mean=(0.5,) * 3, std=(0.25,) * 3, input_shape=(3, 16, 16), spec="skip")


def test_folds_exactly_and_restores():
    m = model()
    x = torch.rand(4, 3, 16, 16)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = forward_to(m, x, ["relu2"])["relu2"]
    with fast_inference(m, ["relu2"], x[:1]):
        assert m.net.bn1.forward(torch.ones(1)).item() == 1.0  # bn1 folded away (identity)
        assert "forward" not in vars(m.net.bn2)                # bn2 left alone: conv2's output is reused
        assert m.net.conv1.bias is not None
        with torch.no_grad():
            got = forward_to(m, x, ["relu2"])["relu2"]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert m.net.conv1.bias is None and "forward" not in vars(m.net.bn1)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]) and v.is_contiguous(), k


def test_objective_layers_are_never_folded():
    m = model()
    x = torch.rand(1, 3, 16, 16)
    assert _conv_bn_pairs(m, x, keep={"bn1", "conv2"}) == []
    assert _conv_bn_pairs(m, x, keep={"bn1"}) == [(m.net.conv2, m.net.bn2)]
    assert _conv_bn_pairs(m, x, keep=set()) == [(m.net.conv1, m.net.bn1), (m.net.conv2, m.net.bn2)]


def test_visualize_same_with_and_without_fast_path():
    """Objective layers inside, at and after folded pairs. SGD keeps float noise proportional
    (Adam's first steps are sign-like and would amplify 1e-7 differences in near-zero gradients)."""
    torch.manual_seed(0)
    m = fvtrust.load_model("torchvision:resnet18", weights="random")
    for layer in ("layer1.0", "layer1.0.bn1", "layer1.0.conv2", "layer2"):
        kw = dict(steps=3, objective="channel", size=64, optimizer="sgd", lr=50.0)
        a = fvtrust.visualize(m, layer, [0, 5], **kw)
        b = fvtrust.visualize(m, layer, [0, 5], fast=False, **kw)
        assert not torch.allclose(a.images[-1], fvtrust.visualize(m, layer, [0, 5], **{**kw, "lr": 0.0}).images[-1])
        assert torch.allclose(a.images, b.images, atol=1e-4), layer
        assert torch.allclose(a.objective, b.objective, rtol=1e-3, atol=1e-4), layer
