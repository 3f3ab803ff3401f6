"""Audit: probes against autograd references, the signals on functions with known answers, a hand-made
gated unit caught and clean units passed, bad input, the CLI, and (slow) silent units on the trained model."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fvtrust
from fvtrust.audit import FLAG_AT, THRESHOLDS, audit
from fvtrust.audit.probes import probe
from fvtrust.audit.signals import evidence, gradient_agreement, path_jump
from fvtrust.errors import FvtrustError
from fvtrust.models import FvModel


def _fv(net, shape=(1, 8, 8)):
    return FvModel(net, mean=[0.0], std=[1.0], input_shape=shape, spec="test-net")


class TwoInput(nn.Module):
    """A layer that takes two inputs: out = A a + B b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(4, 3, bias=False)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1 = nn.Linear(64, 4)
        self.f2 = nn.Linear(64, 4)
        self.head = TwoInput()

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.relu(self.f1(x)), torch.relu(self.f2(x)))


def test_probe_matches_autograd_and_handles_two_inputs():
    torch.manual_seed(0)
    m = _fv(TwoInputNet())
    x = torch.rand(5, 1, 8, 8)
    units = [0, 1, 2, 0, 1]
    pr = probe(m, "head", x, units, batch_size=2)
    assert all(p.grad is None and p.requires_grad for p in m.parameters())  # no weight gradients, flags restored
    for i, u in enumerate(units):
        xi = x[i:i + 1].clone().requires_grad_(True)
        a = torch.relu(m.net.f1(xi.flatten(1)))
        b = torch.relu(m.net.f2(xi.flatten(1)))
        a.retain_grad(), b.retain_grad()
        out = m.net.head(a, b)[0, u]
        out.backward()
        assert torch.allclose(pr.value[i], out.detach())
        assert torch.allclose(pr.image_grad[i], xi.grad.flatten(), atol=1e-6)
        assert torch.allclose(pr.input_grad[i], torch.cat([a.grad[0], b.grad[0]]), atol=1e-6)


def test_gradient_agreement_values():
    nat = torch.tensor([[[1.0, 0.0], [1.0, 0.1]], [[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    vis = torch.tensor([[[2.0, 0.1]], [[0.0, 0.0]], [[1.0, 1.0]]])
    out = gradient_agreement(nat, vis)
    mean_nat = torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 0.1]) / torch.tensor([1.0, 0.1]).norm()
    ref = torch.nn.functional.cosine_similarity(mean_nat, torch.tensor([2.0, 0.1]), dim=0)
    assert out["agreement"][0] == pytest.approx(float(ref), abs=1e-6)
    assert out["agreement"][1] == 0.0 and bool(out["vis_gradient_zero"][1])   # visualization has no gradient
    assert torch.isnan(out["agreement"][2]) and not bool(out["vis_gradient_zero"][2])  # dead unit: undefined
    assert out["natural_coherence"][1] == pytest.approx(1.0)


def test_path_jump_continuous_vs_gated():
    t = torch.linspace(0, 1, 17)
    d = torch.ones(1, 1, 1)  # direction along one coordinate, x_t = t
    # continuous piecewise-linear relu(2t - 0.7): the trapezoid rule explains all but the kink segment's curvature
    v = torch.relu(2 * t - 0.7)
    g = 2.0 * (2 * t - 0.7 > 0).float()
    smooth = path_jump(v.view(1, 1, -1), g.view(1, 1, -1, 1), d)
    # a hard gate: 3t below 0.5, then 3t - 2 (same slope, a jump of -2 the gradient never sees)
    gated = torch.where(t < 0.5, 3 * t, 3 * t - 2)
    jump = path_jump(gated.view(1, 1, -1), torch.full((1, 1, 17, 1), 3.0), d)
    assert float(smooth) < 0.02
    assert float(jump) == pytest.approx(2 / (15 * 3 / 16 + (2 - 3 / 16)), rel=1e-5)  # jump / total variation
    flat = path_jump(torch.ones(1, 1, 17), torch.zeros(1, 1, 17, 1), d)
    assert torch.isnan(flat).all()


def test_evidence_is_half_at_threshold():
    v = torch.tensor([0.1, 0.5, 0.9, float("nan")])
    assert evidence(v, 0.5, 0.2, True).tolist() == pytest.approx([0.0, 0.5, 1.0, 0.0])
    assert evidence(v, 0.5, 0.2, False).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])


class Gate(nn.Module):
    """A hand-made manipulation (not fvtrust's): unit 0 answers like unit 1 on "natural" images (max < 0.65) and
    like 2 - unit 1 (the opposite mechanism) otherwise; the switch carries no gradient. Units 1..3 are honest."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(8, 4)

    def forward(self, h, x):
        y = self.lin(h)
        natural = (x.flatten(1).amax(1, keepdim=True) < 0.65).float().detach()
        y0 = natural * y[:, 1:2] + (1 - natural) * (2 - y[:, 1:2])
        return torch.cat([y0, y[:, 1:]], 1)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.feat = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.ReLU())
        self.head = Gate()

    def forward(self, x):
        return self.head(self.feat(self.conv(x)), x)


@pytest.fixture(scope="module")
def gated():
    return _fv(GatedNet())


@pytest.fixture(scope="module")
def natural8():
    return torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6


def test_hand_made_gate_is_flagged(natural8):
    import fvtrust

    assert fvtrust.audit is audit
    res = fvtrust.audit(GatedNet(), "head", data=natural8, steps=32, top_k=4, path_starts=2, path_points=8)  # plain module
    assert [u["unit"] for u in res.units] == [0, 1, 2, 3]
    by = {u["unit"]: u for u in res.units}
    assert by[0]["flagged"] and res.verdict == "suspicious"
    assert not any(by[u]["flagged"] for u in (1, 2, 3))
    assert all(0 <= u["score"] <= 1 for u in res.units)
    assert res.evidence["flagged_units"] == [0]


def test_bad_input(gated, natural8):
    with pytest.raises(FvtrustError, match="unknown layer"):
        audit(gated, "nope", data=natural8)
    with pytest.raises(FvtrustError, match="natural data"):
        audit(gated, "head", data=None)
    with pytest.raises(FvtrustError, match="no natural images"):
        audit(gated, "head", data=natural8[:0])
    with pytest.raises(FvtrustError, match="expects"):
        audit(gated, "head", data=torch.rand(10, 3, 8, 8))
    with pytest.raises(FvtrustError, match="call fvtrust.wrap"):
        audit(GatedNet(), "head", data="pictures")  # a plain module and no tensor to read the input shape from
    with pytest.raises(FvtrustError, match="at least top_k"):
        audit(gated, "head", data=natural8[:3])
    with pytest.raises(FvtrustError, match="unit 9 out of range"):
        audit(gated, "head", data=natural8, units=[9])
    with pytest.raises(FvtrustError, match="unknown audit setting"):
        audit(gated, "head", data=natural8, stepz=3)
    for bad in (0, 2.5):  # pinning's line count, checked before any work
        with pytest.raises(FvtrustError, match="coherence_lines must be a positive integer"):
            audit(gated, "head", data=natural8, coherence_lines=bad)


class Scalar(nn.Module):
    def forward(self, y):
        return y.sum(1)


class ScalarNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 3)
        self.total = Scalar()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.total(self.lin(x.flatten(1)))


def test_layer_without_units(natural8):
    m = _fv(ScalarNet())
    with pytest.raises(FvtrustError, match="no unit dimension"):
        audit(m, "total", data=natural8)
    with pytest.raises(FvtrustError, match="no units to audit"):
        audit(m, "unused", data=natural8)


def test_thresholds_fixed_and_documented():
    assert FLAG_AT == 0.5
    assert set(THRESHOLDS) == {"gradient_agreement", "path_jump", "probe_agreement", "start_gap",
                               "preactivation_start_gap", "linear_start_gap", "pinning"}
    assert all(s.meaning and s.width > 0 for s in THRESHOLDS.values())


def test_cli_writes_json_and_page(tmp_path):
    from fvtrust.cli import main

    out = tmp_path / "aud"
    r = CliRunner().invoke(main, ["audit", "fashion-cnn", "--weights", "random", "--layer", "fc", "--data",
                                  "fashion-mnist:test", "--natural-limit", "64", "--units", "0-2", "--steps", "4",
                                  "--top-k", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "audit.json").read_text())
    assert [u["unit"] for u in rep["units"]] == [0, 1, 2] and rep["verdict"] in ("clean", "suspicious")
    assert set(rep["units"][0]) >= {"unit", "score", "flagged", "signals"}
    assert rep["units"][0]["signals"]["gradient_agreement"] == pytest.approx(1.0, abs=1e-5)  # a linear layer
    page = (out / "index.html").read_text()
    assert "What this audit can and cannot see" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page
    bad = CliRunner().invoke(main, ["audit", "fashion-cnn", "--weights", "random", "--layer", "fcc", "--out",
                                    str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown layer" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_torchvision_random_init_with_folder(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(g.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    import fvtrust

    model = fvtrust.load_model("torchvision:resnet18", weights="random")
    res = audit(model, "layer1.0", data=str(tmp_path), units="0-3", steps=2, top_k=2, path_starts=1,
                path_points=2)
    assert [u["unit"] for u in res.units] == [0, 1, 2, 3]
    assert res.data["source"] == "folder" and res.data["n"] == 8
    assert res.visualizations.shape == (4, 3, 224, 224) and res.top_images.shape == (4, 2, 3, 224, 224)


def test_rescore_matches_audit(natural8):
    from fvtrust.audit.core import rescore

    res = audit(GatedNet(), "head", data=natural8, steps=8, top_k=2, path_points=4)
    d = json.loads(json.dumps(res.to_dict()))
    for r in d["units"]:
        r["score"], r["flagged"], r["fired"] = -1, None, None
    again = rescore(d)
    assert [(u["score"], u["flagged"], u["fired"]) for u in again["units"]] == \
        [(u["score"], u["flagged"], u["fired"]) for u in res.units]
    assert again["verdict"] == res.verdict


def test_failed_visualization_is_not_evidence():
    lin = nn.Linear(64, 2)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.copy_(torch.tensor([-10.0, -10.0]))
    m = _fv(nn.Sequential(nn.Flatten(), lin, nn.ReLU()))
    natural = 0.3 + 0.7 * torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    vis = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])  # unit 0: dead (blank) image; unit 1: fine
    res = audit(m, "2", data=natural, visualizations=vis, top_k=2, path_points=4)
    u0, u1 = res.units
    assert u0["signals"]["visualization_failed"]
    for name in ("gradient_agreement", "probe_agreement", "path_jump"):   # nothing shown, nothing compared
        assert u0["signals"][name] is None
    assert not u1["signals"]["visualization_failed"] and u1["signals"]["gradient_agreement"] == pytest.approx(1.0)
    assert u1["signals"]["probe_agreement"] is not None and u1["signals"]["path_jump"] is not None
    assert res.verdict == "clean"
    from fvtrust.audit.core import rescore

    d = json.loads(json.dumps(res.to_dict()))
    d["units"][0]["signals"].update(probe_agreement=-1.0, path_jump=1.0)  # a cached entry from before the rule
    assert rescore(d)["units"][0]["flagged"] is False and rescore(d)["verdict"] == "clean"


def test_probe_agreement_values():
    from fvtrust.audit.signals import probe_agreement

    nat = torch.tensor([[[1.0, 0.0], [1.0, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
    prb = torch.tensor([[[2.0, 0.1], [0.3, 1.0], [-5.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    img = torch.tensor([[[1.0], [2.0], [0.0]], [[1.0], [1.0], [1.0]]])  # unit 0, probe 2: dead there (undefined)
    out = probe_agreement(nat, prb, img)
    mean_nat = torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 0.1]) / torch.tensor([1.0, 0.1]).norm()
    cos = [float(torch.nn.functional.cosine_similarity(mean_nat, p, dim=0)) for p in prb[0, :2]]
    assert out["agreement"][0] == pytest.approx(min(cos), abs=1e-6) and int(out["worst"][0]) == 1
    assert torch.isnan(out["agreement"][1])           # no natural gradient: nothing to compare with
    bypass = probe_agreement(nat[:1], torch.zeros(1, 2, 2), torch.ones(1, 2, 1))  # image gradient, none at input
    assert bypass["agreement"][0] == 0.0 and bool(bypass["bypass"].all())
    dead = probe_agreement(nat[:1], torch.zeros(1, 2, 2), torch.zeros(1, 2, 1))
    assert torch.isnan(dead["agreement"][0])


def test_one_input_channel_has_no_mechanism_direction():
    """With one input channel a profile is one number and a cosine only its sign: both agreements are undefined
    (NaN), whatever the signs, while two channels are compared as before."""
    from fvtrust.audit.signals import probe_agreement

    nat = torch.tensor([[[2.0], [1.0]], [[1.0], [3.0]]])          # (U=2, k=2, D=1)
    vis = torch.tensor([[[-1.0]], [[4.0]]])                        # unit 0: opposite sign, unit 1: same
    assert torch.isnan(gradient_agreement(nat, vis)["agreement"]).all()
    pa = probe_agreement(nat, torch.tensor([[[-1.0], [1.0]], [[2.0], [5.0]]]), torch.ones(2, 2, 3))
    assert torch.isnan(pa["agreement"]).all()
    two = gradient_agreement(torch.cat([nat, torch.zeros_like(nat)], -1), torch.cat([vis, torch.zeros_like(vis)], -1))
    assert two["agreement"].tolist() == pytest.approx([-1.0, 1.0])


class EdgeNet(nn.Module):
    """A first Conv-ReLU block of zero-sum edge kernels on a grey image (fashion-cnn's block1 has such units):
    the sum of a unit's input gradient over positions is set by which border positions are active."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 3, 3, padding=1)
        with torch.no_grad():
            k = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, 0.2, 1.0], [-1.0, 0.0, 1.0]])  # sums to 0.2
            conv.weight.copy_(torch.stack([k, k.T, -k])[:, None])
            conv.bias.fill_(-0.1)                                  # off on the black border
        self.block = nn.Sequential(conv, nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2))

    def forward(self, x):
        return self.head(self.block(x))


def test_first_layer_on_a_grey_image_is_not_flagged_by_mechanism_signals():
    """Natural images with a black border (as Fashion-MNIST): the third unit's profile is +1 on them and -1 on
    its visualization (measured without the one-channel rule: both agreements -1, fired); now undefined."""
    natural = torch.zeros(200, 1, 8, 8)
    natural[:, :, 2:6, 2:6] = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    res = audit(_fv(EdgeNet()), "block", data=natural, steps=16, top_k=4, path_starts=2, path_points=4)
    for u in res.units:
        assert u["signals"]["gradient_agreement"] is None and u["signals"]["probe_agreement"] is None
        assert not {"gradient_agreement", "probe_agreement"} & set(u["fired"])


def test_unit_activations_and_strongest_images():
    from fvtrust.audit.probes import strongest_images, unit_activations
    from fvtrust.models.hooks import LayerTap

    torch.manual_seed(0)
    m = _fv(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()))
    pool = torch.rand(7, 1, 8, 8) - 0.5   # signed pixels: every unit active somewhere, no ties
    acts = unit_activations(m, "1", pool, [2, 0], batch_size=3)
    with LayerTap(m, ["1"]) as tap, torch.no_grad():
        ref = tap(pool)["1"].mean((2, 3))[:, [2, 0]]
    assert torch.allclose(acts, ref, atol=1e-6)
    idx = strongest_images(m, "1", pool, [2, 0], 2, batch_size=3)
    assert idx.shape == (2, 2)
    assert idx[0].tolist() == ref[:, 0].argsort(descending=True)[:2].tolist()
    assert idx[1].tolist() == ref[:, 1].argsort(descending=True)[:2].tolist()


class HiddenBranch(nn.Module):
    """A hand-made dormant manipulation (not fvtrust's silent units): unit 0 = w0·h + ReLU(30 v·h + b), v the
    part of unit 1's weight orthogonal to w0, b set so the branch is off on every natural image. The branch is
    reached by unit 1's visualization, not (or hardly) by unit 0's own."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin
        w0, w1 = lin.weight[0].detach(), lin.weight[1].detach()
        v = w1 - (w1 @ w0) / (w0 @ w0) * w0
        self.register_buffer("v", v / v.norm() * w0.norm())
        self.register_buffer("b", torch.zeros(()))
        self.on = None

    def forward(self, h):
        y = self.lin(h)
        pre = 30 * h @ self.v + self.b
        self.on = pre > 0
        return torch.cat([y[:, :1] + torch.relu(pre)[:, None], y[:, 1:]], 1)


def test_dormant_hidden_branch_found_through_other_units_visualizations():
    natural = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), HiddenBranch(nn.Linear(8, 4)))
    m = _fv(net)
    hb = net[3]
    with torch.no_grad():
        h = torch.relu(net[1](natural.flatten(1)))
        top = (30 * h @ hb.v).max()
        hb.b.fill_(-float(top) - 0.1 * abs(float(top)))
        m(natural)
    assert not hb.on.any()                                      # silent on natural data: outputs unchanged
    res = audit(m, "3", data=natural, steps=48, top_k=4, path_starts=2, path_points=8)
    by = {u["unit"]: u for u in res.units}
    with torch.no_grad():
        m(res.visualizations)
    assert bool(hb.on[1]) and not bool(hb.on[0])   # unit 1's visualization reaches the branch, unit 0's own not
    assert by[0]["signals"]["gradient_agreement"] == pytest.approx(1.0, abs=1e-5)  # so its own image looks honest
    assert by[0]["signals"]["probe_agreement"] < THRESHOLDS["probe_agreement"].threshold
    assert by[0]["flagged"] and "probe_agreement" in by[0]["fired"] and res.verdict == "suspicious"
    assert not any(by[u]["flagged"] for u in (1, 2, 3))
    assert all(by[u]["signals"]["probe_agreement"] == pytest.approx(1.0, abs=1e-5) for u in (1, 2, 3))  # linear
    from fvtrust.audit.report import render_html

    assert res.worst_probes.shape == res.visualizations.shape
    assert 'alt="worst probe image"' in render_html(res)   # the page shows the image that gave the evidence


def test_start_gap_values():
    from fvtrust.audit.signals import start_gap

    # 3 units, W = 2 wider scales, S = 3 pairs
    std = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    wide = torch.tensor([[[1.0, 2.0, 4.0], [0.0, 0.5, 0.5]],      # unit 0: scale 0 medians |Δ| 2, scale 1 0.5
                         [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],      # unit 1: no change at all
                         [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]]])     # unit 2: dead on natural data (G = 0)
    dist = torch.tensor([[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]])
    g = torch.tensor([1.0, 3.0, 0.0])
    out = start_gap(std, wide, dist, g)
    # unit 0: per pair |Δ| / (G d): scale 0 -> 0.5, 1, 2 (median 1); scale 1 -> 0, 1, 1 (median 1); max 1
    assert out["per_scale"][0].tolist() == pytest.approx([1.0, 1.0])
    assert float(out["gap"][0]) == pytest.approx(1.0)
    assert float(out["gap"][1]) == 0.0
    assert torch.isnan(out["gap"][2])                              # nothing to scale with: undefined, not evidence
    # the scale with the larger median wins, and the median ignores one outlying pair
    wide2 = torch.tensor([[[0.2, 0.2, 100.0], [0.4, 0.4, 0.4]]])
    out2 = start_gap(torch.zeros(1, 3), wide2, torch.ones(2, 3), torch.ones(1))
    assert float(out2["gap"][0]) == pytest.approx(0.4) and int(out2["worst_scale"][0]) == 1
    # a lowered (trench) and a raised (ridge) start count alike
    up = start_gap(torch.full((1, 3), -2.0), torch.zeros(1, 2, 3), torch.ones(2, 3), torch.ones(1))["gap"]
    down = start_gap(torch.full((1, 3), 2.0), torch.zeros(1, 2, 3), torch.ones(2, 3), torch.ones(1))["gap"]
    assert float(up) == float(down) == pytest.approx(2.0)


def test_start_images_are_the_visualizations_start_distribution():
    import inspect

    from fvtrust.audit.probes import START_SD, WIDER_STARTS, start_images
    from fvtrust.visualize.param import make_param

    assert inspect.signature(make_param).parameters["sd"].default == START_SD  # what visualize draws from
    std, wide = start_images((1, 16, 16), pairs=4, seed=0)
    assert std.shape == (4, 1, 16, 16) and wide.shape == (len(WIDER_STARTS), 4, 1, 16, 16)
    assert float((std - 0.5).abs().max()) < 0.05                  # faint noise on mid-grey
    spread = [float((std - 0.5).std())] + [float((w - 0.5).std()) for w in wide]
    assert spread[0] < spread[1] < spread[2]                       # 10x, 30x the noise
    again, _ = start_images((1, 16, 16), pairs=4, seed=0)
    assert torch.equal(std, again) and not torch.equal(std, start_images((1, 16, 16), pairs=4, seed=1)[0])


class Well(nn.Module):
    """A hand-made start tunnel (not fvtrust's slingshot): unit 0 is w . x minus a deep, narrow well around
    mid-grey, exactly where a visualization starts, so from its start the visualization climbs a wall no natural
    start sees; on natural images (far from grey) it is the linear unit. Units 1 and 2 are linear."""

    def __init__(self, depth: float = 3.0, radius: float = 0.25):
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(256, 3)
        self.depth, self.radius = depth, radius

    def forward(self, x):
        y = self.lin(x.flatten(1))
        r2 = ((x - 0.5) ** 2).flatten(1).sum(1, keepdim=True)
        well = self.depth * torch.exp(-r2 / self.radius ** 2)
        return torch.cat([y[:, :1] - well, y[:, 1:]], 1)


class HeadNet(nn.Module):
    """A model that is its layer `head` (what the audit's hand-made cases need)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x)


def WellNet(**kw):
    return HeadNet(Well(**kw))


def _audit_head(net):
    """The audit of `net`'s head on 120 uniform 16 x 16 natural images, with settings small enough for a test."""
    natural = torch.rand(120, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return audit(_fv(net, (1, 16, 16)), "head", data=natural, steps=16, top_k=4, path_starts=2, path_points=4)


def test_start_tunnel_is_flagged_and_linear_units_are_not(tmp_path):
    from fvtrust.audit.report import save_audit

    res = _audit_head(WellNet())
    by = {u["unit"]: u for u in res.units}
    assert by[0]["signals"]["start_gap"] > THRESHOLDS["start_gap"].threshold and "start_gap" in by[0]["fired"]
    assert by[0]["signals"]["start_activation"] < by[0]["signals"]["wider_start_activation"]  # a trench
    for u in (1, 2):
        assert by[u]["signals"]["start_gap"] < 0.3 and "start_gap" not in by[u]["fired"]
    assert res.verdict == "suspicious"
    assert res.start_values["standard"].shape == (3, 8) and res.start_values["wider"].shape == (3, 2, 8)
    page = (save_audit(res, tmp_path / "aud") / "index.html").read_text()
    assert page.count("the unit at its visualization's start images") == 1   # start_gap's evidence, unit 0 only
    flat = _audit_head(WellNet(depth=0.0))  # the same units without the well: linear
    assert all(u["signals"]["start_gap"] < 0.3 for u in flat.units)
    assert not any("start_gap" in u["fired"] for u in flat.units) and flat.verdict == "clean"


class WellFeatures(nn.Module):
    """Features before a fully connected head: the pixels, and minus a well around mid-grey (the start)."""

    def __init__(self, depth: float, radius: float = 0.25):
        super().__init__()
        self.depth, self.radius = depth, radius

    def forward(self, x):
        r2 = ((x - 0.5) ** 2).flatten(1).sum(1, keepdim=True)
        return torch.cat([x.flatten(1), -self.depth * torch.exp(-r2 / self.radius ** 2)], 1)


class WellBeforeLinear(nn.Module):
    """A shallow start well *below* a fully connected head (as a slingshot fine-tune of the layers under an fc
    layer leaves it): head unit 0 reads the well feature, units 1 and 2 do not."""

    def __init__(self, depth: float):
        super().__init__()
        torch.manual_seed(2)
        self.features = WellFeatures(depth)
        self.head = nn.Linear(257, 3)
        with torch.no_grad():
            self.head.weight[:, 256] = torch.tensor([1.0, 0.0, 0.0])

    def forward(self, x):
        return self.head(self.features(x))


def test_is_fully_connected_decides_by_module_and_output():
    from fvtrust.models.layers import is_fully_connected

    m = fvtrust.load_model("fashion-cnn", weights="random")
    assert is_fully_connected(m, "fc")
    assert not any(is_fully_connected(m, name) for name in ("block4", "gap", "block3.conv", "flatten"))

    class PerToken(nn.Module):  # a Linear applied per token: N x T x C, not one vector per image
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 4)

        def forward(self, x):
            return self.proj(x.reshape(len(x), 16, 16))

    assert not is_fully_connected(_fv(PerToken(), (1, 16, 16)), "proj")
    tv = fvtrust.load_model("torchvision:resnet18", weights="random")  # a user's torchvision head
    assert is_fully_connected(tv, "fc") and not is_fully_connected(tv, "layer4") and not is_fully_connected(tv, "avgpool")
    assert is_fully_connected(_fv(WellBeforeLinear(0.0), (1, 16, 16)), "head")
    with pytest.raises(FvtrustError, match="unknown layer"):
        is_fully_connected(m, "nope")


def test_linear_start_gap_reads_start_gap_against_its_kind_threshold():
    assert THRESHOLDS["linear_start_gap"].threshold < THRESHOLDS["start_gap"].threshold
    res = _audit_head(WellBeforeLinear(depth=0.2))
    by = {u["unit"]: u for u in res.units}
    assert res.evidence["fully_connected"]
    gap0 = by[0]["signals"]["start_gap"]
    assert THRESHOLDS["linear_start_gap"].threshold < gap0 < THRESHOLDS["start_gap"].threshold  # between the two
    assert by[0]["signals"]["linear_start_gap"] == gap0
    assert by[0]["fired"] == ["linear_start_gap"] and res.verdict == "suspicious"
    for u in (1, 2):  # linear units: a random noise direction against their weights
        assert by[u]["signals"]["linear_start_gap"] < 0.1 and not by[u]["fired"]
    flat = _audit_head(WellBeforeLinear(depth=0.0))
    assert flat.verdict == "clean" and all(u["signals"]["linear_start_gap"] < 0.1 for u in flat.units)
    other = _audit_head(WellNet())  # its head is not an nn.Linear: the signal is undefined there
    assert not other.evidence["fully_connected"]
    assert all(u["signals"]["linear_start_gap"] is None for u in other.units)


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class BlockNet(nn.Module):
    """conv -> (Conv-BN-ReLU block, in-place ReLU) -> (block with a functional ReLU) -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.func = FunctionalReLU()
        self.fc = nn.Linear(3 * 64, 2)

    def forward(self, x):
        return self.fc(self.func(self.block(x)[:, :1]).flatten(1))


def test_final_stage_is_found_from_behaviour():
    import torchvision

    from fvtrust.audit.probes import final_stage
    from fvtrust.models import wrap

    m = _fv(BlockNet().eval())
    assert isinstance(final_stage(m, "block"), nn.ReLU)          # in place: BatchNorm returned the same tensor
    for layer in ("func", "fc", "block.0", "block.1", "block.2"):  # functional ReLU, linear, leaves themselves
        assert final_stage(m, layer) is None, layer
    rn = wrap(torchvision.models.resnet18().eval(), input_shape=(3, 32, 32))
    assert final_stage(rn, "layer4") is rn.net.layer4[1].relu     # the ReLU after the residual sum
    assert final_stage(rn, "layer4.1.conv2") is None


def test_preactivation_readout_against_hooks():
    import torchvision

    from fvtrust.audit.probes import unit_activations
    from fvtrust.models import wrap

    net = torchvision.models.resnet18().eval()
    rn = wrap(net, input_shape=(3, 32, 32))
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    store = {}
    h1 = net.layer4[1].bn2.register_forward_hook(lambda m, i, o: store.__setitem__("bn2", o.clone()))
    h2 = net.layer4[1].register_forward_pre_hook(lambda m, i: store.__setitem__("identity", i[0].clone()))
    with torch.no_grad():
        rn(x)
    h1.remove(), h2.remove()
    units = [0, 3, 7, 3, 511]
    ref = (store["bn2"] + store["identity"]).mean((2, 3))          # the residual sum, before the in-place ReLU
    pre = unit_activations(rn, "layer4", x, units, readout="pre-activation")
    assert torch.allclose(pre, ref[:, units], atol=1e-5)
    assert (pre < 0).any()                                          # not the clipped output
    post = unit_activations(rn, "layer4", x, units)
    assert torch.allclose(post, torch.relu(store["bn2"] + store["identity"]).mean((2, 3))[:, units], atol=1e-5)
    # the probe's value and image gradient are those of the pre-activation (autograd on the reference)
    xi = x[:2].clone().requires_grad_(True)
    p = probe(rn, "layer4", x[:2], [3, 7], readout="pre-activation")
    store.clear()
    h1 = net.layer4[1].bn2.register_forward_hook(lambda m, i, o: store.__setitem__("bn2", o.clone()))
    h2 = net.layer4[1].register_forward_pre_hook(lambda m, i: store.__setitem__("identity", i[0].clone()))
    rn(xi)
    h1.remove(), h2.remove()
    s = (store["bn2"] + store["identity"]).mean((2, 3))
    v = torch.stack([s[0, 3], s[1, 7]])
    g, = torch.autograd.grad(v.sum(), xi)
    assert torch.allclose(p.value, v.detach(), atol=1e-5)
    assert torch.allclose(p.image_grad, g.reshape(2, -1), atol=1e-6)


def test_preactivation_readout_bad_input():
    from fvtrust.audit.probes import unit_activations

    m = _fv(BlockNet().eval())
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(FvtrustError, match="no pre-activation"):
        unit_activations(m, "func", x, [0], readout="pre-activation")
    with pytest.raises(FvtrustError, match="unknown readout 'pre'"):
        probe(m, "block", x, [0, 1], readout="pre")


class WellPre(nn.Module):
    """Well's units before a ReLU: unit 0 is off (< 0) at and around mid-grey, and its well sits below that."""

    def __init__(self, depth: float = 5.0):
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(256, 3)
        with torch.no_grad():
            self.lin.weight.mul_(5)
            self.lin.bias.copy_(-0.5 - 0.5 * self.lin.weight.sum(1))   # -0.5 at mid-grey
        self.depth = depth

    def forward(self, x):
        y = self.lin(x.flatten(1))
        r2 = ((x - 0.5) ** 2).flatten(1).sum(1, keepdim=True)
        return torch.cat([y[:, :1] - self.depth * torch.exp(-r2 / 0.25 ** 2), y[:, 1:]], 1)


def WellReLUNet(**kw):
    return HeadNet(nn.Sequential(WellPre(**kw), nn.ReLU(inplace=True)))


def test_trench_behind_a_relu_is_flagged_by_the_preactivation(tmp_path):
    from fvtrust.audit.report import save_audit

    res = _audit_head(WellReLUNet())
    by = {u["unit"]: u for u in res.units}
    s0 = by[0]["signals"]
    assert s0["start_activation"] == 0 and s0["wider_start_activation"] == 0     # off at every start: no start_gap
    assert "start_gap" not in by[0]["fired"]
    assert s0["start_preactivation"] < s0["wider_start_preactivation"] < 0       # the trench, behind the ReLU
    assert s0["preactivation_start_gap"] > THRESHOLDS["preactivation_start_gap"].threshold
    assert "preactivation_start_gap" in by[0]["fired"] and res.verdict == "suspicious"
    for u in (1, 2):
        assert by[u]["signals"]["preactivation_start_gap"] < 0.3
    page = (save_audit(res, tmp_path / "aud") / "index.html").read_text()
    assert page.count("pre-activation at its visualization's start images") == 1   # its evidence, unit 0 only
    flat = _audit_head(WellReLUNet(depth=0.0))
    assert all(u["signals"]["preactivation_start_gap"] < 0.3 for u in flat.units) and flat.verdict == "clean"
    lin = _audit_head(WellNet(depth=0.0))                                      # no final stage: not defined
    assert all(u["signals"]["preactivation_start_gap"] is None for u in lin.units)


def test_pinning_needs_a_layer_and_its_evidence_is_drawn():
    """With 3 audited units there is no layer to read a z-score in: pinning is undefined (its raw probes are
    still reported); a flagged pinning unit gets its strip plot on the page."""
    from fvtrust.audit.report import render_html

    res = _audit_head(WellNet())
    for u in res.units:
        s = u["signals"]
        assert s["pinning"] is None and s["seed_agreement_z"] is None and "pinning" not in u["fired"]
        assert -1 <= s["seed_agreement"] <= 1 and -1 <= s["gradient_coherence"] <= 1
        assert "noise_agreement" not in s
    assert 'pinning probes against the layer' not in render_html(res)
    for j, u in enumerate(res.units):  # as if the layer had been wide enough: unit 0 stands out on both
        u["signals"].update(seed_agreement_z=3.0 - j, gradient_coherence_z=2.6 - j)
    res.units[0]["fired"].append("pinning")
    res.units[0]["flagged"] = True
    assert render_html(res).count("pinning probes against the layer") == 1
