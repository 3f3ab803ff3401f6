"""Gradient slingshots: the losses against their formulas and finite differences, the fine-tuning loop
(original untouched, resumable, save/reload exact), the measures, and bad input."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fvtrust
from fvtrust.errors import FvtrustError
from fvtrust.fool import slingshot
from fvtrust.fool.slingshot import Tunnel, manipulation_loss, preservation_loss
from fvtrust.fool.slingshot.report import auroc, similarity_to_target, top_jaccard, unit_scores
from fvtrust.fool.slingshot import load_saved_slingshot
from fvtrust.models import FvModel, save_model
from fvtrust.models.hooks import LayerTap

TINY = dict(epochs=2, fit_images=16, batch_size=8, tunnel_batch=4, lr=1e-3, gamma=2.0,
            transforms="none", on_policy=0.0, protect_top=0, protect_batch=0,
            lr_schedule="constant")  # the paper's recipe; the extensions have their own tests


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 4, 3, padding=1))
    net.add_module("bn", nn.BatchNorm2d(4))
    net.add_module("relu", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(2))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(16, 3))
    with torch.no_grad():  # non-trivial BN statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    m = FvModel(net, mean=(0.5,), std=(0.25,), input_shape=(1, 8, 8), spec="tiny", num_classes=3)
    return m.to(dtype)


def tiny_data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def tiny_target():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij")
    return (0.1 + 0.8 * (yy * xx))[None]


# -- the losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fft", "pixel"])
def test_tunnel_inverts_the_parameterization_and_samples_the_segment(kind):
    t = tiny_target()
    tun = Tunnel.build(t, kind)
    assert torch.allclose(tun.image(tun.target)[0], t, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    x = tun.sample(500, g)
    assert x.shape == (500, *tun.target.shape[1:])
    # x = p x_t + eps: the projection on x_t lies in [0, 1] up to the noise, and the residual is the noise
    flat, xt = x.reshape(500, -1).double(), tun.target.reshape(-1).double()
    p = flat @ xt / (xt @ xt)
    assert p.min() > -0.1 and p.max() < 1.1 and abs(float(p.mean()) - 0.5) < 0.06
    resid = flat - p[:, None] * xt
    assert abs(float(resid.std()) - 0.01) < 0.002


def _linear_pixel_forward(v):
    """a(img) = sum(v * img): a 'layer' whose unit-0 activation has the known gradient v * s(1 - s) in pixel space."""
    def forward(img):
        return (img * v).reshape(len(img), -1).sum(1, keepdim=True) * v.numel()  # unit 0, mean over 1 'position'
    return forward


def test_gradient_loss_matches_the_formula_written_out():
    t = tiny_target()
    tun = Tunnel.build(t, "pixel", decorrelate=False)
    v = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3))
    x = tun.sample(6, torch.Generator().manual_seed(4))
    gamma = 3.0
    got = manipulation_loss(_linear_pixel_forward(v), tun, x, 0, gamma, "gradient")
    s = torch.sigmoid(x)
    grad = v.numel() * v * s * (1 - s)  # d/dx of numel * sum(v * sigmoid(x))
    want = ((grad - gamma * (tun.target - x)) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-5)
    got_a = manipulation_loss(_linear_pixel_forward(v), tun, x, 0, gamma, "activation")
    act = v.numel() * (v * s).reshape(6, -1).sum(1)
    want_a = ((act - gamma * (1 - ((x - tun.target) ** 2).reshape(6, -1).mean(1))) ** 2).mean()
    assert torch.allclose(got_a, want_a, rtol=1e-5)
    rel = manipulation_loss(_linear_pixel_forward(v), tun, x, 0, gamma, "gradient", relative=True)
    assert torch.allclose(rel, want / (gamma * (tun.target - x)).pow(2).mean(), rtol=1e-5)


@pytest.mark.parametrize("variant,kind,layer,relative", [("gradient", "fft", "conv", False),
                                                         ("gradient", "pixel", "fc", True),
                                                         ("activation", "fft", "fc", True)])
def test_manipulation_loss_gradient_matches_finite_differences(variant, kind, layer, relative):
    """d L_manip / d weights (a second-order quantity for the gradient variant) vs gradcheck in float64."""
    model = tiny_model(dtype=torch.float64)
    model.net.relu = nn.Softplus(beta=4.0)  # smooth: finite differences are meaningless at ReLU kinks
    tun = Tunnel.build(tiny_target().double(), kind)
    tun.target = tun.target.double()
    tun.scale = None if tun.scale is None else tun.scale.double()
    x = tun.sample(3, torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, params = _loss_of_weights(model, layer, lambda forward: manipulation_loss(
        forward, tun, x, 1, 2.0, variant, relative=relative))
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def _loss_of_weights(model, layer, loss_of_forward):
    """(loss(*weights), weights): `loss_of_forward(forward)` as a function of the model's weights, for gradcheck;
    forward(img) returns `layer`'s activations under those weights (torch.func.functional_call)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    buffers = dict(model.named_buffers())

    def loss(*ps):
        state = {**dict(zip(names, ps)), **buffers}
        store = {}

        def forward(img):
            h = model.get_layer(layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
            try:
                torch.func.functional_call(model, state, (img,))
            finally:
                h.remove()
            return store["a"]

        return loss_of_forward(forward)

    return loss, params


def test_point_transforms_draw_each_point_independently_as_the_visualization_would():
    """Point i is fvtrust's fused transform of image i under the i-th draw of the same rng."""
    from fvtrust.fool.slingshot.loss import PointTransforms
    from fvtrust.visualize import transforms as T

    spec = T.TransformSpec.standard(8)
    imgs = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = PointTransforms(spec, np.random.default_rng(3))(imgs)
    rng = np.random.default_rng(3)
    want = torch.cat([T.apply(imgs[i:i + 1], spec, T.draw(spec, rng), out_hw=(8, 8)) for i in range(5)])
    assert torch.allclose(got, want, atol=1e-6)
    shared = T.apply(imgs, spec, T.draw(spec, np.random.default_rng(3)), out_hw=(8, 8))  # one draw for all
    assert not torch.allclose(got[1:], shared[1:], atol=1e-3)


def test_manipulation_loss_through_transforms_matches_finite_differences():
    """The double-backprop gradient through the transforms' grid_sample, vs gradcheck in float64."""
    from fvtrust.fool.slingshot.loss import PointTransforms
    from fvtrust.visualize import transforms as T

    model = tiny_model(dtype=torch.float64)
    model.net.relu = nn.Softplus(beta=4.0)
    tun = Tunnel.build(tiny_target().double(), "fft")
    tun.target, tun.scale = tun.target.double(), tun.scale.double()
    x = tun.sample(3, torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = T.TransformSpec.standard(8)
    loss, params = _loss_of_weights(model, "fc", lambda forward: manipulation_loss(  # the same draws every time
        forward, tun, x, 1, 2.0, "gradient", transform=PointTransforms(spec, np.random.default_rng(1))))
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("transforms", ["none", "standard"])
def test_on_policy_points_are_the_visualizations_own_path(transforms):
    """visualization_trajectories walks exactly the path fvtrust.visualize takes (same start, same draws)."""
    from fvtrust.fool.slingshot.onpolicy import Rollout, visualization_trajectories
    from fvtrust.visualize import transforms as T
    from fvtrust.visualize.param import seed_generators

    model = tiny_model()
    steps = 6
    res = fvtrust.visualize(model, "conv", [2], steps=steps, objective="channel", transforms=transforms, seed=5,
                            record_images=True, fast=False)
    tun = Tunnel.build(tiny_target(), "fft")
    spec = T.resolve_transforms(transforms, 8)
    with LayerTap(model, ["conv"]) as tap:
        pts = visualization_trajectories(lambda im: tap(im)["conv"], tun, 2, starts=1, steps=steps, transforms=spec,
                                         start_generators=seed_generators(5, [(2, 0)]),
                                         rng=np.random.default_rng(5))
    assert pts.shape == (steps + 1, *tun.target.shape[1:])
    assert torch.allclose(tun.image(pts), res.trajectory[:, 0], atol=1e-5)
    assert not torch.allclose(pts[0], pts[-1])
    with LayerTap(model, ["conv"]) as tap:  # a Rollout continued in parts walks the same path as one run
        fwd = (lambda im: tap(im)["conv"])
        parts = Rollout(tun, starts=1, transforms=spec, start_generators=seed_generators(5, [(2, 0)]),
                        rng=np.random.default_rng(5))
        parts.run(fwd, 2, 2).run(fwd, 2, steps - 2)
    assert parts.steps_run == steps and torch.equal(parts.points, pts)


def test_preservation_loss_formula():
    a, b = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
    w = 0.3
    want = w * ((a[:, 2] - b[:, 2]) ** 2).mean() + (1 - w) * ((a - b) ** 2).mean()
    assert torch.allclose(preservation_loss(a, b, 2, w), want)
    assert preservation_loss(a, a, 2, w) == 0
    rel = w * ((a[:, 2] - b[:, 2]) ** 2).mean() / (b[:, 2] ** 2).mean() + (1 - w) * ((a - b) ** 2).mean() / (b ** 2).mean()
    assert torch.allclose(preservation_loss(a, b, 2, w, relative=True), rel)


def test_rank_loss_formula():
    """L_rank = mean_i [1{s0_i >= τ} relu(τ − s_i)² + 1{s0_i < τ} relu(s_i − τ)²], written out."""
    from fvtrust.fool.slingshot.loss import rank_loss

    s0 = torch.tensor([3.0, 2.0, 1.5, 0.5, -1.0])
    tau = 1.5
    assert rank_loss(s0, s0, tau) == 0  # nothing moved: nothing crossed
    assert rank_loss(s0 + 0.2, s0, 0.0) == 0  # moves that cross nothing cost nothing (unlike MSE)
    s = torch.tensor([1.0, 2.5, 1.2, 1.9, -3.0])  # image 0 and 2 fell below τ, image 3 rose above it
    want = ((1.5 - 1.0) ** 2 + 0.0 + (1.5 - 1.2) ** 2 + (1.9 - 1.5) ** 2 + 0.0) / 5
    got = rank_loss(s, s0, tau)
    assert got > 0 and torch.allclose(got, torch.tensor(want))
    s.requires_grad_(True)
    rank_loss(s, s0, tau).backward()  # pushes the crossers back, leaves the others alone
    assert s.grad[0] < 0 and s.grad[2] < 0 and s.grad[3] > 0 and s.grad[1] == 0 and s.grad[4] == 0


def test_start_gradient_rms_is_the_per_position_rms_written_out():
    """auto_gamma's steepness: sqrt((1/P) Σ_p mean((∂a_{k,p}/∂x)²)) at the start noise, estimated by random signs;
    for a linear unit (P = 1) exactly the gradient of its feature."""
    from fvtrust.fool.slingshot.loss import start_gradient_rms, unit_activation

    model, tun = tiny_model(), Tunnel.build(tiny_target(), "fft")
    n = 512
    x = (tun.noise_sd * torch.randn((n, *tun.target.shape[1:]), generator=torch.Generator().manual_seed(0)))
    for layer in ("conv", "fc"):
        with LayerTap(model, [layer]) as tap:
            fwd = (lambda im: tap(im)[layer])
            xr = x.clone().requires_grad_(True)
            acts = fwd(tun.image(xr))[:, 1].reshape(n, -1)
            per_pos = [torch.autograd.grad(acts[:, p].sum(), xr, retain_graph=True)[0].pow(2).mean()
                       for p in range(acts.shape[1])]
            want = float(torch.stack(per_pos).mean().sqrt())
            (gm,) = torch.autograd.grad(unit_activation(fwd(tun.image(xr)), 1).sum(), xr)
            got = start_gradient_rms(fwd, tun, 1, n=n)
            assert got == pytest.approx(want, rel=0.1), layer
            mean_rms = start_gradient_rms(fwd, tun, 1, n=n, per_position=False)
            assert mean_rms == pytest.approx(float(gm.pow(2).mean().sqrt()), rel=1e-5)
            if layer == "fc":
                assert got == pytest.approx(mean_rms, rel=1e-6)
            else:  # 64 positions: the spatial mean's start gradient is the smaller one
                assert got > 1.5 * mean_rms


# -- fine-tuning ---------------------------------------------------------------------------------------

def test_slingshot_is_callable_package_and_leaves_original_untouched():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    data = tiny_data()
    new = slingshot(model, "conv", 1, target=tiny_target(), data=data, **TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(new.net.conv.weight, model.net.conv.weight)
    assert all(not p.requires_grad for p in new.parameters()) and not new.training
    info = new.slingshot_info
    assert info["layer"] == "conv" and info["unit"] == 1 and len(info["history"]) == 2
    assert info["fit_data"]["source"] == "tensor" and info["fit_data"]["n_used"] == 16


def test_slingshot_lowers_the_manipulation_loss_and_keeps_natural_outputs_close():
    model = tiny_model()
    tun = Tunnel.build(tiny_target(), "fft")
    x = tun.sample(64, torch.Generator().manual_seed(9))
    data = tiny_data()

    def l_manip(m):
        with LayerTap(m, ["fc"]) as tap:
            return float(manipulation_loss(lambda im: tap(im)["fc"], tun, x, 1, 2.0, create_graph=False))

    new = slingshot(model, "fc", 1, target=tiny_target(), data=data, **dict(TINY, epochs=6, lr=1e-2, alpha=0.5))
    assert l_manip(new) < 0.98 * l_manip(model)  # a 4-channel net bends its landscape only a little; a sign error raises it
    with torch.no_grad():
        change = (new(data[0]) - model(data[0])).abs().mean()
        scale = model(data[0]).abs().mean()
    assert change < scale


def test_on_policy_extension_lowers_the_loss_it_trains_on():
    """With transforms and on-policy points (fvtrust's extension) the loss at fresh on-policy points falls."""
    from fvtrust.fool.slingshot.loss import PointTransforms
    from fvtrust.fool.slingshot.onpolicy import visualization_trajectories
    from fvtrust.visualize import transforms as T

    model, data = tiny_model(), tiny_data()
    tun = Tunnel.build(tiny_target(), "fft")
    spec = T.TransformSpec.standard(8)
    ext = dict(TINY, epochs=6, lr=1e-2, alpha=0.5, transforms="standard", on_policy=0.5, policy_every=1,
               policy_starts=2, policy_steps=8)

    def l_manip(m):
        with LayerTap(m, ["fc"]) as tap:
            fwd = (lambda im: tap(im)["fc"])
            x = visualization_trajectories(fwd, tun, 1, starts=8, steps=8, transforms=spec,
                                           generator=torch.Generator().manual_seed(9))
            return float(manipulation_loss(fwd, tun, x, 1, 2.0, create_graph=False,
                                           transform=PointTransforms(spec, np.random.default_rng(9))))

    new = slingshot(model, "fc", 1, target=tiny_target(), data=data, **ext)
    assert l_manip(new) < 0.98 * l_manip(model)


def _full_and_resumed(tmp_path, model, data, target, settings, *, stop_after: int, epochs: int = 3):
    """(3 epochs in one go, `stop_after` epochs then resumed to 3): the resumed weights must be the same bytes."""
    full = slingshot(model, "fc", 0, target=target, data=data, checkpoint_dir=tmp_path / "a",
                     **dict(settings, epochs=epochs))
    slingshot(model, "fc", 0, target=target, data=data, checkpoint_dir=tmp_path / "b",
              **dict(settings, epochs=stop_after))
    resumed = slingshot(model, "fc", 0, target=target, data=data, checkpoint_dir=tmp_path / "b",
                        **dict(settings, epochs=epochs))
    assert resumed.slingshot_info["resumed_from_epoch"] == stop_after
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    return full, resumed


def test_resume_by_epoch_is_exact_with_the_extensions(tmp_path):
    """The on-policy buffer and transform draws are rebuilt per epoch from (seed, epoch): resume stays exact."""
    model, data, t = tiny_model(), tiny_data(), tiny_target()
    ext = dict(TINY, transforms="standard", on_policy=0.5, policy_every=1, policy_starts=2, policy_steps=3,
               policy_horizon=5)  # the second refresh of each epoch continues the first's visualizations
    full, resumed = _full_and_resumed(tmp_path, model, data, t, ext, stop_after=2)
    paper = slingshot(model, "fc", 0, target=t, data=data, **dict(TINY, epochs=3))
    assert not torch.equal(paper.net.fc.weight, full.net.fc.weight)  # the extension changes the training
    fresh = slingshot(model, "fc", 0, target=t, data=data, **dict(ext, epochs=3, policy_horizon=3))
    assert not torch.equal(fresh.net.fc.weight, full.net.fc.weight)  # continuing is not restarting


def test_resume_is_exact_with_protected_top_images_and_cosine_lr(tmp_path):
    """The protected pool is fixed by the frozen original, its draws come from (seed, epoch), the lr is a
    function of the step: resume stays exact, and each extension changes the training."""
    model, data, t = tiny_model(), tiny_data(), tiny_target()
    ext = dict(TINY, protect_top=4, protect_batch=3, lr_schedule="cosine")
    full = slingshot(model, "fc", 0, target=t, data=data, checkpoint_dir=tmp_path / "a", **dict(ext, epochs=3))

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted after epoch 1 of 3
        slingshot(model, "fc", 0, target=t, data=data, checkpoint_dir=tmp_path / "b", on_epoch=interrupt,
                  **dict(ext, epochs=3))
    resumed = slingshot(model, "fc", 0, target=t, data=data, checkpoint_dir=tmp_path / "b", **dict(ext, epochs=3))
    assert resumed.slingshot_info["resumed_from_epoch"] == 1
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(FvtrustError, match="different slingshot run"):  # cosine: the total is part of the run
        slingshot(model, "fc", 0, target=t, data=data, checkpoint_dir=tmp_path / "b", **dict(ext, epochs=4))
    paper = slingshot(model, "fc", 0, target=t, data=data, **dict(TINY, epochs=3))
    for one in (dict(protect_top=4, protect_batch=3), dict(lr_schedule="cosine")):
        other = slingshot(model, "fc", 0, target=t, data=data, **dict(TINY, epochs=3, **one))
        assert not torch.equal(paper.net.fc.weight, other.net.fc.weight), one


def test_protected_pool_is_the_original_units_top_fit_images(monkeypatch):
    """With protect_top = all fit images but one, the one left out is the unit's lowest-scoring image: only
    the other images may join the batches (checked by recording what L_pres sees)."""
    from fvtrust.fool.slingshot import finetune

    model, t = tiny_model(), tiny_target()
    x = tiny_data(16)[0]
    with LayerTap(model, ["fc"]) as tap, torch.no_grad():
        low = int(tap(x)["fc"][:, 0].argmin())
    seen = []
    real = finetune.preservation_loss

    def spy(acts, original, *a, **k):
        seen.append(original[8:].clone())  # the 8 batch images come first, then the protected draws
        return real(acts, original, *a, **k)

    monkeypatch.setattr(finetune, "preservation_loss", spy)
    slingshot(model, "fc", 0, target=t, data=x, **dict(TINY, epochs=2, protect_top=15, protect_batch=8))
    with LayerTap(model, ["fc"]) as tap, torch.no_grad():
        low_out = tap(x[low:low + 1])["fc"][0]
    drawn = torch.cat(seen)
    assert len(drawn) == 2 * 2 * 8
    assert not any(torch.allclose(row, low_out) for row in drawn)


def test_resume_by_epoch_is_exact(tmp_path):
    model, data, t = tiny_model(), tiny_data(), tiny_target()
    full, resumed = _full_and_resumed(tmp_path, model, data, t, TINY, stop_after=1)
    assert [r["loss"] for r in full.slingshot_info["history"]] == [r["loss"] for r in resumed.slingshot_info["history"]]
    assert len(list((tmp_path / "b").glob("epoch-*.safetensors"))) == 1  # only the latest is kept
    with pytest.raises(FvtrustError, match="different slingshot run"):
        slingshot(model, "fc", 1, target=t, data=data, checkpoint_dir=tmp_path / "b", **dict(TINY, epochs=3))


def test_save_reload_exact(trained_fashion, tmp_path):
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g))
    new = slingshot(trained_fashion, "block4", 3, target="camera", data=data,
                    **dict(TINY, epochs=1, fit_images=8, tunnel_batch=2))
    d = save_model(new, tmp_path / "m", manipulation="gradient_slingshot", args={}, base_spec="fashion-cnn",
                   extra={"unit": 3})
    back = fvtrust.load_model(str(d))
    for k, v in new.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = data[0]
    with torch.no_grad():
        assert torch.equal(back(x), new(x))
        assert not torch.equal(back(x), trained_fashion(x))
    assert back.recipe["manipulation"] == "gradient_slingshot"
    fooled, original, info = load_saved_slingshot(d)
    assert info == {"unit": 3}
    with torch.no_grad():
        assert torch.equal(fooled(x), new(x)) and torch.equal(original(x), trained_fashion(x))


def test_load_saved_slingshot_refuses_anything_else(trained_fashion, tmp_path):
    with pytest.raises(FvtrustError):
        load_saved_slingshot(tmp_path / "missing")
    clean = save_model(trained_fashion, tmp_path / "clean", base_spec="fashion-cnn")
    with pytest.raises(FvtrustError, match="not a saved gradient slingshot"):
        load_saved_slingshot(clean)


# -- measures ------------------------------------------------------------------------------------------

def test_auroc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    pos = torch.rand(60, generator=g) < 0.3
    p, n = s[pos], s[~pos]
    want = float(((p[:, None] > n[None]).float() + 0.5 * (p[:, None] == n[None]).float()).mean())
    assert auroc(s, pos) == pytest.approx(want, abs=1e-12)
    assert auroc(s, torch.zeros(60, dtype=torch.bool)) is None


def test_top_jaccard():
    a = torch.arange(10.0)
    assert top_jaccard(a, a, 3) == 1.0
    b = a.clone()
    b[9] = -1  # top-3 {9, 8, 7} -> {8, 7, 6}
    assert top_jaccard(a, b, 3) == pytest.approx(2 / 4)


def test_similarity_to_target():
    from skimage.metrics import structural_similarity

    t = tiny_target()
    sim = similarity_to_target(t, t)
    assert sim["pearson"] == pytest.approx(1.0) and sim["ssim"] == pytest.approx(1.0)
    assert sim["image_std"] == pytest.approx(float(t.double().std(unbiased=False)))
    img = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    sim = similarity_to_target(img, t)
    assert sim["pearson"] == pytest.approx(np.corrcoef(img.flatten(), t.flatten())[0, 1], abs=1e-6)
    assert sim["ssim"] == pytest.approx(structural_similarity(img[0].double().numpy(), t[0].double().numpy(),
                                                              data_range=1.0, win_size=7))


def test_unit_scores_are_the_channel_objective():
    model = tiny_model()
    x, _ = tiny_data(10)
    s = unit_scores(model, "conv", 2, x, batch_size=3)
    with torch.no_grad():
        want = model.net.conv(model.normalize(x))[:, 2].mean((1, 2))
    assert torch.allclose(s, want, atol=1e-6)


def test_standard_visualization_is_visualize_defaults_and_variants_change_one_thing():
    from fvtrust.fool.slingshot.report import defense_settings, stronger_transforms
    from fvtrust.visualize import transforms as T

    model = tiny_model()
    sets = {s["name"]: s for s in defense_settings(model, "fc", 1)}
    assert sets["standard"] == {"name": "standard", "param": "fft", "optimizer": "adam", "lr": 0.05,
                                "transforms": "standard"}
    changed = {n: {k for k in set(s) | set(sets["standard"]) if k != "name" and s.get(k) != sets["standard"].get(k)}
               for n, s in sets.items() if n != "standard"}
    assert changed == {"gradient clipping": {"grad_clip"}, "stronger transforms": {"transforms"},
                       "no transforms": {"transforms"}, "SGD": {"optimizer", "lr"},
                       "pixel parameterization": {"param"}}
    std, strong = T.TransformSpec.standard(28), stronger_transforms(28)
    assert (strong.pad, strong.jitter1, strong.jitter2) == (2 * std.pad, 2 * std.jitter1, 2 * std.jitter2)
    assert max(strong.angles) == 2 * max(std.angles) and max(strong.scales) - 1 == pytest.approx(2 * (max(std.scales) - 1))


def test_visualize_grad_clip_limits_steps():
    model = tiny_model()
    kw = dict(steps=5, objective="channel", transforms="none", optimizer="sgd", lr=10.0, param="pixel")
    free = fvtrust.visualize(model, "conv", [0], **kw).final
    clipped = fvtrust.visualize(model, "conv", [0], grad_clip=1e-6, **kw).final
    start = fvtrust.visualize(model, "conv", [0], **dict(kw, lr=0.0)).final
    assert (clipped - start).abs().max() < 1e-4 < (free - start).abs().max()
    with pytest.raises(FvtrustError, match="grad_clip"):
        fvtrust.visualize(model, "conv", [0], grad_clip=0, **kw)


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(unit=7), "out of range"),
    (dict(layer="nope"), "unknown layer"),
    (dict(variant="hessian"), "unknown slingshot variant"),
    (dict(alpha=1.0), "alpha"),
    (dict(w=-0.1), "w must"),
    (dict(gamma=0), "gamma"),
    (dict(epochs=0), "epochs"),
    (dict(param="raw"), "parameterization"),
    (dict(target=torch.rand(3, 8, 8)), "target has shape"),
    (dict(target=torch.rand(1, 8, 8) + 1), r"\[0, 1\]"),
    (dict(target="no-such-picture"), "unknown picture"),
    (dict(data=torch.rand(10, 1, 9, 9)), "expects"),
    (dict(data=torch.rand(4, 1, 8, 8) * 2), r"\[0, 1\]"),
    (dict(data="imagenet"), "unknown data"),
    (dict(gama=3.0), "unknown slingshot setting"),
    (dict(transforms="wild"), "unknown transforms"),
    (dict(on_policy=1.5), "on_policy"),
    (dict(policy_steps=0), "policy_steps"),
    (dict(policy_horizon=0), "policy_horizon"),
    (dict(protect_batch=4), "protect_top"),
    (dict(protect_top=-1), "protect_top"),
    (dict(lr_schedule="step"), "lr schedule"),
    (dict(rank_weight=-1.0), "rank_weight"),
    (dict(rank_weight=float("nan")), "rank_weight"),
    (dict(rank_fraction=0.0), "rank_fraction"),
    (dict(rank_fraction=1.0), "rank_fraction"),
])
def test_bad_input(kwargs, match):
    args = dict(layer="conv", unit=0, target=tiny_target(), data=tiny_data(), **TINY)
    args.update(kwargs)
    model = tiny_model()
    with pytest.raises(FvtrustError, match=match):
        slingshot(model, args.pop("layer"), args.pop("unit"), **args)


def test_cli_bad_input_is_one_line(tmp_path):
    from click.testing import CliRunner

    from fvtrust.cli import main

    r = CliRunner().invoke(main, ["fool", "slingshot", "fashion-cnn", "--layer", "fc", "--unit", "10",
                                  "--target", "camera", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "unit 10 out of range" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["fool", "slingshot", "fashion-cnn", "--layer", "fc", "--unit", "1",
                                  "--target", "camera", "--alpha", "1.5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "alpha" in r.output


@pytest.mark.slow
def test_cli_end_to_end_on_fashion_cnn(tmp_path):
    """The whole command on the embedded model with a tiny budget: files, report fields, exact reload, resume."""
    import json

    from click.testing import CliRunner

    from fvtrust.cli import main

    out = tmp_path / "sl"
    args = ["fool", "slingshot", "fashion-cnn", "--layer", "block4", "--unit", "5", "--target", "camera",
            "--epochs", "1", "--fit-images", "32", "--batch-size", "16", "--tunnel-batch", "4", "--steps", "8",
            "--policy-starts", "2", "--policy-steps", "4",
            "--natural-limit", "300", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["fit"]["source"] == "fashion-mnist:train" and rep["data"]["heldout"]["n_used"] == 300
    nat = rep["natural"]
    for k in ("top1_before", "top1_after", "top5_before", "top5_after", "top100_jaccard", "own_class_auroc_before",
              "own_class_auroc_after"):
        assert 0.0 <= nat[k] <= 1.0, k
    assert {d["name"] for d in rep["defenses"]} == {"gradient clipping", "stronger transforms", "no transforms",
                                                   "SGD", "pixel parameterization"}
    assert rep["config"]["on_policy"] == 0.5 and rep["config"]["transforms"] == "standard"
    for d in rep["defenses"]:
        assert -1 <= d["pearson_after"] <= 1 and -1 <= d["ssim_after"] <= 1
    vis, spread = rep["visualization"], rep["visualization"]["across_starts"]
    # the batched spread's first start is the headline visualization itself (batch-invariant), the others differ
    assert spread["starts"] == 4 and len(spread["pearson_after"]) == 4
    assert spread["pearson_after"][0] == pytest.approx(vis["pearson_after"], abs=1e-4)
    assert spread["pearson_before"][0] == pytest.approx(vis["pearson_before"], abs=1e-4)
    assert len(set(round(p, 6) for p in spread["pearson_after"])) > 1
    assert spread["median_pearson_after"] == pytest.approx(float(np.median(spread["pearson_after"])))
    assert "median over 4 starts" in r.output or "median over 4 starts" in (out / "slingshot.log").read_text()
    assert (out / "figure.png").stat().st_size > 0 and "epoch 1/1" in (out / "slingshot.log").read_text()
    model = fvtrust.load_model(str(out / "model"))
    assert model.recipe["manipulation"] == "gradient_slingshot" and model.recipe["extra"]["unit"] == 5
    r = CliRunner().invoke(main, args[:args.index("--epochs") + 1] + ["2"] + args[args.index("--epochs") + 2:])
    assert r.exit_code == 0, r.output
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["training"]["resumed_from_epoch"] == 1 and len(rep2["training"]["history"]) == 2
