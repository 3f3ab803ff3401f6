"""The audit's development scripts (benchmarks/audit_candidates.py, slingshot_anatomy.py, pinning_variance.py):
bad input fails in one line before any work, and their probes against references."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import audit_candidates  # noqa: E402


# every benchmark script of the audit's development: bad input fails in one line, "<script>: ...", before any work
BAD_INPUT = [
    ("audit_candidates", ["nowhere/model", "--layer", "fc"], "unknown model spec"),
    ("audit_candidates", ["fashion-cnn", "--layer", "nope"], "nope"),
    ("audit_candidates", ["fashion-cnn", "--layer", "fc", "--unit", "10"],
     "unit 10 out of range for fc: valid units are 0..9"),
    ("slingshot_anatomy", ["fashion-cnn", "--layer", "fc", "--unit", "10"], "unit 10 out of range"),
    ("slingshot_anatomy", ["fashion-cnn", "--layer", "block4", "--at", "nowhere"], "nowhere"),
    ("slingshot_anatomy", ["fashion-cnn", "--layer", "block4", "--target", "no-such-picture"], "no-such-picture"),
    ("pinning_variance", ["fashion-cnn", "--layer", "fc", "--unit", "10"], "unit 10 out of range"),
    ("pinning_variance", ["fashion-cnn", "--layer", "nope"], "nope"),
    ("pinning_variance", ["fashion-cnn", "--layer", "fc", "--lines", "8"], "--lines at least 16"),
    ("pinning_variance", ["fashion-cnn", "--layer", "fc", "--noise-draws", "2"], "--noise-draws 0 or at least 4"),
    ("pinning_variance", ["fashion-cnn", "--layer", "fc", "--weight-noise", "0"], "--weight-noise must be positive"),
]


@pytest.mark.parametrize("script, argv, message", BAD_INPUT)
def test_bad_input_is_one_line(monkeypatch, script, argv, message):
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
    text = str(e.value)
    assert text.startswith(f"{script}: ") and message in text and "\n" not in text


def _tiny_lines():
    """A tiny conv net, two visualizations, and what a per-line reference needs: the 4 transform draws of seed 5,
    the visualizations' fft leaves and the 3 standard starts of seed 5 (as `start_params` draws them)."""
    import numpy as np
    import torch
    from torch import nn

    from fvtrust.audit.probes import START_SD
    from fvtrust.models import FvModel
    from fvtrust.visualize import transforms as T
    from fvtrust.visualize.param import make_param

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1))
    m = FvModel(net, mean=[0.0], std=[1.0], input_shape=(1, 12, 12), spec="test-net")
    vis = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    spec = T.TransformSpec.standard(12)
    rng = np.random.default_rng(5)
    ds = [T.draw(spec, rng) for _ in range(4)]
    th_v = make_param("fft", (2, 1, 12, 12), start=vis).tensor.detach()
    base = make_param("fft", (3, 1, 12, 12), sd=START_SD,
                      generators=[torch.Generator().manual_seed(5 * 100003 + s) for s in range(3)])
    return net, m, vis, spec, ds, th_v, base


def test_smoothness_and_robust_z_against_references():
    import numpy as np
    import scipy.stats
    import torch

    x = torch.rand(3, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    x[2] = torch.linspace(0, 1, 42).reshape(1, 6, 7)  # a smooth ramp: lower total variation per std
    got = audit_candidates.smoothness(x)
    for i in range(3):
        a = x[i, 0].double().numpy() - x[i].double().numpy().mean()
        tv = np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()
        assert float(got[i]) == __import__("pytest").approx(tv / a.std(ddof=1), rel=1e-5)
    assert got[2] < got[:2].min()
    v = torch.tensor([0.1, 0.3, 0.2, 0.9, 0.25, 0.22])
    want = (v.numpy() - np.median(v.numpy())) / scipy.stats.median_abs_deviation(v.numpy(), scale="normal")
    assert np.allclose(audit_candidates.robust_z(v).numpy(), want, atol=1e-5)


def test_planted_curvature_against_a_per_line_reference():
    """The batched candidate equals a loop over units and starts (same steps δ, same transform draws)."""
    import dataclasses

    import numpy as np
    import torch

    from fvtrust.visualize import transforms as T

    net, m, vis, spec, ds, th_v, base = _tiny_lines()
    got = audit_candidates.planted_curvature(m, "2", vis, [0, 1], pairs=3, seed=5, points=(0.5,),
                                             steps_per_point=2, sd=0.05)
    th = (base.tensor.detach()[None] + 0.5 * (th_v[:, None] - base.tensor.detach()[None])).flatten(0, 1)
    gen = torch.Generator().manual_seed(12)
    steps = [0.05 * torch.randn(th.shape, generator=gen) for _ in range(2)]

    def grad(t, u):
        t = t[None].clone().requires_grad_(True)
        img = dataclasses.replace(base, tensor=t, shape=(1, 1, 12, 12)).image()
        return torch.autograd.grad(sum(net(T.apply(img, spec, d))[0, u].mean() for d in ds), t)[0].flatten().double()

    want = []
    for u in range(2):
        per_start = []
        for s in range(3):
            i = u * 3 + s
            cs = []
            for dl in steps:
                dg = grad(th[i] + dl[i], u) - grad(th[i] - dl[i], u)
                d = dl[i].flatten().double()
                cs.append(float(-(d @ dg) / (d.norm() * dg.norm())))
            per_start.append(np.mean(cs))
        want.append(float(np.median(per_start)))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=1e-5)


def test_pinning_variance_lines_are_the_audits():
    """The per-line cosines' median over the first `lines` lines is the audit's gradient_coherence, and more lines
    extend the same ones (the first 3 of 5 are the 3)."""
    import numpy as np
    import torch
    from torch import nn

    import pinning_variance
    from fvtrust.audit.pinning import gradient_coherence
    from fvtrust.models import FvModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1))
    m = FvModel(net, mean=[0.0], std=[1.0], input_shape=(1, 12, 12), spec="test-net")
    vis = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    few = pinning_variance.line_cosines(m, "2", vis, [0, 1], lines=3, seed=5)
    more = pinning_variance.line_cosines(m, "2", vis, [0, 1], lines=5, seed=5)
    assert few.shape == (2, 3) and more.shape == (2, 5)
    assert np.allclose(more[:, :3], few, atol=1e-6)
    assert np.allclose(np.nanmedian(few, 1), gradient_coherence(m, "2", vis, [0, 1], lines=3, seed=5).numpy(), atol=1e-6)
