"""Exact ReLU networks for the constructions, and their feature visualizations."""
import numpy as np
import pytest
import torch

from fvtrust.theory import (CLASS_INFO, CLASSES, counterexamples, phi_minmax, relu_fv_model, relu_network,
                            sup_error)
from fvtrust.theory.relu_nets import fit_piecewise_affine_1d
from fvtrust.theory.sampling import random_member


@pytest.mark.parametrize("cls", CLASSES)
def test_relu_networks_match_closed_forms(cls):
    rng = np.random.default_rng(3)
    d = CLASS_INFO[cls].d
    for _ in range(6):
        f, params = random_member(cls, rng)
        for g in counterexamples(cls, phi_minmax(f, d), **params):
            x = rng.random((500, d)) if d == 2 else np.concatenate([rng.random(500), g.candidate_points()])
            net = relu_network(g)
            assert np.max(np.abs(net.as_function()(x) - g(x))) <= 1e-6
            net32 = relu_network(g, dtype=torch.float32)
            assert net32.out.weight.dtype == torch.float32
            scale = 1 + float(net32.out.weight.abs().sum() + net32.out.bias.abs().sum())
            assert np.max(np.abs(net32.as_function()(x) - g(x))) <= 1e-6 * scale


def test_relu_network_input_shapes():
    f1, _ = counterexamples("monotone", (0.2, 0.7, 0.1, 0.9))
    net = relu_network(f1)
    x = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
    expect = torch.as_tensor(f1(x.numpy()))
    assert net(x).shape == (4,) and torch.allclose(net(x), expect)
    assert net(x[:, None]).shape == (4, 1)
    img = x.reshape(4, 1, 1, 1).float()
    assert net(img).shape == (4, 1, 1, 1)
    rgb = img.expand(4, 3, 1, 1)  # 3 equal channels average to the same input
    assert torch.allclose(net(rgb).reshape(-1), expect, atol=1e-6)
    a1, _ = counterexamples("affine", (np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.1, 0.9))
    net2 = relu_network(a1)
    pts = torch.rand(5, 2, dtype=torch.float64)
    assert torch.allclose(net2(pts).reshape(-1), torch.as_tensor(a1(pts.numpy())))
    assert net2(pts.reshape(5, 1, 1, 2)).shape == (5, 1, 1, 1)


def test_fit_recovers_random_relu_network():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1)).double()

    def f(x):
        with torch.no_grad():
            return layer(torch.as_tensor(np.asarray(x, float)).reshape(-1, 1)).reshape(-1).numpy()

    g = fit_piecewise_affine_1d(f)
    assert g is not None
    x = np.random.default_rng(0).random(1000)
    assert np.max(np.abs(g(x) - f(x))) <= 1e-9
    assert fit_piecewise_affine_1d(lambda x: np.asarray(x) ** 2) is None


# -- feature visualization of f1 and f2 with fvtrust's own engine -------------------------

def _visualize():
    vis = pytest.importorskip("fvtrust.visualize")
    if not hasattr(vis, "visualize"):
        pytest.skip("fvtrust.visualize.visualize not available yet")
    return vis.visualize


def _run(f, steps, start=None):
    kw = {} if start is None else {"start": torch.full((1, 1, 1, 1), float(start))}
    res = _visualize()(relu_fv_model(f), "out", [0], steps=steps, param="pixel", transforms=None,
                       decorrelate=False, size=(1, 1), seed=0, **kw)
    return float(res.images[-1, 0].mean()), float(res.objective[-1, 0])


def test_visualization_identical_for_convex_pair():
    """Thm 3 pair: both rise on [(x_min+1)/2, 1], so gradient ascent from x = 0.9 takes the
    same path for both (Adam is scale-invariant) to the shared argmax x_max = 1 -- while
    f1 and f2 differ by (f_max - f_min)/2 at x = 0.65."""
    phi = (0.3, 1.0, 0.1, 0.9)
    f1, f2 = counterexamples("convex", phi)
    (x1, v1), (x2, v2) = _run(f1, 512, start=0.9), _run(f2, 512, start=0.9)
    assert x1 == pytest.approx(x2, abs=1e-6) and x1 > 0.995
    assert v1 > phi[3] - 0.01 and v2 > phi[3] - 0.01
    assert sup_error(f1, f2) == pytest.approx(0.4)


def test_visualization_identical_for_monotone_pair_full_range():
    """Thm 1 pair with x_max = 0.45 < 0.5: the engine's default start (grey, x ~ 0.5) already
    maximizes both (flat at f_max there), so both visualizations are the same image with
    value f_max -- yet ||f1 - f2|| = f_max - f_min."""
    phi = (0.1, 0.45, 0.1, 0.9)
    f1, f2 = counterexamples("monotone", phi)
    (x1, v1), (x2, v2) = _run(f1, 64), _run(f2, 64)
    assert x1 == pytest.approx(x2, abs=1e-7)
    assert v1 == pytest.approx(phi[3], abs=1e-6) and v2 == pytest.approx(phi[3], abs=1e-6)
    assert sup_error(f1, f2) == pytest.approx(phi[3] - phi[2])


def test_visualization_reaches_max_with_real_ascent():
    """Thm 1 pair with x_max = 0.9: f1 must climb from x ~ 0.5 (its ramp is [0.45, 0.9]);
    both runs end at value f_max, i.e. both reveal the same (argmax value, f_max)."""
    phi = (0.0, 0.9, 0.1, 0.9)
    f1, f2 = counterexamples("monotone", phi)
    (x1, v1), (x2, v2) = _run(f1, 512), _run(f2, 512)
    assert x1 >= 0.9 - 1e-3 and v1 == pytest.approx(phi[3], abs=1e-3)
    assert v2 == pytest.approx(phi[3], abs=1e-6)
