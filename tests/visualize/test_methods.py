"""MACO, redirected ReLU, feature accentuation and alpha, against references written from the papers' formulas."""
import numpy as np
import pytest
import torch
from torch import nn

from fvtrust.errors import FvtrustError
from fvtrust.models.wrappers import FvModel
from fvtrust.visualize import visualize
from fvtrust.visualize import maco as M
from fvtrust.visualize.accentuate import accentuate, top_seeds
from fvtrust.visualize.alpha import visualize_transparent
from fvtrust.visualize.objectives import Neuron, Proximity
from fvtrust.visualize.relu import redirect_relus, redirected_relu, redirected_relu6


# ------------------------------------------------------------------ MACO


def _image_from_phase_reference(phase, mag, h, w):
    """Fel et al.: the real image with spectrum magnitude M and phase φ, written as an explicit DFT sum.

    The rfft half-plane (kx <= W//2) is completed by Hermitian symmetry,
    F[ky, kx] = conj(F[-ky mod H, W - kx]) for kx > W//2, and
    s[n] = Re( 1/(HW) Σ_k F[k] exp(2πi (ky ny / H + kx nx / W)) ); then
    x = sigmoid((s - mean) / (std + 1e-4)) per image.
    """
    c = phase.shape[0]
    half = mag * np.exp(1j * phase)
    full = np.zeros((c, h, w), dtype=complex)
    for ky in range(h):
        for kx in range(w):
            full[:, ky, kx] = half[:, ky, kx] if kx <= w // 2 else np.conj(half[:, (-ky) % h, w - kx])
    ny, nx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    s = np.zeros((c, h, w))
    for ky in range(h):
        for kx in range(w):
            s += (full[:, ky, kx][:, None, None] * np.exp(2j * np.pi * (ky * ny / h + kx * nx / w))).real
    s /= h * w
    s = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
    return 1 / (1 + np.exp(-s))


@pytest.mark.parametrize("h,w", [(6, 8), (5, 7)])
def test_maco_image_matches_the_formula(h, w):
    rng = np.random.default_rng(0)
    phase = rng.normal(size=(2, 1, h, w // 2 + 1))
    mag = rng.uniform(0.1, 2.0, size=(1, h, w // 2 + 1))
    got = M.maco_image(torch.tensor(phase, dtype=torch.float64), torch.tensor(mag, dtype=torch.float64), (h, w))
    for i in range(2):
        ref = _image_from_phase_reference(phase[i], mag, h, w)
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-10)


def test_maco_keeps_the_magnitude_and_optimizes_only_the_phase():
    h, w = 8, 10
    mag = torch.rand(1, h, w // 2 + 1) + 0.5
    prm = M.Maco(magnitude=mag).make((3, 1, h, w), decorrelate=False,
                                     generators=[torch.Generator().manual_seed(i) for i in range(3)])
    assert prm.tensor.shape == (3, 1, h, w // 2 + 1) and prm.tensor.requires_grad  # the leaf is the phase
    spatial = torch.fft.irfft2(torch.polar(prm.scale.expand_as(prm.tensor), prm.tensor.detach()), s=(h, w))
    spec = torch.fft.rfft2(spatial).abs()
    # interior columns (not DC / Nyquist, whose imaginary part irfft drops) keep the magnitude exactly
    torch.testing.assert_close(spec[..., 1:w // 2], mag.expand(3, -1, -1, -1)[..., 1:w // 2], atol=1e-5, rtol=1e-5)
    img = prm.image()
    assert img.shape == (3, 1, h, w) and 0 < img.min() and img.max() < 1


def test_magnitude_spectrum_is_the_mean_of_standardized_spectra():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(7, 1, 6, 6)).astype(np.float32)
    got = M.magnitude_spectrum(torch.tensor(x), (6, 6), batch=3)
    z = x - x.mean((1, 2, 3), keepdims=True)
    z = z / (z.std((1, 2, 3), ddof=1, keepdims=True) + 1e-4)
    ref = np.abs(np.fft.rfft2(z)).mean(0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_maco_spectrum_is_cached_per_source_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path))
    calls = []

    from fvtrust.data.natural import NaturalData

    def fake_natural(source, *, input_shape, data_dir=None, **kw):
        calls.append((source, tuple(input_shape), "fit"))
        x = torch.rand(40, *input_shape, generator=torch.Generator().manual_seed(0))
        data = NaturalData(torch.utils.data.TensorDataset(x, torch.zeros(40, dtype=torch.long)), str(source))
        data.parts["fit"] = data.select(range(20), role="fit")
        return data

    import fvtrust.data

    monkeypatch.setattr(fvtrust.data, "natural", fake_natural)
    a = M.Maco(data="some-folder", limit=20).magnitude((1, 12, 12))
    b = M.Maco(data="some-folder", limit=20).magnitude((1, 12, 12))  # a new object: read from disk
    assert calls == [("some-folder", (1, 12, 12), "fit")]
    torch.testing.assert_close(a, b)
    M.Maco(data="some-folder", limit=20).magnitude((1, 16, 16))  # another size: computed
    assert len(calls) == 2 and len(list((tmp_path / "maco").glob("*.npy"))) == 2


def test_maco_visualization_runs_batched_and_is_batch_invariant(random_fashion):
    spec = M.Maco(data=torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    both = visualize(random_fashion, "fc", [0, 3], steps=4, param=spec)
    alone = visualize(random_fashion, "fc", [3], steps=4, param=spec)
    torch.testing.assert_close(both.images[:, 1], alone.images[:, 0])
    assert both.settings["param"].startswith("maco")


def test_maco_needs_natural_data():
    with pytest.raises(FvtrustError, match="needs natural images"):
        M.Maco().magnitude((3, 32, 32))


def test_maco_string_uses_the_models_default_data(random_fashion, monkeypatch):
    seen = []
    monkeypatch.setattr(M, "maco_for", lambda d: seen.append(d) or M.Maco(data=torch.rand(8, 1, 28, 28)))
    visualize(random_fashion, "fc", [0], steps=1, param="maco")
    assert seen == ["fashion-mnist"]


# ------------------------------------------------------------------ redirected ReLU


def _lucid_redirected_grad(x, g):
    """lucid's redirected_relu_grad, written out: per batch entry, the true gradient unless it is all zero."""
    relu_grad = np.where(x < 0, 0.0, g)
    redirected = np.where((x < 0) & (g > 0), 0.0, g)
    out = np.empty_like(g)
    for b in range(len(x)):
        out[b] = relu_grad[b] if np.linalg.norm(relu_grad[b].ravel()) > 0 else redirected[b]
    return out


def test_redirected_relu_gradient_matches_lucid():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5))
    x[1] = -np.abs(x[1]) - 0.1  # entry 1: dead, every input negative
    x[3] = -np.abs(x[3]) - 0.1  # entry 3: dead too
    g = rng.normal(size=x.shape)
    xt = torch.tensor(x, requires_grad=True)
    y = redirected_relu(xt)
    torch.testing.assert_close(y, torch.relu(xt))
    (gx,) = torch.autograd.grad(y, xt, torch.tensor(g))
    ref = _lucid_redirected_grad(x, g)
    np.testing.assert_allclose(gx.numpy(), ref)
    assert np.abs(ref[1]).sum() > 0 and np.all(ref[1][g[1] > 0] == 0)  # dead entry: only "push up" passes
    np.testing.assert_allclose(gx[0].numpy(), np.where(x[0] < 0, 0, g[0]))  # live entry: the true gradient


def test_redirected_relu6_lets_gradient_bring_inputs_back():
    x = torch.tensor([[-1.0, 7.0, 8.0]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)  # descent: -1 pushes up, +1 pushes down
    (gx,) = torch.autograd.grad(redirected_relu6(x), x, g)
    assert gx.tolist() == [[-1.0, 1.0, 0.0]]


def _dead_unit_model():
    """fc unit 1 reads a ReLU channel that is off for grey images (0.3 * 0.5 - 0.2 < 0) but on for bright ones."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 2, 3, padding=1))
    net.add_module("relu", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(2, 2))
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([0.1, 0.3]).view(2, 1, 1, 1) * torch.ones(2, 1, 3, 3) / 9)
        net.conv.bias.copy_(torch.tensor([0.1, -0.2]))
        net.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        net.fc.bias.zero_()
    return FvModel(net, mean=(0.0,), std=(1.0,), input_shape=(1, 12, 12), spec="dead-unit", num_classes=2)


def test_redirect_starts_a_dead_unit_and_then_hands_back_the_true_gradient():
    m = _dead_unit_model()
    kw = dict(steps=20, objective="neuron", transforms="none", param="pixel", lr=0.1)
    plain = visualize(m, "fc", [1], **kw)
    red = visualize(m, "fc", [1], relu="redirect", redirect_steps=20, **kw)
    assert plain.objective[-1, 0] == 0 and plain.images.std() < 0.02  # stuck: zero gradient, noise stays
    assert red.objective[-1, 0] > 0 and red.settings["relu"] == "redirect"
    off = visualize(m, "fc", [1], relu="redirect", redirect_steps=0, **kw)
    torch.testing.assert_close(off.images, plain.images)  # N = 0: the standard gradient throughout
    assert "forward" not in vars(m.net.relu)  # the module's own forward is back


def test_redirect_context_is_identity_when_inactive():
    m = _dead_unit_model()
    x = torch.rand(2, 1, 12, 12, requires_grad=True)
    (g0,) = torch.autograd.grad(m(x)[:, 0].sum(), x)
    with redirect_relus(m) as sw:
        sw.active = False
        (g1,) = torch.autograd.grad(m(x)[:, 0].sum(), x)
        assert sw.n_modules == 1
    torch.testing.assert_close(g0, g1)


def test_unknown_relu_mode(random_fashion):
    with pytest.raises(FvtrustError, match="unknown relu"):
        visualize(random_fashion, "fc", [0], steps=1, relu="leaky")


# ------------------------------------------------------------------ accentuation and alpha


def test_proximity_is_the_mean_channel_l2_distance():
    a = torch.randn(3, 4, 5, 5)
    r = torch.randn(3, 4, 5, 5)
    got = Proximity("l")({"l": a, "<reference>": {"l": r}}, torch.zeros(3, dtype=torch.long))
    ref = torch.sqrt(((a - r) ** 2).sum(1)).mean((1, 2))
    torch.testing.assert_close(got, ref)
    with pytest.raises(FvtrustError, match="reference"):
        Proximity("l")({"l": a}, torch.zeros(3, dtype=torch.long))


def test_accentuation_stays_near_its_seed(random_fashion):
    seeds = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    kw = dict(steps=15, seeds=seeds, proximity_layer="block2", lr=0.05)
    loose = accentuate(random_fashion, "fc", [0, 1], weight=0.0, **kw)
    tight = accentuate(random_fashion, "fc", [0, 1], weight=50.0, **kw)
    d_loose = (loose.final - seeds).abs().mean()
    d_tight = (tight.final - seeds).abs().mean()
    assert d_tight < d_loose
    assert tight.settings["accentuation"]["proximity_layer"] == "block2" and tight.settings["reference"]


def test_top_seeds_are_the_most_activating_images(random_fashion):
    imgs = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    seeds, vals = top_seeds(random_fashion, "fc", [0, 4], imgs, rows=16)
    with torch.no_grad():
        logits = random_fashion(imgs)
    assert torch.equal(seeds[1], imgs[logits[:, 4].argmax()])
    torch.testing.assert_close(vals, logits[:, [0, 4]].max(0).values)


def test_alpha_is_the_accumulated_gradient_magnitude():
    m = _dead_unit_model()
    seen = []
    res = visualize_transparent(m, "fc", [0, 1], steps=3, transforms="none", param="pixel",
                                on_step=lambda s, i, g, sl: seen.append(g.abs().clone()))
    acc = sum(seen)
    peak = acc.flatten(1).amax(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(res.alpha[0], (acc / peak)[0])
    assert torch.all(res.alpha[1] == 0)  # the dead unit's gradient never moved: no alpha
    assert res.alpha.shape == (2, 1, 12, 12)
