"""Feature-visualization decoders D: Phi_minmax -> F, and how to score them.

* `midpoint_decoder` (Prop. 1): the constant (f_min + f_max) / 2; its sup error
  is at most (f_max - f_min) / 2 for *every* f, which is why the lower bounds
  of Thms 1 and 4 are tight.
* `affine_decoder` (Thm 8): the unique affine function through
  (x_min, f_min) and (x_max, f_max) in d = 1, or the constant f_min when
  f_min = f_max; exact on F_Aff^{d=1} and F_Const.

Scoring follows §4: sup-norm error for the first two columns of Table 1 and
the indicator 1_{f > m} with m = (f_min + f_max) / 2 for the third.
"""
from __future__ import annotations

import numpy as np

from ..errors import FvtrustError
from .functions import as_inputs
from .phi import _evaluate, evaluation_points, validate_phi


def midpoint_decoder(phi):
    """Prop. 1: predict (f_min + f_max) / 2 everywhere."""
    phi = validate_phi(phi)
    value, d = phi.midpoint, phi.d

    def g(x):
        x = as_inputs(x, d)
        return np.full(x.shape[0], value)

    g.decoder = "midpoint (Prop. 1)"
    return g


def affine_decoder(phi):
    """Thm 8: the affine function through (x_min, f_min), (x_max, f_max) (d = 1)."""
    phi = validate_phi(phi)
    if phi.d != 1:
        raise FvtrustError("the Thm 8 decoder is for d = 1; in d = 2 Phi does not determine an "
                           "affine function (Thm 6)")
    if phi.f_max == phi.f_min:
        a, b = 0.0, phi.f_min
    else:
        a = (phi.f_max - phi.f_min) / (phi.x_max - phi.x_min)
        b = (phi.x_max * phi.f_min - phi.x_min * phi.f_max) / (phi.x_max - phi.x_min)

    def g(x):
        return a * as_inputs(x, 1) + b

    g.decoder = "affine (Thm 8)"
    return g


DECODERS = {"midpoint": midpoint_decoder, "affine": affine_decoder}


def sup_error(f, g, d: int = 1, *, n: int | None = None, points=None) -> float:
    """||f - g||_inf on kinks + points + grid (the error measure of Thms 1, 3, 4, 6, 8)."""
    pts = evaluation_points(f, d, n, points)
    extra = evaluation_points(g, d, 3, None)
    pts = np.concatenate([pts, extra])
    return float(np.max(np.abs(_evaluate(f, pts) - _evaluate(g, pts))))


def indicator_error(f, g, m: float, d: int = 1, *, n: int | None = None, points=None, tol: float = 1e-9,
                    strict_both: bool = False) -> int:
    """||1_{f > m} - 1_{g > m}||_inf (Thm 2), up to floating point.

    Points where f is within `tol` of m are skipped: there, rounding alone can
    flip the indicator. With `strict_both` (used to certify that two
    functions f1, f2 disagree, Lemma 4) points where g is within `tol` of m
    are skipped too, so a reported disagreement survives any rounding.
    """
    pts = evaluation_points(f, d, n, points)
    fy, gy = _evaluate(f, pts), _evaluate(g, pts)
    clear = np.abs(fy - m) > tol
    if strict_both:
        clear &= np.abs(gy - m) > tol
    return int(np.any((fy[clear] > m) != (gy[clear] > m)))
