"""Exact, vectorized function objects for the constructions of App. B.5.

Every counterexample in the paper is piecewise affine: continuous
piecewise-affine functions on [0, 1] (Thms 1-5, 8) and affine functions on
[0, 1]^2 (Thms 6-7). Representing them by their knots (resp. coefficients)
instead of opaque lambdas lets us (i) evaluate them exactly at their kinks,
where their minima and maxima live, (ii) turn them into exact ReLU networks
(`relu_nets.py`), and (iii) plot them faithfully.
"""
from __future__ import annotations

import numpy as np

from ..errors import FvtrustError

# Inputs may sit a hair outside [0, 1] after float arithmetic (e.g. 1 - (1 - x)).
_DOMAIN_SLACK = 1e-12


def as_inputs(x, d: int) -> np.ndarray:
    """Validate inputs in [0, 1]^d: shape (n,) or (n, 1) for d = 1, (n, 2) for d = 2."""
    x = np.asarray(x, dtype=float)
    if d == 1:
        if x.ndim == 2 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim == 0:
            x = x.reshape(1)
        if x.ndim != 1:
            raise FvtrustError(f"expected inputs of shape (n,) or (n, 1) for d = 1, got {x.shape}")
    else:
        if x.ndim == 1 and x.shape[0] == d:
            x = x.reshape(1, d)
        if x.ndim != 2 or x.shape[1] != d:
            raise FvtrustError(f"expected inputs of shape (n, {d}), got {x.shape}")
    if x.size and (not np.all(np.isfinite(x)) or x.min() < -_DOMAIN_SLACK or x.max() > 1 + _DOMAIN_SLACK):
        raise FvtrustError("inputs must lie in [0, 1]^d (the input space of the paper's theory)")
    return np.clip(x, 0.0, 1.0)


class PiecewiseAffine1D:
    """Continuous piecewise-affine f: [0, 1] -> R, linear between `knots`.

    `knots` must start at 0, end at 1 and be non-decreasing; repeated knots
    are merged (they must carry the same value: the function is continuous,
    which is what makes it an exact ReLU network).
    """

    d = 1

    def __init__(self, knots, values, *, label: str = ""):
        k = np.asarray(knots, dtype=float).ravel()
        v = np.asarray(values, dtype=float).ravel()
        if k.shape != v.shape or k.size < 2:
            raise FvtrustError("a piecewise-affine function needs >= 2 knots with one value each")
        if not (np.all(np.isfinite(k)) and np.all(np.isfinite(v))):
            raise FvtrustError("knots and values must be finite")
        if np.any(np.diff(k) < 0) or abs(k[0]) > _DOMAIN_SLACK or abs(k[-1] - 1) > _DOMAIN_SLACK:
            raise FvtrustError("knots must be non-decreasing from 0 to 1")
        k = np.clip(k, 0.0, 1.0)
        keep_k, keep_v = [k[0]], [v[0]]
        for ki, vi in zip(k[1:], v[1:]):
            if ki - keep_k[-1] <= 1e-15:
                if abs(vi - keep_v[-1]) > 1e-12:
                    raise FvtrustError(f"discontinuity at x = {ki}: values {keep_v[-1]} and {vi}")
                continue
            keep_k.append(ki)
            keep_v.append(vi)
        if len(keep_k) < 2:
            raise FvtrustError("knots must span [0, 1]")
        self.knots = np.array(keep_k)
        self.values = np.array(keep_v)
        self.label = label

    def __call__(self, x) -> np.ndarray:
        return np.interp(as_inputs(x, 1), self.knots, self.values)

    @property
    def slopes(self) -> np.ndarray:
        return np.diff(self.values) / np.diff(self.knots)

    def candidate_points(self) -> np.ndarray:
        """Points where a piecewise-affine function attains its extremes: its knots."""
        return self.knots.reshape(-1)

    def with_values(self, values, label: str | None = None) -> "PiecewiseAffine1D":
        return PiecewiseAffine1D(self.knots, values, label=self.label if label is None else label)

    def mirrored(self) -> "PiecewiseAffine1D":
        """x -> f(1 - x): the reflection used for x_max = 0 in the proof of Thm 3."""
        return PiecewiseAffine1D(1.0 - self.knots[::-1], self.values[::-1], label=self.label)

    def relu_network(self, dtype=None):
        from .relu_nets import relu_network

        return relu_network(self, dtype=dtype)

    def __repr__(self) -> str:
        pts = ", ".join(f"({k:.4g}, {v:.4g})" for k, v in zip(self.knots, self.values))
        return f"PiecewiseAffine1D([{pts}]{', ' + repr(self.label) if self.label else ''})"


class Affine2D:
    """f(x) = a * x_1 + b * x_2 + c on [0, 1]^2 (the class of Thms 6-7)."""

    d = 2
    CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def __init__(self, a: float, b: float, c: float, *, label: str = ""):
        self.a, self.b, self.c = float(a), float(b), float(c)
        if not all(np.isfinite([self.a, self.b, self.c])):
            raise FvtrustError("affine coefficients must be finite")
        self.label = label

    def __call__(self, x) -> np.ndarray:
        x = as_inputs(x, 2)
        return self.a * x[:, 0] + self.b * x[:, 1] + self.c

    def candidate_points(self) -> np.ndarray:
        """An affine function attains its extremes over the square at corners."""
        return self.CORNERS.copy()

    def relu_network(self, dtype=None):
        from .relu_nets import relu_network

        return relu_network(self, dtype=dtype)

    @classmethod
    def through(cls, points, values, *, label: str = "") -> "Affine2D":
        """The affine function with the given values at three affinely independent points."""
        p = np.asarray(points, dtype=float)
        A = np.column_stack([p, np.ones(len(p))])
        a, b, c = np.linalg.solve(A, np.asarray(values, dtype=float))
        return cls(a, b, c, label=label)

    def __repr__(self) -> str:
        label = f", {self.label!r}" if self.label else ""
        return f"Affine2D(a={self.a:.6g}, b={self.b:.6g}, c={self.c:.6g}{label})"


def constant_function(value: float, d: int = 1, *, label: str = ""):
    """The constant function as an exact piecewise-affine (d = 1) or affine (d = 2) object."""
    if d == 1:
        return PiecewiseAffine1D([0.0, 1.0], [value, value], label=label)
    return Affine2D(0.0, 0.0, value, label=label)


def candidate_points(f, d: int) -> np.ndarray:
    """Extra points to evaluate `f` at (its kinks/corners), if it tells us; else none."""
    get = getattr(f, "candidate_points", None)
    if get is None:
        return np.empty((0,)) if d == 1 else np.empty((0, d))
    pts = np.asarray(get(), dtype=float)
    return pts.reshape(-1) if d == 1 else pts.reshape(-1, d)
