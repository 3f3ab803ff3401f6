"""Phi_minmax: what an ideal feature visualization reveals about f (§4).

Phi_minmax(f) = (argmin f, argmax f, min f, max f) over [0, 1]^d. Here it is
computed numerically on a dense grid plus the function's own kinks/corners
(where piecewise-affine functions attain their extremes, so for the
constructions of App. B.5 the result is exact).

The argmin/argmax are *sets* whenever f is flat there (every monotone
counterexample of Thm 1 is), and a visualization returns one element. Hence
"f1 and f2 share Phi" means: the same f_min and f_max, and the given x_min
(x_max) is a minimizer (maximizer) of both -- `phi_mismatch` measures exactly
that. `phi_minmax` breaks ties by returning the first minimizer in its point
list (kinks first, then the grid).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import FvtrustError
from .functions import candidate_points

DEFAULT_N = {1: 4001, 2: 101}


class Phi(NamedTuple):
    x_min: object  # float for d = 1, array of shape (2,) for d = 2
    x_max: object
    f_min: float
    f_max: float

    @property
    def d(self) -> int:
        return 1 if np.ndim(self.x_min) == 0 else len(self.x_min)

    @property
    def spread(self) -> float:
        """f_max - f_min, the scale of every bound in §4."""
        return self.f_max - self.f_min

    @property
    def midpoint(self) -> float:
        """m = (f_min + f_max) / 2 of Thm 2: f(x) is closer to f_max iff f(x) > m."""
        return (self.f_min + self.f_max) / 2


def _as_point(x, name: str):
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 0 or arr.shape == (1,):
        return float(arr.reshape(())), 1
    if arr.shape == (2,):
        return arr.copy(), 2
    raise FvtrustError(f"{name} must be a float (d = 1) or a length-2 array (d = 2), got shape {arr.shape}")


def validate_phi(phi, d: int | None = None) -> Phi:
    """Check a user-supplied Phi = (x_min, x_max, f_min, f_max); raise FvtrustError if impossible."""
    try:
        x_min, x_max, f_min, f_max = phi
    except (TypeError, ValueError):
        raise FvtrustError("phi must be a tuple (x_min, x_max, f_min, f_max)") from None
    x_min, d1 = _as_point(x_min, "x_min")
    x_max, d2 = _as_point(x_max, "x_max")
    if d1 != d2:
        raise FvtrustError("x_min and x_max must have the same dimension")
    if d is not None and d1 != d:
        raise FvtrustError(f"this class lives in d = {d}, but phi has d = {d1}")
    try:
        f_min, f_max = float(f_min), float(f_max)
    except (TypeError, ValueError):
        raise FvtrustError("f_min and f_max must be numbers") from None
    xs = np.concatenate([np.ravel(x_min), np.ravel(x_max)])
    if not (np.all(np.isfinite(xs)) and np.isfinite(f_min) and np.isfinite(f_max)):
        raise FvtrustError("phi contains a non-finite number")
    if xs.min() < 0 or xs.max() > 1:
        raise FvtrustError("x_min and x_max must lie in [0, 1]^d")
    if not (0 <= f_min <= 1 and 0 <= f_max <= 1):
        raise FvtrustError("f_min and f_max must lie in [0, 1] (the paper's F maps into [0, 1])")
    if f_min > f_max:
        raise FvtrustError(f"f_min = {f_min} > f_max = {f_max}")
    if f_min < f_max and np.array_equal(np.ravel(x_min), np.ravel(x_max)):
        raise FvtrustError("x_min = x_max is only possible for a constant function (f_min = f_max)")
    return Phi(x_min, x_max, f_min, f_max)


def grid(d: int, n: int | None = None) -> np.ndarray:
    """n equispaced points of [0, 1] (d = 1) or an n x n grid of [0, 1]^2 (d = 2)."""
    n = DEFAULT_N[d] if n is None else int(n)
    t = np.linspace(0.0, 1.0, n)
    if d == 1:
        return t
    if d == 2:
        u, v = np.meshgrid(t, t, indexing="ij")
        return np.column_stack([u.ravel(), v.ravel()])
    raise FvtrustError(f"only d = 1 and d = 2 are supported, got d = {d}")


def evaluation_points(f, d: int, n: int | None = None, extra=None) -> np.ndarray:
    """Kinks of f, any extra points, then the grid (d = 1: sorted, near-duplicates removed)."""
    parts = [candidate_points(f, d)]
    if extra is not None:
        e = np.asarray(extra, dtype=float)
        parts.append(e.reshape(-1) if d == 1 else e.reshape(-1, d))
    parts.append(grid(d, n))
    pts = np.concatenate(parts)
    if d == 1:
        pts = np.clip(pts, 0.0, 1.0)
    return pts


def sorted_points_1d(f, n: int | None = None, extra=None, min_gap: float = 1e-6) -> np.ndarray:
    """Sorted evaluation points for d = 1 with no two closer than `min_gap`.

    Kinks and `extra` points win over grid points (they carry the structure);
    the gap keeps finite-difference slopes free of cancellation noise.
    """
    special = np.concatenate([candidate_points(f, 1), np.ravel(extra) if extra is not None else []])
    special = np.unique(np.clip(special, 0.0, 1.0))
    g = grid(1, n)
    if special.size:
        idx = np.searchsorted(special, g)
        left = special[np.clip(idx - 1, 0, special.size - 1)]
        right = special[np.clip(idx, 0, special.size - 1)]
        near = np.minimum(np.abs(g - left), np.abs(g - right)) < min_gap
        g = g[~near]
    pts = np.sort(np.concatenate([special, g]))
    keep = np.concatenate([[True], np.diff(pts) >= min_gap])
    return pts[keep]


def _evaluate(f, pts: np.ndarray) -> np.ndarray:
    y = np.asarray(f(pts), dtype=float).reshape(-1)
    if y.shape[0] != pts.shape[0]:
        raise FvtrustError(f"f returned {y.shape[0]} values for {pts.shape[0]} inputs")
    if not np.all(np.isfinite(y)):
        raise FvtrustError("f returned non-finite values")
    return y


def phi_minmax(f, d: int = 1, *, n: int | None = None, points=None) -> Phi:
    """(argmin, argmax, min, max) of `f` over [0, 1]^d, evaluated on kinks + extra `points` + grid."""
    pts = evaluation_points(f, d, n, points)
    y = _evaluate(f, pts)
    i, j = int(np.argmin(y)), int(np.argmax(y))
    x_min = float(pts[i]) if d == 1 else pts[i].copy()
    x_max = float(pts[j]) if d == 1 else pts[j].copy()
    return Phi(x_min, x_max, float(y[i]), float(y[j]))


def phi_mismatch(f, phi, *, n: int | None = None, points=None) -> float:
    """How far `phi` is from being a valid Phi_minmax of `f` (0 means it is one).

    max of |f(x_min) - f_min|, |f(x_max) - f_max| and how far f dips below
    f_min or rises above f_max anywhere on the evaluation points.
    """
    phi = validate_phi(phi)
    d = phi.d
    at = np.array([phi.x_min, phi.x_max], dtype=float).reshape(2, -1)
    at = at[:, 0] if d == 1 else at
    y_at = _evaluate(f, at)
    y = _evaluate(f, evaluation_points(f, d, n, points))
    return float(max(abs(y_at[0] - phi.f_min), abs(y_at[1] - phi.f_max),
                     phi.f_min - y.min(), y.max() - phi.f_max, 0.0))


def shares_phi(f, phi, *, tol: float = 1e-9, n: int | None = None) -> bool:
    """True if `phi` is a Phi_minmax of `f` up to `tol`."""
    return phi_mismatch(f, phi, n=n) <= tol
