"""The function classes of Table 1 and numerical membership checks (App. B.2).

All classes are subsets of F = {[0, 1]^d -> [0, 1]}. Following Remark 3 the
impossibility results are stated in d = 1; only "affine" (F_Aff^{d>1}) lives
in d = 2. Membership is checked numerically on a dense grid plus the
function's kinks -- a necessary-condition test at that resolution, not a
proof: features narrower than the grid can slip through for arbitrary
callables (for the exact `PiecewiseAffine1D`/`Affine2D` objects the kinks are
on the grid, so the test is exact up to floating point).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FvtrustError, nearest
from .phi import _evaluate, grid, sorted_points_1d

COLUMNS = ("exact", "approx", "closer")
COLUMN_TITLES = {
    "exact": "f(x)?",
    "approx": "f(x) eps-approx.?",
    "closer": "closer to f_max or f_min?",
}


@dataclass(frozen=True)
class FunctionClass:
    id: str
    name: str
    symbol: str
    d: int
    theorems: tuple  # (exact/approx column, closer column), as in Table 2
    needs_L: bool = False


_CLASSES = [
    FunctionClass("black_box", "black-box", "F", 1, ("Theorem 1", "Theorem 2")),
    FunctionClass("nn", "neural network (NN)", "F_NN", 1, ("Theorem 1", "Theorem 2")),
    FunctionClass("erm", "NN trained with ERM", "F_ERM", 1, ("Theorem 1", "Theorem 2")),
    FunctionClass("lipschitz", "L-Lipschitz (known L)", "F_Lip^L", 1, ("Theorem 4", "Theorem 5"), needs_L=True),
    FunctionClass("piecewise_affine", "piecewise affine", "F_PAff", 1, ("Theorem 1", "Theorem 2")),
    FunctionClass("monotone", "monotonic", "F_Mono", 1, ("Theorem 1", "Theorem 2")),
    FunctionClass("convex", "convex", "F_ConvX", 1, ("Theorem 3", "Theorem 2")),
    FunctionClass("affine", "affine (input dim. > 1)", "F_Aff^{d>1}", 2, ("Theorem 6", "Theorem 7")),
    FunctionClass("affine_1d", "affine (input dim. = 1)", "F_Aff^{d=1}", 1, ("Theorem 8", "Theorem 8")),
    FunctionClass("constant", "constant", "F_Const", 1, ("Theorem 8", "Theorem 8")),
]

CLASS_INFO = {c.id: c for c in _CLASSES}
CLASSES = tuple(CLASS_INFO)


def check_class(cls: str) -> FunctionClass:
    """The FunctionClass for an identifier; FvtrustError for unknown ids."""
    if cls not in CLASS_INFO:
        raise FvtrustError(f"unknown function class {cls!r}; nearest: {nearest(str(cls), CLASSES)}")
    return CLASS_INFO[cls]


def check_L(L) -> float:
    if L is None:
        raise FvtrustError("class 'lipschitz' needs the Lipschitz constant L (e.g. L=2.0)")
    try:
        L = float(L)
    except (TypeError, ValueError):
        raise FvtrustError(f"L must be a number, got {L!r}") from None
    if not (np.isfinite(L) and L > 0):
        raise FvtrustError(f"L must be a finite positive number, got {L}")
    return L


# -- the individual checks: each returns (ok, details) --------------------------------

def _in_range(y, tol):
    lo, hi = float(y.min()), float(y.max())
    return (lo >= -tol and hi <= 1 + tol), {"min": lo, "max": hi}


def _slopes(f, n):
    x = sorted_points_1d(f, n)
    y = _evaluate(f, x)
    return x, y, np.diff(y) / np.diff(x)


def _check_monotone(f, n, tol):
    x, y, _ = _slopes(f, n)
    dy = np.diff(y)
    up, down = bool(np.all(dy >= -tol)), bool(np.all(dy <= tol))
    return up or down, {"non_decreasing": up, "non_increasing": down}


def _check_convex(f, n, tol, rng):
    x, y, s = _slopes(f, n)
    # Discrete convexity: slopes of consecutive chords never decrease.
    worst = float(np.min(np.diff(s))) if len(s) > 1 else 0.0
    ok_grid = worst >= -1e-7 * (1 + float(np.max(np.abs(s))))
    # Jensen at random pairs, independent of the grid.
    a, b, t = rng.random(2000), rng.random(2000), rng.random(2000)
    gap = float(np.max(_evaluate(f, t * a + (1 - t) * b) - (t * _evaluate(f, a) + (1 - t) * _evaluate(f, b))))
    return ok_grid and gap <= tol, {"min_slope_increase": worst, "max_jensen_gap": gap}


def _check_lipschitz(f, n, tol, rng, L):
    x, y, s = _slopes(f, n)
    slope = float(np.max(np.abs(s)))
    a, b = rng.random(2000), rng.random(2000)
    keep = np.abs(a - b) > 1e-6
    pair = float(np.max(np.abs(_evaluate(f, a[keep]) - _evaluate(f, b[keep])) / np.abs(a[keep] - b[keep])))
    return max(slope, pair) <= L * (1 + 1e-9) + tol, {"max_slope": max(slope, pair), "L": L}


def _check_piecewise_affine(f, n, tol, rng):
    from .relu_nets import certify_relu_network

    # A continuous piecewise-affine function is recovered exactly from its kinks.
    cert = certify_relu_network(f, 1, n=n, tol=tol, seed=int(rng.integers(1 << 31)))
    return cert["ok"], {"pieces": None if cert["hidden_units"] is None else cert["hidden_units"],
                        "max_error": cert["max_error"]}


def _check_nn(f, n, tol, rng):
    from .relu_nets import certify_relu_network

    cert = certify_relu_network(f, 1, n=n, tol=tol, seed=int(rng.integers(1 << 31)))
    return cert["ok"], {k: v for k, v in cert.items() if k != "function"}


def _check_erm(f, n, tol, rng):
    from .erm import erm_certificate

    cert = erm_certificate(f, n=n, tol=tol, seed=int(rng.integers(1 << 31)))
    return cert["ok"], cert


def _lstsq_affine(f, d, n, tol):
    x = grid(d, n if n is not None else (2001 if d == 1 else 101))
    if d == 2:
        x = np.concatenate([x, np.random.default_rng(0).random((500, 2))])
    y = _evaluate(f, x)
    X = np.column_stack([x.reshape(len(x), -1), np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = float(np.max(np.abs(X @ coef - y)))
    return resid <= tol * max(1.0, float(np.max(np.abs(y)))), {"coefficients": coef.tolist(), "max_residual": resid}


def _check_constant(y, tol):
    spread = float(y.max() - y.min())
    return spread <= tol, {"spread": spread}


def membership(f, cls: str, *, L=None, n: int | None = None, tol: float = 1e-9, seed: int = 0) -> dict:
    """Check numerically whether `f` belongs to class `cls`; returns {"member": bool, ...details}.

    Every class first requires f in F (finite values in [0, 1]).
    """
    info = check_class(cls)
    rng = np.random.default_rng(seed)
    if info.needs_L:
        L = check_L(L)
    d = info.d
    pts = grid(d, n)
    if d == 1:
        pts = sorted_points_1d(f, n)
    y = _evaluate(f, pts)
    ok, details = _in_range(y, tol)
    report = {"class": cls, "in_F": ok, **details}
    if not ok:
        report["member"] = False
        return report
    if cls == "black_box":
        ok, extra = True, {}
    elif cls == "nn":
        ok, extra = _check_nn(f, n, tol, rng)
    elif cls == "erm":
        ok, extra = _check_erm(f, n, tol, rng)
    elif cls == "lipschitz":
        ok, extra = _check_lipschitz(f, n, tol, rng, L)
    elif cls == "piecewise_affine":
        ok, extra = _check_piecewise_affine(f, n, tol, rng)
    elif cls == "monotone":
        ok, extra = _check_monotone(f, n, tol)
    elif cls == "convex":
        ok, extra = _check_convex(f, n, tol, rng)
    elif cls in ("affine", "affine_1d"):
        ok, extra = _lstsq_affine(f, d, None, tol)
    elif cls == "constant":
        ok, extra = _check_constant(y, tol)
    else:  # pragma: no cover - CLASS_INFO and this switch are kept in sync
        raise AssertionError(cls)
    report.update(extra)
    report["member"] = bool(ok)
    return report


def is_member(f, cls: str, *, L=None, n: int | None = None, tol: float = 1e-9) -> bool:
    """True if `f` passes the numerical membership check of class `cls`."""
    return membership(f, cls, L=L, n=n, tol=tol)["member"]
