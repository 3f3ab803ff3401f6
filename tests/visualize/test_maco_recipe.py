"""MACO's published recipe: standardized phase, grey luminance, Fel et al.'s crops + noise, NAdam.

References are written from the formulas (explicit DFT sums, scipy's bilinear
sampling), not from the code under test.
"""
import numpy as np
import pytest
import torch
from scipy import ndimage

from fvtrust.errors import FvtrustError
from fvtrust.visualize import transforms as T
from fvtrust.visualize import visualize
from fvtrust.visualize import maco as M

# lucid's colour correlation square root, written out (ImageNet)
LUCID_COLOR = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def _real_image_with_spectrum(mag, psi, h, w):
    """s[n] = Re(1/(HW) Σ_k F[k] e^{2πi(ky ny/H + kx nx/W)}), F = M e^{iψ} on the rfft half-plane, Hermitian-completed."""
    half = mag * np.exp(1j * psi)
    full = np.zeros((h, w), dtype=complex)
    for ky in range(h):
        for kx in range(w):
            full[ky, kx] = half[ky, kx] if kx <= w // 2 else np.conj(half[(-ky) % h, w - kx])
    ny, nx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    s = np.zeros((h, w))
    for ky in range(h):
        for kx in range(w):
            s += (full[ky, kx] * np.exp(2j * np.pi * (ky * ny / h + kx * nx / w))).real
    return s / (h * w)


def test_grey_luminance_weight_is_the_channel_mean_of_the_colour_image():
    normalized = LUCID_COLOR / np.linalg.norm(LUCID_COLOR, axis=0).max()
    lum = normalized[:, 0].mean()
    assert M.luminance_weight() == pytest.approx(lum, abs=1e-7)
    assert lum == pytest.approx(1 / np.sqrt(3), abs=1e-3)
    # the grey (channel mean) of colour(z) is lum * z0: the chroma columns sum to zero
    z = np.random.default_rng(0).normal(size=(3, 50))
    np.testing.assert_allclose((normalized @ z).mean(0), lum * z[0], atol=1e-12)
    grey = M.maco_color(1, True, "cpu")
    assert grey.shape == (1, 1) and float(grey) == pytest.approx(lum, abs=1e-7)
    assert M.maco_color(1, False, "cpu") is None  # --no-decorrelate: the plain sigmoid


@pytest.mark.parametrize("h,w", [(6, 8), (5, 7)])
def test_maco_image_with_standardized_phase_and_luminance_matches_the_formula(h, w):
    """x = sigmoid(L · standardize(irfft2(M e^{iψ}))), ψ = (φ − mean φ) / (std φ + 1e-4) per image."""
    rng = np.random.default_rng(3)
    phase = rng.normal(size=(2, 1, h, w // 2 + 1)) * 2.5 + 0.7  # not already standardized
    mag = rng.uniform(0.1, 2.0, size=(1, h, w // 2 + 1))
    lum = 0.577
    got = M.maco_image(torch.tensor(phase), torch.tensor(mag), (h, w), torch.tensor([[lum]], dtype=torch.float64),
                       standardize_phase=True)
    for i in range(2):
        psi = (phase[i] - phase[i].mean()) / (phase[i].std(ddof=1) + 1e-4)
        s = _real_image_with_spectrum(mag[0], psi[0], h, w)
        s = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(got[i, 0].numpy(), 1 / (1 + np.exp(-lum * s)), atol=1e-10)
    # without standardization the phase is used as it is (a different image here)
    raw = M.maco_image(torch.tensor(phase), torch.tensor(mag), (h, w), None, standardize_phase=False)
    assert not torch.allclose(raw, got)


def test_grey_maco_param_standardizes_its_phase_and_uses_the_luminance():
    mag = torch.rand(1, 8, 5) + 0.5
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    prm = M.Maco(magnitude=mag).make((2, 1, 8, 8), decorrelate=True, generators=gens)
    assert prm.standardize_phase and float(prm.color) == pytest.approx(M.luminance_weight())
    old = M.Maco(magnitude=mag, standardize_phase=False).make((2, 1, 8, 8), decorrelate=False, generators=gens)
    assert not old.standardize_phase and old.color is None
    # a start image keeps its own (unstandardized) phase
    start = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    assert not M.Maco(magnitude=mag).make((2, 1, 8, 8), start=start).standardize_phase


def _crop_reference(img, centre, side, out_hw):
    """A crop of side `side` (image fraction) centred at `centre` (x, y fractions), sampled bilinearly with
    zeros outside the image: output pixel j sits at image position (c − side/2)·W + (j + ½)·side·W/Wo, in pixel
    units whose centres are at integer + ½ (so the sample index is that position − ½)."""
    c, h, w = img.shape
    oh, ow = out_hw
    ys = (centre[1] - side / 2) * h + (np.arange(oh) + 0.5) * side * h / oh - 0.5
    xs = (centre[0] - side / 2) * w + (np.arange(ow) + 0.5) * side * w / ow - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([ndimage.map_coordinates(img[k], [yy, xx], order=1, mode="grid-constant", cval=0.0)
                     for k in range(c)])


@pytest.mark.parametrize("out_hw", [(12, 12), (7, 9)])
def test_maco_crops_match_bilinear_sampling(out_hw):
    rng = np.random.default_rng(4)
    imgs = rng.uniform(size=(2, 2, 12, 12))
    spec = T.CropSpec(crops=3, noise=0.0)
    d = T.CropDraw(centres=np.array([[0.5, 0.5], [0.41, 0.63], [0.7, 0.2]]), sides=np.array([1.0, 1.07, 0.6]),
                   noise_seed=0)
    got = T.apply(torch.tensor(imgs), spec, d, out_hw=out_hw)
    assert got.shape == (6, 2, *out_hw)
    for i in range(2):
        for k in range(3):
            ref = _crop_reference(imgs[i], d.centres[k], d.sides[k], out_hw)
            np.testing.assert_allclose(got[i * 3 + k].numpy(), ref, atol=1e-9)
    if out_hw == (12, 12):
        np.testing.assert_allclose(got[0].numpy(), imgs[0], atol=1e-9)  # the full centred crop at the same size


def test_maco_crop_noise_is_gaussian_plus_uniform_and_shared_by_the_batch():
    spec = T.CropSpec(crops=2, box=(0.5, 0.5), centre_sd=0.0, noise=0.2)
    d = T.draw(spec, np.random.default_rng(0))
    x = T.apply(torch.zeros(3, 1, 64, 64), spec, d)  # crops of a black image: only the noise
    noise = x.view(3, 2, -1)
    torch.testing.assert_close(noise[0], noise[2])  # the same draw for every image
    assert not torch.allclose(noise[0, 0], noise[0, 1])  # a new draw per view
    # N(0, σ²) + U(−σ/2, σ/2): mean 0, variance σ² + σ²/12
    assert abs(float(noise.mean())) < 0.01
    assert float(noise[0].std()) == pytest.approx(0.2 * np.sqrt(1 + 1 / 12), rel=0.03)


def test_maco_draws_follow_the_recipe():
    spec = T.CropSpec()
    ds = [T.draw(spec, np.random.default_rng(s)) for s in range(300)]
    sides = np.concatenate([d.sides for d in ds])
    centres = np.concatenate([d.centres for d in ds])
    assert sides.min() >= 1.0 and sides.max() <= 1.1 and len(ds[0].sides) == 6
    assert centres.mean() == pytest.approx(0.5, abs=0.01) and centres.std() == pytest.approx(0.15, rel=0.05)
    assert T.resolve_transforms("maco", 28) == T.CropSpec()
    with pytest.raises(FvtrustError, match="standard, maco, none"):
        T.resolve_transforms("crops", 28)


def test_the_objective_is_the_mean_over_an_images_views(random_fashion):
    """Three identical views (full centred crops, no noise) must give exactly the gradient of one view: under
    SGD a sum over views would triple the step."""
    spec = T.CropSpec(crops=3, box=(1.0, 1.0), centre_sd=0.0, noise=0.0)
    kw = dict(steps=3, param="pixel", optimizer="sgd", lr=5.0, seed=1)
    views = visualize(random_fashion, "fc", [0, 4], transforms=spec, **kw)
    one = visualize(random_fashion, "fc", [0, 4], transforms="none", **kw)
    torch.testing.assert_close(views.images, one.images, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one.images[-1], visualize(random_fashion, "fc", [0, 4], transforms="none",
                                                        **{**kw, "lr": 15.0}).images[-1])


def test_maco_recipe_is_batch_invariant(random_fashion):
    spec = M.Maco(data=torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    kw = dict(steps=4, param=spec, **M.MACO_RECIPE)
    both = visualize(random_fashion, "fc", [0, 3], **kw)
    alone = visualize(random_fashion, "fc", [3], **kw)
    torch.testing.assert_close(both.images[:, 1], alone.images[:, 0])
    assert both.settings["optimizer"] == "nadam" and both.settings["transforms"]["kind"] == "maco-crops"


def test_unknown_optimizer_names_the_choices(random_fashion):
    with pytest.raises(FvtrustError, match="adam, nadam, sgd"):
        visualize(random_fashion, "fc", [0], steps=1, optimizer="rmsprop")


def test_cli_param_maco_uses_the_recipe_unless_told_otherwise(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from fvtrust.cli import main

    real = M.Maco
    monkeypatch.setattr(M, "Maco", lambda data=None, **kw: real(data=torch.rand(8, 1, 28, 28), **kw))

    def settings(*extra):
        out = tmp_path / f"o{len(extra)}"
        r = CliRunner().invoke(main, ["visualize", "fashion-cnn", "fc", "--units", "0", "--steps", "2", "--param",
                                      "maco", "--weights", "random", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((out / "visualization.json").read_text())["settings"]

    s = settings()
    assert (s["optimizer"], s["lr"], s["transforms"]["kind"]) == ("nadam", 1.0, "maco-crops")
    s = settings("--optimizer", "adam", "--lr", "0.05", "--transforms", "standard")
    assert (s["optimizer"], s["lr"], s["transforms"]["pad"]) == ("adam", 0.05, 2)


@pytest.mark.parametrize("mean,gain", [(0.284, 0.577), (0.5, 1.0), (0.8, 0.59), (0.05, 2.0)])
def test_sigmoid_offset_gives_the_natural_mean(mean, gain):
    """a solves ∫ sigmoid(a + g z) φ(z) dz = μ (checked by adaptive quadrature, not the Gauss-Hermite rule)."""
    from scipy import integrate, special

    a = M.sigmoid_offset(mean, gain)
    got, _ = integrate.quad(lambda z: np.exp(-z * z / 2) / np.sqrt(2 * np.pi) * special.expit(a + gain * z),
                            -np.inf, np.inf)
    assert got == pytest.approx(mean, abs=1e-8)
    assert (a == pytest.approx(0.0, abs=1e-9)) == (mean == 0.5)


def test_maco_images_take_the_natural_mean_of_their_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path))
    data = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) ** 3  # mean 1/4, like dark data
    spec = M.Maco(data=data)
    mu = float(data.mean())
    assert float(spec.natural_mean((1, 16, 16))) == pytest.approx(mu, abs=1e-6)
    a = float(spec.offsets((1, 16, 16)))
    assert a == pytest.approx(M.sigmoid_offset(mu, M.luminance_weight()), abs=1e-6)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    imgs = spec.make((200, 1, 16, 16), generators=gens).image().detach()
    assert float(imgs.mean()) == pytest.approx(mu, abs=0.01)  # random phases: the natural mean on average
    old = M.Maco(data=data, value_mean=None).make((200, 1, 16, 16), generators=gens).image().detach()
    assert float(old.mean()) == pytest.approx(0.5, abs=0.01)
    # a start image is still reproduced through the offset (inverse: logit − a, then the inverse colour)
    start = data[:2] * 0.9 + 0.05
    prm = spec.make((2, 1, 16, 16), start=start)
    leaf = torch.angle(torch.fft.rfft2((torch.logit(start) - a) / M.luminance_weight()))
    torch.testing.assert_close(prm.tensor.detach(), leaf, atol=1e-4, rtol=1e-4)
    assert M.Maco(magnitude=torch.ones(1, 16, 9)).offsets((1, 16, 16)).tolist() == [0.0]  # no data, no mean
    assert float(M.Maco(data=data, value_mean=0.3).offsets((1, 16, 16))) == pytest.approx(
        M.sigmoid_offset(0.3, M.luminance_weight()), abs=1e-6)
    with pytest.raises(FvtrustError, match="value_mean"):
        M.Maco(data=data, value_mean=1.5)


def test_the_natural_mean_is_cached_with_the_spectrum(tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path))
    from fvtrust.data.natural import NaturalData
    import fvtrust.data

    calls = []

    def fake_natural(source, *, input_shape, data_dir=None, **kw):
        calls.append(source)
        x = torch.rand(30, *input_shape, generator=torch.Generator().manual_seed(1)) * 0.5
        data = NaturalData(torch.utils.data.TensorDataset(x, torch.zeros(30, dtype=torch.long)), str(source))
        data.parts["fit"] = data.select(range(30), role="fit")
        return data

    monkeypatch.setattr(fvtrust.data, "natural", fake_natural)
    first = M.Maco(data="folder", limit=30).natural_mean((1, 10, 10))
    again = M.Maco(data="folder", limit=30).natural_mean((1, 10, 10))  # from disk
    assert calls == ["folder"] and float(first) == pytest.approx(float(again)) and 0.2 < float(first) < 0.3
