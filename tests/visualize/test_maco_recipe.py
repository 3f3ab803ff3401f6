"""MACO's published recipe (standardized phase, Fel et al.'s crops + noise, NAdam) and its natural value map.

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


@pytest.mark.parametrize("h,w", [(6, 8), (5, 7)])
def test_maco_image_with_standardized_phase_and_value_map_matches_the_formula(h, w):
    """x = sigmoid(a + k · standardize(irfft2(M e^{iψ}))), ψ = (φ − mean φ) / (std φ + 1e-4) per image."""
    rng = np.random.default_rng(3)
    phase = rng.normal(size=(2, 1, h, w // 2 + 1)) * 2.5 + 0.7  # not already standardized
    mag = rng.uniform(0.1, 2.0, size=(1, h, w // 2 + 1))
    a, k = -1.3, 2.2
    got = M.maco_image(torch.tensor(phase), torch.tensor(mag), (h, w), None, standardize_phase=True,
                       value_map=(torch.tensor([a]), torch.tensor([k])))
    for i in range(2):
        psi = (phase[i] - phase[i].mean()) / (phase[i].std(ddof=1) + 1e-4)
        s = _real_image_with_spectrum(mag[0], psi[0], h, w)
        s = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(got[i, 0].numpy(), 1 / (1 + np.exp(-(a + k * s))), atol=1e-10)
    # without standardization the phase is used as it is (a different image here)
    raw = M.maco_image(torch.tensor(phase), torch.tensor(mag), (h, w), None, standardize_phase=False)
    assert not torch.allclose(raw, got)


def test_maco_param_standardizes_its_phase_unless_told_not_to():
    mag = torch.rand(1, 8, 5) + 0.5
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    prm = M.Maco(magnitude=mag).make((2, 1, 8, 8), decorrelate=True, generators=gens)
    assert prm.standardize_phase
    old = M.Maco(magnitude=mag, standardize_phase=False).make((2, 1, 8, 8), decorrelate=False, generators=gens)
    assert not old.standardize_phase
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


def test_python_param_maco_takes_the_recipe_like_the_cli(random_fashion):
    """visualize(param=Maco) alone is MACO's recipe (as `fvtrust visualize --param maco`); explicit settings
    override a part of it, fft keeps lucent's, and transforms=None stays "no transforms"."""
    spec = M.Maco(data=torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    plain = visualize(random_fashion, "fc", [0, 3], steps=3, param=spec)
    recipe = visualize(random_fashion, "fc", [0, 3], steps=3, param=spec, **M.MACO_RECIPE)
    torch.testing.assert_close(plain.images, recipe.images, atol=0, rtol=0)
    assert (plain.settings["optimizer"], plain.settings["lr"]) == ("nadam", 1.0)
    lucent = visualize(random_fashion, "fc", [0, 3], steps=3, param=spec, optimizer="adam", lr=0.05,
                       transforms="standard")
    assert not torch.allclose(lucent.images, plain.images)
    fft = visualize(random_fashion, "fc", [0], steps=2)
    assert (fft.settings["optimizer"], fft.settings["lr"], fft.settings["transforms"]["pad"]) == ("adam", 0.05, 2)
    bare = visualize(random_fashion, "fc", [0], steps=2, param=spec, transforms=None)
    assert bare.settings["transforms"] is None
    named = visualize(random_fashion, "fc", [0], steps=1, param="maco")  # the model's own data's spectrum
    assert (named.settings["optimizer"], named.settings["lr"]) == ("nadam", 1.0)


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


def _moments_by_quad(a, b):
    from scipy import integrate, special

    pdf = lambda z: np.exp(-z * z / 2) / np.sqrt(2 * np.pi)  # noqa: E731
    m1 = integrate.quad(lambda z: pdf(z) * special.expit(a + b * z), -np.inf, np.inf)[0]
    m2 = integrate.quad(lambda z: pdf(z) * special.expit(a + b * z) ** 2, -np.inf, np.inf)[0]
    return m1, np.sqrt(m2 - m1 * m1)


@pytest.mark.parametrize("mean,std", [(0.284, 0.321), (0.5, 0.2), (0.8, 0.1), (0.05, 0.15)])
def test_sigmoid_params_give_the_natural_mean_and_std(mean, std):
    """(a, b) solve ∫ sigmoid(a + b z) φ(z) dz = μ and the matching std = σ (checked by adaptive quadrature,
    not the Gauss-Hermite rule the code uses)."""
    a, b = M.sigmoid_params(mean, std)
    m, s = _moments_by_quad(a, b)
    assert m == pytest.approx(mean, abs=1e-5) and s == pytest.approx(std, abs=1e-5)
    assert b > 0 and (abs(a) < 1e-6) == (mean == 0.5)
    with pytest.raises(FvtrustError, match="no sigmoid image"):
        M.sigmoid_params(mean, np.sqrt(mean * (1 - mean)) * 1.01)


def test_maco_images_take_the_natural_mean_and_contrast_of_their_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FVTRUST_CACHE", str(tmp_path))
    data = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) ** 3  # dark, like objects on black
    spec = M.Maco(data=data)
    mu, sd = float(data.mean()), float(data.flatten(1).std(1).mean())
    got_mu, got_sd = spec.natural_stats((1, 16, 16))
    assert float(got_mu) == pytest.approx(mu, abs=1e-6) and float(got_sd) == pytest.approx(sd, abs=1e-6)
    a, k = (float(v) for v in spec.value_map((1, 16, 16)))
    ref_a, ref_b = M.sigmoid_params(mu, sd)
    assert (a, k) == (pytest.approx(ref_a, abs=1e-5), pytest.approx(ref_b, abs=1e-5))  # grey: gain 1
    # uniform random phases make near-Gaussian standardized images: then the natural mean and per-image std
    phase = (torch.rand(300, 1, 16, 9, generator=torch.Generator().manual_seed(1)) * 2 - 1) * np.pi
    imgs = M.maco_image(phase, spec.magnitude((1, 16, 16)), (16, 16), value_map=spec.value_map((1, 16, 16)))
    assert float(imgs.mean()) == pytest.approx(mu, abs=0.01)
    assert float(imgs.flatten(1).std(1).mean()) == pytest.approx(sd, abs=0.015)
    plain = M.maco_image(phase, spec.magnitude((1, 16, 16)), (16, 16))
    assert float(plain.mean()) == pytest.approx(0.5, abs=0.01)
    # a start image's phase is read through the inverse map: t = (logit(x) − a) / k
    start = data[:2] * 0.9 + 0.05
    prm = spec.make((2, 1, 16, 16), start=start)
    leaf = torch.angle(torch.fft.rfft2((torch.logit(start) - a) / k))
    torch.testing.assert_close(prm.tensor.detach(), leaf, atol=1e-4, rtol=1e-4)
    # RGB: per channel, k = b / (the channel's row norm in the colour matrix)
    rgb = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.5, 0.8, 1.0]).view(3, 1, 1)
    a3, k3 = M.Maco(data=rgb).value_map((3, 8, 8))
    from fvtrust.visualize.param import COLOR_CORRELATION_NORMALIZED

    rows = np.linalg.norm(COLOR_CORRELATION_NORMALIZED.astype(np.float64), axis=1)
    for c in range(3):
        ra, rb = M.sigmoid_params(float(rgb[:, c].mean()), float(rgb[:, c].flatten(1).std(1).mean()))
        assert float(a3[c]) == pytest.approx(ra, abs=1e-5) and float(k3[c]) == pytest.approx(rb / rows[c], rel=1e-5)
    assert [v.tolist() for v in M.Maco(magnitude=torch.ones(1, 16, 9)).value_map((1, 16, 16))] == [[0.0], [1.0]]
    a1, k1 = M.Maco(data=data, value_stats=(0.3, 0.2)).value_map((1, 16, 16))
    assert (float(a1), float(k1)) == tuple(pytest.approx(v, abs=1e-5) for v in M.sigmoid_params(0.3, 0.2))
    for bad in [(1.5, 0.1), (0.5, 0.6), "natural-ish"]:
        with pytest.raises(FvtrustError, match="value_stats"):
            M.Maco(data=data, value_stats=bad)


def test_the_natural_value_stats_are_cached_with_the_spectrum(tmp_path, monkeypatch):
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
    first = M.Maco(data="folder", limit=30).natural_stats((1, 10, 10))
    again = M.Maco(data="folder", limit=30).natural_stats((1, 10, 10))  # from disk
    assert calls == ["folder"] and 0.2 < float(first[0]) < 0.3 and 0.1 < float(first[1]) < 0.2
    for f, g in zip(first, again):
        assert float(f) == pytest.approx(float(g))
