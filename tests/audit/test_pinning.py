"""fvtrust.audit.pinning: the two probes, the within-layer z-scores, and the weight-noise context the benchmarks
use, against references."""
import dataclasses

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from fvtrust.audit import pinning as P
from fvtrust.audit.probes import START_SD
from fvtrust.models import FvModel
from fvtrust.visualize import transforms as T
from fvtrust.visualize.param import make_param


def test_pearson_rows_is_numpys_corrcoef_row_by_row():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 4, 5, generator=g), torch.randn(3, 1, 4, 5, generator=g)
    b[2] = 2 * a[2] + 1  # an exact positive relation
    want = [np.corrcoef(a[i].flatten(), b[i].flatten())[0, 1] for i in range(3)]
    assert np.allclose(P.pearson_rows(a, b).numpy(), want, atol=1e-12)
    assert float(P.pearson_rows(a, b)[2]) == pytest.approx(1.0)


def test_robust_z_is_scipys_normal_scaled_mad():
    rng = np.random.default_rng(0)
    v = rng.normal(size=40)
    v[3] = 9.0  # the outlier the signal looks for does not move its own scale
    want = (v - np.median(v)) / scipy.stats.median_abs_deviation(v, scale="normal")
    assert np.allclose(P.robust_z(v), want, rtol=1e-4)  # 1.4826 vs scipy's 1/Phi^-1(3/4)
    assert P.robust_z(v)[3] > 5


def test_robust_z_edge_cases():
    v = np.arange(30, dtype=float)
    defined = np.ones(30, bool)
    defined[:10] = False                          # 20 defined: fewer than MIN_UNITS
    assert np.isnan(P.robust_z(v, defined)).all()
    assert np.isnan(P.robust_z(np.ones(30))).all()  # no spread: MAD 0
    w = v.copy()
    w[5] = np.nan                                  # NaN entries are left out of the median and stay NaN
    z = P.robust_z(w)
    keep = np.delete(w, 5)
    assert np.isnan(z[5]) and z[0] == pytest.approx((0 - np.median(keep)) / scipy.stats.median_abs_deviation(
        keep, scale="normal"), rel=1e-4)
    d = np.ones(30, bool)
    d[0] = False                                   # an undefined entry (a failed unit) is NaN, not scored
    z = P.robust_z(v, d)
    assert np.isnan(z[0]) and np.isfinite(z[1:]).all()


def test_pinning_is_stouffers_combination_and_needs_both():
    """pinning = (z_seed + z_coherence) / sqrt(2), which is scipy's Stouffer combination of the one-sided p-values
    of the two z-scores read back as a z-score; undefined where either probe or the unit is."""
    rng = np.random.default_rng(1)
    a, c = (rng.normal(size=40) for _ in range(2))
    a[0], c[0] = 6.0, 4.0   # stands out on both
    a[1] = 9.0              # stands out on one only: its combination is z / sqrt(2) plus the other's
    c[2] = np.nan           # one probe undefined: pinning undefined
    defined = np.ones(40, bool)
    defined[4] = False      # a failed unit: undefined, and out of the layer's median and MAD
    out = P.pinning(a, c, defined=defined)
    z = np.stack([P.robust_z(a, defined), P.robust_z(c, defined)])
    for i in (0, 1, 5):
        p = scipy.stats.norm.sf(z[:, i])
        want = scipy.stats.norm.isf(scipy.stats.combine_pvalues(p, method="stouffer").pvalue)
        assert out["pinning"][i] == pytest.approx(want, rel=1e-6)
    assert out["pinning"][0] > out["pinning"][1] > 0   # both at once outweighs one alone here
    assert np.isnan(out["pinning"][2]) and np.isnan(out["pinning"][4])
    assert np.allclose(out["z.seed_agreement"], z[0], equal_nan=True)
    assert np.allclose(out["z.gradient_coherence"], z[1], equal_nan=True)


def test_perturbed_parameters_adds_relative_noise_and_restores_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Linear(2, 1))
    net[2].bias.data.fill_(0.3)       # a one-element tensor: left alone
    net[1].running_mean.fill_(0.7)    # a buffer: left alone
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w = net[0].weight
    with P.perturbed_parameters(net, 0.05, torch.Generator().manual_seed(3)):
        d = (w - before["0.weight"]).flatten()
        assert float(d.detach().std() / before["0.weight"].std()) == pytest.approx(0.05, rel=0.25)
        assert torch.equal(net[2].bias, before["2.bias"]) and torch.equal(net[1].running_mean, before["1.running_mean"])
        first = w.detach().clone()
    with P.perturbed_parameters(net, 0.05, torch.Generator().manual_seed(3)):
        assert torch.equal(w, first)  # the same generator seed: the same perturbation
    with pytest.raises(RuntimeError):
        with P.perturbed_parameters(net, 0.05, torch.Generator().manual_seed(4)):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1))
    m = FvModel(net, mean=[0.0], std=[1.0], input_shape=(1, 12, 12), spec="test-net")
    vis = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    return net, m, vis


def test_gradient_coherence_against_a_per_line_reference():
    """The batched probe equals a plain autograd loop over units and starts (same draws, same leaves)."""
    net, m, vis = _tiny()
    got = P.gradient_coherence(m, "2", vis, [0, 1], lines=3, seed=5, batch_size=4)  # batches split the lines
    spec = T.TransformSpec.standard(12)
    rng = np.random.default_rng(5)
    ds = [T.draw(spec, rng) for _ in range(P.TRANSFORM_DRAWS)]
    th_v = make_param("fft", (2, 1, 12, 12), start=vis).tensor.detach()
    base = make_param("fft", (3, 1, 12, 12), sd=START_SD,
                      generators=[torch.Generator().manual_seed(5 * 100003 + s) for s in range(3)])
    want = []
    for u in range(2):
        cs = []
        for s in range(3):
            gs = []
            for pt in P.LINE_POINTS:
                th = (base.tensor.detach()[s] + pt * (th_v[u] - base.tensor.detach()[s]))[None].clone().requires_grad_(True)
                img = dataclasses.replace(base, tensor=th, shape=(1, 1, 12, 12)).image()
                val = sum(net(T.apply(img, spec, d))[0, u].mean() for d in ds)
                gs.append(torch.autograd.grad(val, th)[0].flatten().double())
            cs.append(float(gs[0] @ gs[1] / (gs[0].norm() * gs[1].norm())))
        want.append(float(np.median(cs)))
    assert np.allclose(got.numpy(), want, atol=1e-6)
    assert all(p.requires_grad for p in net.parameters())  # handed back as it was


def test_pinning_probes_read_a_planted_attractor():
    """A unit made one fixed image's bowl (-||x - t||^2, t a smooth blob) is the same from every seed and its
    field points one way along the line; 31 texture units beside it (a filter's best match, wherever the start
    noise puts it) are not: the bowl unit is the layer's most pinned."""
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    blob = (0.2 + 0.6 * torch.exp(-((yy - 4) ** 2 + (xx - 7) ** 2) / 8))[None, None]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 31, 3, padding=1)
            self.target = nn.Parameter(blob.clone())

        def forward(self, x):
            tex = torch.tanh(self.conv(torch.tanh(3 * (x - 0.5)))).amax((2, 3), keepdim=True)
            bowl = -((x - self.target) ** 2).sum((1, 2, 3), keepdim=True)
            return torch.cat([bowl, tex], 1).expand(-1, -1, *x.shape[2:])

    torch.manual_seed(0)
    m = FvModel(nn.Sequential(Layer()), mean=[0.0], std=[1.0], input_shape=(1, 12, 12), spec="test-bowl")
    from fvtrust.visualize import visualize

    units = list(range(32))
    vis = visualize(m, "0", units, steps=64, objective="channel", seed=0, progress_desc=None).final
    raw = P.pinning_probes(m, "0", units, vis, steps=64, seed=0, lines=4)
    assert set(raw) == {"seed_agreement", "gradient_coherence"} and all(v.shape == (32,) for v in raw.values())
    assert float(raw["seed_agreement"][0]) > 0.9 and float(raw["gradient_coherence"][0]) > 0.9
    assert float(raw["seed_agreement"][0]) > np.median(raw["seed_agreement"].numpy())
    out = P.pinning(raw["seed_agreement"], raw["gradient_coherence"], defined=np.ones(32, bool))
    assert int(np.nanargmax(out["pinning"])) == 0
