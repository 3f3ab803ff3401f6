import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fvtrust.errors import FvtrustError
from fvtrust.linearity import (
    angle_degrees,
    line_distances,
    path_metrics,
    segment_distances,
)
from fvtrust.linearity import paths as paths_module
from fvtrust.models.wrappers import FvModel
from fvtrust.visualize import visualize


def linear_model():
    """A unit that is an affine function of the input: normalize (affine) then a conv, nothing else."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 3, 3, padding=1))
    return FvModel(net, mean=(0.3,), std=(0.5,), input_shape=(1, 8, 8), spec="tiny-linear")


def relu_model():
    torch.manual_seed(3)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 8, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(8, 4, 3, padding=1))
    net.add_module("relu2", nn.ReLU())
    return FvModel(net, mean=(0.3,), std=(0.5,), input_shape=(1, 8, 8), spec="tiny-relu")


RAW = {"param": "raw", "transforms": "none"}


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 0.05)])
@pytest.mark.parametrize("line_mode", ["store", "two-pass"])
def test_linear_unit_has_straight_paths(optimizer, lr, line_mode):
    starts = torch.rand(3, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    r = path_metrics(linear_model(), "conv", [0, 1, 2], starts, steps=24, objective="channel", optimizer=optimizer,
                     lr=lr, line_mode=line_mode, **RAW)
    assert r.agpa.shape == r.aldp.shape == (3, 23) and r.aga.shape == r.ald.shape == (3,)
    assert np.all(r.angles == 0.0)  # constant gradient: identical normalized vectors, exactly 0 degrees
    assert np.all(r.aga == 0.0)
    assert np.abs(r.distances).max() < 1e-4 and np.abs(r.ald).max() < 1e-5
    assert np.all(r.start_end > 0.05)  # the path did go somewhere
    assert np.all(r.objective_final > r.objective_start)
    assert r.diagnostics["line_mode"] == line_mode


def test_nonlinear_unit_bends():
    starts = torch.rand(4, 3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    r = path_metrics(relu_model(), "relu2", [0, 1, 2, 3], starts, steps=40, optimizer="adam", lr=0.1, **RAW)
    assert np.all(r.aga > 0.5), r.aga
    assert np.all(r.ald > 1e-3), r.ald
    assert np.all(r.objective_final >= r.objective_start)


def test_default_visualization_settings_bend_too(random_fashion):
    starts = torch.rand(2, 3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    r = path_metrics(random_fashion, "block2", [0, 5], starts, steps=10)
    assert np.all(r.aga > 0) and np.all(r.ald > 0)
    assert r.settings["param"] == "fft" and r.settings["transforms"] == "standard"


def test_equations_against_recorded_trajectory(random_fashion):
    """Recompute eqs. 12-18 naively from visualize's recorded gradients and images."""
    units, m, steps = [1, 4], 3, 12
    starts = torch.rand(len(units), m, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    r = path_metrics(random_fashion, "block2", units, starts, steps=steps, seed=3)
    flat_units = [u for u in units for _ in range(m)]
    ref = visualize(random_fashion, "block2", flat_units, steps=steps, start=starts.reshape(-1, 1, 28, 28),
                    objective="channel", seed=3, record_gradients=True)
    g = ref.gradients.reshape(steps, len(flat_units), -1).double()
    g = g / g.norm(dim=2, keepdim=True)
    cos = (g[:-1] * g[1:]).sum(2).clamp(-1, 1)
    a = torch.rad2deg(torch.acos(cos)).T.reshape(len(units), m, steps - 1).numpy()  # eq. 12
    np.testing.assert_allclose(r.angles, a, atol=2e-3)
    np.testing.assert_allclose(r.agpa, a.mean(1), atol=2e-3)  # eq. 13
    np.testing.assert_allclose(r.aga, a.mean((1, 2)), atol=2e-3)  # eq. 14
    traj = ref.trajectory.reshape(steps + 1, len(flat_units), -1).double()
    xs, xf = traj[0], traj[-1]
    alphas = torch.linspace(0, 1, 20001, dtype=torch.float64)
    d = np.empty((len(flat_units), steps - 1))
    for i in range(len(flat_units)):
        seg = xs[i] + alphas[:, None] * (xf[i] - xs[i])  # eq. 15
        d[i] = torch.cdist(traj[1:steps, i], seg).min(1).values.numpy() / float((xf[i] - xs[i]).norm())  # eq. 16
    d = d.reshape(len(units), m, steps - 1)
    np.testing.assert_allclose(r.distances, d, atol=1e-4)
    np.testing.assert_allclose(r.aldp, d.mean(1), atol=1e-4)  # eq. 17
    np.testing.assert_allclose(r.ald, d.mean((1, 2)), atol=1e-4)  # eq. 18
    np.testing.assert_allclose(r.start_end, (xf - xs).norm(dim=1).reshape(len(units), m).numpy(), rtol=1e-5)


def test_store_and_two_pass_agree(random_fashion):
    starts = torch.rand(2, 2, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    a = path_metrics(random_fashion, "block1", [0, 3], starts, steps=8, line_mode="store")
    b = path_metrics(random_fashion, "block1", [0, 3], starts, steps=8, line_mode="two-pass")
    np.testing.assert_allclose(a.distances, b.distances, atol=1e-9)
    np.testing.assert_array_equal(a.angles, b.angles)
    assert b.diagnostics["endpoint_deviation"] == 0.0
    # auto stores when the trajectory fits, streams otherwise
    c = path_metrics(random_fashion, "block1", [0, 3], starts, steps=8, line_mode="auto", max_store_bytes=10)
    assert c.diagnostics["line_mode"] == "two-pass"
    np.testing.assert_allclose(a.distances, c.distances, atol=1e-9)


def test_groups_match_one_batch(random_fashion):
    starts = torch.rand(3, 2, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    a = path_metrics(random_fashion, "block1", [0, 1, 2], starts, steps=6)
    b = path_metrics(random_fashion, "block1", [0, 1, 2], starts, steps=6, group_size=1)
    np.testing.assert_allclose(a.angles, b.angles, atol=1e-3)
    np.testing.assert_allclose(a.distances, b.distances, atol=1e-4)


def test_line_distance_matches_dense_segment():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    v = end - start
    # points before the start, beyond the end, and beside the middle of each segment
    pts = torch.stack([start - 0.7 * v + 0.1 * torch.randn(5, 7, generator=g),
                       end + 0.4 * v + 0.3 * torch.randn(5, 7, generator=g),
                       start + 0.5 * v + torch.randn(5, 7, generator=g), start, end], dim=1)
    got = line_distances(pts, start, end)
    alphas = torch.linspace(0, 1, 200001, dtype=torch.float64)
    for i in range(5):
        seg = start[i].double() + alphas[:, None] * v[i].double()
        want = torch.cdist(pts[i].double(), seg).min(1).values / v[i].double().norm()
        np.testing.assert_allclose(got[i].numpy(), want.numpy(), atol=1e-5)
    assert torch.all(got[:, 3:] < 1e-7)  # both ends lie on the segment


def test_degenerate_segment():
    q_still = torch.zeros(1, 4)
    q_moved = torch.tensor([[0.0, 0.5, 0.2, 0.0]])
    vv = torch.zeros(1)
    assert torch.equal(segment_distances(torch.zeros(1, 4), q_still, vv), torch.zeros(1, 4, dtype=torch.float64))
    assert torch.isnan(segment_distances(torch.zeros(1, 4), q_moved, vv)).all()


def test_angle_degrees():
    e = torch.eye(3)
    assert angle_degrees(e[:1], e[:1]).item() == 0.0
    assert angle_degrees(e[:1], e[1:2]).item() == pytest.approx(90.0)
    assert angle_degrees(e[:1], -e[:1]).item() == pytest.approx(180.0)
    a = torch.nn.functional.normalize(torch.randn(50, 9, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(50, 9, dtype=torch.float64), dim=1)
    torch.testing.assert_close(angle_degrees(a, b), torch.rad2deg(torch.acos((a * b).sum(1))))
    tiny = torch.tensor([[1.0, 1e-6]], dtype=torch.float64)
    tiny = tiny / tiny.norm()
    one = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert angle_degrees(one, tiny).item() == pytest.approx(math.degrees(1e-6), rel=1e-6)


def test_dead_unit_is_undefined_not_zero():
    model = linear_model()
    with torch.no_grad():
        model.net.conv.weight[1].zero_()  # unit 1 ignores its input: zero gradient everywhere
    starts = torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    r = path_metrics(model, "conv", [0, 1], starts, steps=6, **RAW)
    assert np.isnan(r.angles[1]).all() and np.isnan(r.aga[1]) and r.aga[0] == 0.0
    assert np.all(r.distances[1] == 0) and r.ald[1] == 0  # never moved: a point is trivially straight
    assert r.diagnostics["zero_gradient_steps"] == 3 * 6


def test_cache_resumes(tmp_path, monkeypatch, random_fashion):
    starts = torch.rand(2, 2, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    a = path_metrics(random_fashion, "block1", [2, 7], starts, steps=5, cache_dir=tmp_path, group_size=1)
    assert len(list(tmp_path.glob("unit*.npz"))) == 2

    def boom(*args, **kw):
        raise AssertionError("cached units must not be recomputed")

    monkeypatch.setattr(paths_module, "visualize", boom)
    b = path_metrics(random_fashion, "block1", [2, 7], starts, steps=5, cache_dir=tmp_path)
    assert b.diagnostics["cached_units"] == [2, 7]
    np.testing.assert_array_equal(a.angles, b.angles)
    np.testing.assert_array_equal(a.distances, b.distances)
    with pytest.raises(AssertionError):  # other settings are a different cache entry
        path_metrics(random_fashion, "block1", [2, 7], starts, steps=5, lr=0.01, cache_dir=tmp_path)


def test_to_dict_is_json(random_fashion):
    d = path_metrics(random_fashion, "block1", [0], torch.rand(1, 2, 1, 28, 28), steps=3).to_dict(per_start=True)
    json.dumps(d)
    assert len(d["agpa"][0]) == 2 and len(d["angles"][0][0]) == 2


def test_bad_input(random_fashion):
    ok = torch.rand(2, 2, 1, 28, 28)
    with pytest.raises(FvtrustError, match="starts must have shape"):
        path_metrics(random_fashion, "block1", [0, 1], ok[:1], steps=3)
    with pytest.raises(FvtrustError, match="starts must have shape"):
        path_metrics(random_fashion, "block1", [0, 1], ok[:, :, :, :14], steps=3)
    with pytest.raises(FvtrustError, match="distinct"):
        path_metrics(random_fashion, "block1", [0, 0], ok, steps=3)
    with pytest.raises(FvtrustError, match="steps must be >= 2"):
        path_metrics(random_fashion, "block1", [0, 1], ok, steps=1)
    with pytest.raises(FvtrustError, match="line_mode"):
        path_metrics(random_fashion, "block1", [0, 1], ok, steps=3, line_mode="stored")
    with pytest.raises(FvtrustError, match=r"\[0, 1\]"):
        path_metrics(random_fashion, "block1", [0, 1], ok * 2, steps=3)
    with pytest.raises(FvtrustError, match="NaN"):
        path_metrics(random_fashion, "block1", [0, 1], ok * float("nan"), steps=3)
    with pytest.raises(FvtrustError, match="out of range"):
        path_metrics(random_fashion, "block1", [0, 99], ok, steps=3)
    with pytest.raises(FvtrustError, match="unknown layer"):
        path_metrics(random_fashion, "block9", [0, 1], ok, steps=3)


@pytest.mark.slow
def test_trained_fashion_paths(trained_fashion):
    from fvtrust.data import load_fashion_mnist
    from fvtrust.linearity import top_activating_many

    x, _ = load_fashion_mnist("test")
    top = top_activating_many(trained_fashion, "block3", [0, 1, 2, 3], x[:2000], 4)
    r = path_metrics(trained_fashion, "block3", [0, 1, 2, 3], top.images, steps=64)
    assert np.all(r.objective_final > r.objective_start)
    assert np.all((r.aga > 0) & (r.aga < 180)) and np.all((r.ald > 0) & (r.ald < 1))
