"""Random members of each class of Table 1, to derive the table from (table.py).

Table 1 quantifies over *every* f of a class: "No" means that for all f
there is an f' with the same Phi that any decoder gets wrong. We therefore
draw random f of each class, take their Phi_minmax, and run the
constructions on that Phi. Members are exact `PiecewiseAffine1D`/`Affine2D`
objects wherever the class allows, so their Phi is exact; black-box members
are smooth non-piecewise-affine functions whose Phi is taken on the grid.
Each draw also randomizes orientation (x_min < x_max or not) and includes
flat pieces, so the case distinctions of the proofs are all exercised.
"""
from __future__ import annotations

import numpy as np

from .classes import check_class
from .functions import Affine2D, PiecewiseAffine1D


class SmoothFunction:
    """A random trigonometric polynomial rescaled into [lo, hi] (a black-box member)."""

    d = 1

    def __init__(self, rng: np.random.Generator):
        k = int(rng.integers(1, 5))
        self.amp = rng.normal(size=k)
        self.freq = rng.uniform(0.3, 4.0, size=k)
        self.phase = rng.uniform(0, 2 * np.pi, size=k)
        t = np.linspace(0, 1, 4001)
        raw = self._raw(t)
        lo, hi = np.sort(rng.uniform(0, 1, size=2))
        self.scale = (hi - lo) / (raw.max() - raw.min())
        self.shift = lo - raw.min() * self.scale
        self.label = "random smooth function"

    def _raw(self, x):
        return np.sin(2 * np.pi * np.outer(x, self.freq) + self.phase) @ self.amp

    def __call__(self, x):
        from .functions import as_inputs

        # Clip: off the grid the trigonometric polynomial may overshoot [lo, hi] by a hair.
        return np.clip(self._raw(as_inputs(x, 1)) * self.scale + self.shift, 0.0, 1.0)


def _random_knots(rng, m):
    return np.concatenate([[0.0], np.sort(rng.uniform(0, 1, size=m)), [1.0]])


def _fit_range(values, rng):
    """Affinely map values into a random sub-interval of [0, 1] (keeps shape, order, convexity)."""
    lo, hi = np.sort(rng.uniform(0, 1, size=2))
    span = values.max() - values.min()
    if span == 0:
        return np.full_like(values, lo)
    return np.clip(lo + (values - values.min()) * (hi - lo) / span, 0.0, 1.0)


def _random_relu_net_pwa(rng):
    """A random 1-8-1 ReLU network, read off as its exact piecewise-affine function."""
    h = 8
    w, b, v = rng.normal(size=h), rng.normal(size=h), rng.normal(size=h)
    kinks = -b / w
    knots = np.unique(np.concatenate([[0.0, 1.0], kinks[(kinks > 0) & (kinks < 1)]]))
    values = np.maximum(0.0, np.outer(knots, w) + b) @ v
    return PiecewiseAffine1D(knots, _fit_range(values, rng), label="random ReLU network")


def _random_lipschitz(rng, L):
    if rng.random() < 0.5:
        # Wiggly: random slopes in [-L, L]; scaled down (never up) to fit [0, 1].
        knots = _random_knots(rng, int(rng.integers(1, 8)))
        slopes = rng.uniform(-L, L, size=len(knots) - 1)
        values = np.concatenate([[0.0], np.cumsum(slopes * np.diff(knots))])
        span = values.max() - values.min()
        if span > 1:
            values = values / span
            span = 1.0
        values = values - values.min() + rng.uniform(0, 1 - span)
        # Clipping removes rounding overshoot (1 + 2e-16) and cannot raise any slope.
        return PiecewiseAffine1D(knots, np.clip(values, 0.0, 1.0), label="random Lipschitz function")
    # Steep ramp between the extremes (exercises the regime 2 Delta > L |x_max - x_min|).
    u, eps = rng.uniform(0.55, 1.0), 0.05
    width = rng.uniform(0.05, 1.0) * min(1.0, 1.0 / (u * L))
    a = rng.uniform(0, 1 - width)
    b = a + width
    rise = u * L * width
    base = rng.uniform(0, 1 - rise)
    knots = [0.0, a, b, 1.0]
    values = np.clip([base + eps * rise * a, base, base + rise, base + rise - eps * rise * (1 - b)], 0.0, 1.0)
    f = PiecewiseAffine1D(knots, values, label="random steep Lipschitz ramp")
    return f.mirrored() if rng.random() < 0.5 else f


def _random_convex(rng):
    k = int(rng.integers(1, 6))
    s, c = rng.normal(size=k) * 2, rng.normal(size=k)
    if rng.random() < 0.2:
        s = np.abs(s) * (1 if rng.random() < 0.5 else -1)  # monotone convex: x_min at an end too
    xs = [0.0, 1.0]
    for i in range(k):
        for j in range(i + 1, k):
            if s[i] != s[j]:
                x = (c[j] - c[i]) / (s[i] - s[j])
                if 0 < x < 1:
                    xs.append(x)
    knots = np.unique(xs)
    values = np.max(np.outer(knots, s) + c, axis=1)
    return PiecewiseAffine1D(knots, _fit_range(values, rng), label="random convex function")


def random_member(cls: str, rng: np.random.Generator):
    """(f, params): a random member of class `cls`; params holds L for "lipschitz"."""
    check_class(cls)
    if cls == "black_box":
        return SmoothFunction(rng), {}
    if cls in ("nn", "erm"):
        return _random_relu_net_pwa(rng), {}
    if cls == "piecewise_affine":
        knots = _random_knots(rng, int(rng.integers(1, 8)))
        return PiecewiseAffine1D(knots, rng.uniform(0, 1, size=len(knots)), label="random piecewise affine"), {}
    if cls == "monotone":
        knots = _random_knots(rng, int(rng.integers(1, 6)))
        steps = rng.exponential(size=len(knots) - 1) * (rng.random(len(knots) - 1) > 0.3)
        values = _fit_range(np.concatenate([[0.0], np.cumsum(steps)]) + 1e-3 * knots, rng)
        f = PiecewiseAffine1D(knots, values if rng.random() < 0.5 else values[::-1].copy(),
                              label="random monotone function")
        return f, {}
    if cls == "lipschitz":
        L = float(np.exp(rng.uniform(np.log(0.5), np.log(10.0))))
        return _random_lipschitz(rng, L), {"L": L}
    if cls == "convex":
        return _random_convex(rng), {}
    if cls == "affine":
        a, b = rng.uniform(-1, 1, size=2)
        if rng.random() < 0.15:
            a = 0.0
        elif rng.random() < 0.15:
            b = 0.0
        span = abs(a) + abs(b)
        if span > 1:
            a, b, span = a / span, b / span, 1.0
        low = rng.uniform(0, 1 - span)
        return Affine2D(a, b, low - min(a, 0) - min(b, 0), label="random affine function"), {}
    if cls == "affine_1d":
        a = 0.0 if rng.random() < 0.1 else rng.uniform(-1, 1)
        low = rng.uniform(0, 1 - abs(a))
        c = low - min(a, 0.0)
        return PiecewiseAffine1D([0, 1], [c, c + a], label="random affine function"), {}
    c = float(rng.uniform(0, 1))
    return PiecewiseAffine1D([0, 1], [c, c], label="random constant"), {}
