"""Exact ReLU networks for the piecewise-affine constructions.

Thm 1 moves from F_PAff to F_NN by "any piecewise affine function can be
exactly represented by a sufficiently large neural network" (Arora et al.,
2018). In d = 1 that network is explicit: for knots 0 = k_0 < ... < k_m = 1,
values v_i and slopes s_i,

    f(x) = v_0 + s_0 * relu(x) + sum_{i=1}^{m-1} (s_i - s_{i-1}) * relu(x - k_i),

exact on [0, 1] (relu(x) = x there). An affine f on [0, 1]^2 is
a * relu(x_1) + b * relu(x_2) + c. `ReluNet` holds it as two linear layers
(`hidden`, `out`) and also runs inside fvtrust's visualization engine: it accepts an
"image" (N, C, H, W) with H * W = d, averages the C channels (so 1- and
3-channel images both work) and its last layer `out` returns (N, 1, 1, 1), a
one-channel, one-pixel activation that objective "neuron" or "channel" can
maximize.

`fit_piecewise_affine_1d` goes the other way: it recovers knots from samples
of a black-box callable, and `certify_relu_network` checks that the
resulting network reproduces the callable -- the numerical NN-membership test.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import FvtrustError
from .functions import Affine2D, PiecewiseAffine1D


class ChannelLinear(nn.Linear):
    """A linear layer whose output is shaped (N, C, 1, 1), like a 1 x 1 convolution's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :, None, None]


class ReluNet(nn.Module):
    """hidden = relu(Linear(d -> k)); out = Linear(k -> 1) returning (N, 1, 1, 1).

    Inputs: (N,) or (N, d) vectors -> (N,) resp. (N, 1); images (N, C, H, W)
    with H * W = d -> (N, 1, 1, 1). Inputs are cast to the network's dtype.
    """

    def __init__(self, hidden_weight, hidden_bias, out_weight, out_bias, *, d: int, dtype=torch.float64):
        super().__init__()
        k = len(hidden_bias)
        self.d = int(d)
        self.hidden = nn.Linear(self.d, k, dtype=dtype)
        self.act = nn.ReLU()
        self.out = ChannelLinear(k, 1, dtype=dtype)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.as_tensor(np.asarray(hidden_weight, float).reshape(k, self.d)))
            self.hidden.bias.copy_(torch.as_tensor(np.asarray(hidden_bias, float)))
            self.out.weight.copy_(torch.as_tensor(np.asarray(out_weight, float).reshape(1, k)))
            self.out.bias.copy_(torch.as_tensor(np.asarray(out_bias, float).reshape(1)))
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.out.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        kind = x.dim()
        if kind == 1:
            if self.d != 1:
                raise FvtrustError(f"1-D input only works for d = 1 (this network has d = {self.d})")
            flat = x.reshape(-1, 1)
        elif kind == 2:
            if x.shape[1] != self.d:
                raise FvtrustError(f"expected (N, {self.d}) input, got {tuple(x.shape)}")
            flat = x
        elif kind == 4:
            if x.shape[2] * x.shape[3] != self.d:
                raise FvtrustError(f"expected an image with H * W = {self.d}, got {tuple(x.shape)}")
            flat = x.mean(dim=1).reshape(-1, self.d)
        else:
            raise FvtrustError(f"unsupported input shape {tuple(x.shape)}")
        y = self.out(self.act(self.hidden(flat.to(self.dtype))))  # (N, 1, 1, 1)
        if kind == 1:
            return y.reshape(-1)
        if kind == 2:
            return y.reshape(-1, 1)
        return y

    def as_function(self):
        """A numpy callable (n,) / (n, d) -> (n,), like the closed forms."""

        def f(x):
            arr = torch.as_tensor(np.asarray(x, dtype=float))
            if self.d == 1:
                arr = arr.reshape(-1)
            with torch.no_grad():
                return self(arr).reshape(-1).double().numpy()

        return f


def _pwa_parameters(f: PiecewiseAffine1D):
    k, v, s = f.knots, f.values, f.slopes
    hidden_w = np.ones(len(k) - 1)
    hidden_b = -np.concatenate([[0.0], k[1:-1]])
    out_w = np.concatenate([[s[0]], np.diff(s)])
    return hidden_w, hidden_b, out_w, v[0]


def relu_network(f, dtype=None) -> ReluNet:
    """The exact ReLU network of a `PiecewiseAffine1D` or `Affine2D` (float64 unless `dtype`)."""
    dtype = torch.float64 if dtype is None else dtype
    if isinstance(f, PiecewiseAffine1D):
        hw, hb, ow, ob = _pwa_parameters(f)
        return ReluNet(hw, hb, ow, ob, d=1, dtype=dtype)
    if isinstance(f, Affine2D):
        return ReluNet(np.eye(2), np.zeros(2), [f.a, f.b], f.c, d=2, dtype=dtype)
    fitted = fit_piecewise_affine_1d(f)
    if fitted is None:
        raise FvtrustError("could not recover a continuous piecewise-affine form of this function; "
                           "pass a PiecewiseAffine1D or Affine2D")
    return relu_network(fitted, dtype=dtype)


def relu_fv_model(f, dtype=None):
    """Wrap the exact network as an fvtrust model (identity normalization, input (1, 1, d)).

    Its layer "out" is the unit to visualize, e.g.
    ``visualize(relu_fv_model(f1), "out", [0], param="pixel", transforms=None, size=(1, 1))``.
    """
    from ..models.wrappers import FvModel

    net = f if isinstance(f, ReluNet) else relu_network(f, dtype=dtype)
    return FvModel(net, mean=[0.0], std=[1.0], input_shape=(1, 1, net.d), spec=f"theory:relu-d{net.d}")


def fit_piecewise_affine_1d(f, *, n: int = 4001, tol: float = 1e-9, seed: int = 0):
    """Recover a continuous piecewise-affine form of a callable on [0, 1], or None.

    Slopes between consecutive sample points are grouped into runs of equal
    slope; each run of >= 2 cells is one affine piece, and each kink is the
    intersection of neighbouring pieces (a kink inside a grid cell shows up as
    one intermediate slope, which is skipped). The result is then compared
    with f on fresh random points: None unless it matches to `tol`.
    """
    from .phi import sorted_points_1d

    xs = sorted_points_1d(f, n)
    ys = np.asarray(f(xs), dtype=float).reshape(-1)
    if not np.all(np.isfinite(ys)):
        return None
    s = np.diff(ys) / np.diff(xs)
    scale = 1.0 + np.abs(s)
    same = np.abs(np.diff(s)) <= 1e-6 * np.maximum(scale[:-1], scale[1:])
    starts = np.concatenate([[0], np.nonzero(~same)[0] + 1])
    ends = np.concatenate([starts[1:], [len(s)]])  # run = cells [start, end)
    lines = []  # (slope, intercept, first x, last x)
    for a, b in zip(starts, ends):
        if b - a >= 2 or a == 0 or b == len(s):
            slope = (ys[b] - ys[a]) / (xs[b] - xs[a])
            lines.append((slope, ys[a] - slope * xs[a], xs[a], xs[b]))
    knots, values = [0.0], [lines[0][0] * 0.0 + lines[0][1]]
    for (s1, c1, _, e1), (s2, c2, b2, _) in zip(lines[:-1], lines[1:]):
        if abs(s1 - s2) <= 1e-12 * (1 + abs(s1)):
            if abs(c1 - c2) > tol:
                return None  # parallel pieces with a jump: not continuous
            continue
        x = (c2 - c1) / (s1 - s2)
        if not (e1 - 1e-9 <= x <= b2 + 1e-9):
            return None
        x = min(max(x, knots[-1]), 1.0)
        knots.append(x)
        values.append(s1 * x + c1)
    knots.append(1.0)
    values.append(lines[-1][0] + lines[-1][1])
    try:
        g = PiecewiseAffine1D(knots, values, label="fitted")
    except FvtrustError:
        return None
    check = np.concatenate([xs, np.random.default_rng(seed).random(2 * n)])
    y = np.asarray(f(check), dtype=float).reshape(-1)
    if np.max(np.abs(g(check) - y)) > tol * max(1.0, float(np.max(np.abs(y)))):
        return None
    return g


def certify_relu_network(f, d: int = 1, *, n: int | None = None, tol: float = 1e-9, seed: int = 0) -> dict:
    """Build an exact ReLU network for `f` and measure how well it reproduces f.

    Returns {"ok", "max_error", "hidden_units", "function"} (the exact
    piecewise-affine form the network was built from); ok means a ReLU network with
    the reported number of hidden units matches f to `tol` on a dense grid
    plus random points (the numerical certificate for F_NN membership).
    """
    from .phi import evaluation_points

    fail = {"ok": False, "max_error": float("inf"), "hidden_units": None, "function": None}
    if isinstance(f, (PiecewiseAffine1D, Affine2D)):
        g = f
    elif d == 1:
        g = fit_piecewise_affine_1d(f, n=n or 4001, tol=tol, seed=seed)
        if g is None:
            return fail
    else:
        return fail
    net = relu_network(g)
    rng = np.random.default_rng(seed)
    pts = evaluation_points(f, d, n)
    pts = np.concatenate([pts, rng.random(pts.shape)])
    y = np.asarray(f(pts), dtype=float).reshape(-1)
    err = float(np.max(np.abs(net.as_function()(pts) - y)))
    return {"ok": err <= tol * max(1.0, float(np.max(np.abs(y)))), "max_error": err,
            "hidden_units": int(net.hidden.out_features), "function": g}
