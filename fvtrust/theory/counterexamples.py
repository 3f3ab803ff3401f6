"""The constructive proofs of App. B.5: two functions with the same Phi_minmax.

`counterexamples(cls, phi)` returns (f1, f2) in class `cls` with
Phi_minmax(f1) = Phi_minmax(f2) = phi. By Lemma 3 every decoder then errs by
at least ||f1 - f2||_inf / 2 on one of them, and by Lemma 4 it misjudges
"closer to f_max or f_min?" somewhere on one of them whenever 1_{f1 > m} and
1_{f2 > m} differ. Each function carries `.label` naming its construction and
case.

Where the paper's text needs a repair, the repair is made here and said so:

* Thm 1, x_max < x_min: "the same argument applies with 1 - f1 and 1 - f2"
  is read as the value reflection v -> f_min + f_max - v of the construction
  for the swapped positions (literally 1 - f would change f_min and f_max).
* Thm 4, regime 2 Delta > L |x_max - x_min|: the printed f2 leaves the range
  (e.g. f2(0) = f_min + L x_min can exceed f_max, so Phi is not preserved).
  It is capped here at f_max (left) and f_min (right), which keeps it
  L-Lipschitz; then ||f1 - f2|| = min(Delta, L max{min(x_min, x_max),
  1 - max(x_min, x_max)}), and Lemma 3 yields *half* of that. The printed
  bound L max{...} (without the cap and the 1/2) can exceed Prop. 1's upper
  bound Delta / 2 and is therefore not a valid lower bound;
  `proven_bound` returns the corrected value and `paper_bound` the printed one.
* Thm 6, d = 2: the proof claims f is recovered when x_min = (0, 0) (or
  x_max = (0, 0)). That is true for adjacent corners, but not for
  x_min = (0, 0), x_max = (1, 1) (or reversed): f1 = Delta x_1 + f_min and
  f2 = Delta x_2 + f_min share Phi and differ by Delta at (1, 0). The
  theorem's lower bound (0 there) remains true; the construction here
  realizes Delta for all opposite-corner cases and proves identifiability
  for adjacent corners (via `affine_compatible_range`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import FvtrustError
from .classes import check_class, check_L
from .functions import Affine2D, PiecewiseAffine1D, constant_function
from .phi import Phi, validate_phi

THEOREM_1_CLASSES = ("black_box", "nn", "erm", "piecewise_affine", "monotone")


class Bound(NamedTuple):
    """Lower bounds proven for one Phi: on any decoder's sup error and on its indicator error."""

    decoder: float  # for Yes classes (Thm 8): the error the best decoder attains, 0
    closer: float  # 0 or 1
    theorem: str
    case: str
    paper_decoder: float  # the value as printed in the paper (differs only where noted above)


def _label(f, text):
    f.label = text
    return f


def _swap_values(f: PiecewiseAffine1D, phi: Phi) -> PiecewiseAffine1D:
    """v -> f_min + f_max - v, exact on f_min and f_max themselves."""
    v = f.values
    out = phi.f_min + phi.f_max - v
    out[v == phi.f_min] = phi.f_max
    out[v == phi.f_max] = phi.f_min
    return f.with_values(out)


def _constant_pair(phi: Phi, theorem: str):
    c = phi.f_min
    return (_label(constant_function(c, phi.d), f"{theorem}: f_min = f_max, constant"),
            _label(constant_function(c, phi.d), f"{theorem}: f_min = f_max, constant"))


def _theorem1(phi: Phi, name: str = "Thm 1"):
    """B.5.3: flat-ramp-flat, the ramp in the second (f1) or first (f2) half of [x_min, x_max]."""
    if phi.f_min == phi.f_max:
        return _constant_pair(phi, name)
    lo, hi = phi.f_min, phi.f_max
    if phi.x_min < phi.x_max:
        a, b = phi.x_min, phi.x_max
        mid = (a + b) / 2
        f1 = PiecewiseAffine1D([0, mid, b, 1], [lo, lo, hi, hi])
        f2 = PiecewiseAffine1D([0, a, mid, 1], [lo, lo, hi, hi])
        case = "x_min < x_max"
    else:
        swapped = Phi(phi.x_max, phi.x_min, lo, hi)
        g1, g2 = _theorem1(swapped, name)
        f1, f2 = _swap_values(g1, phi), _swap_values(g2, phi)
        case = "x_min > x_max (value reflection)"
    return _label(f1, f"{name} f1, {case}"), _label(f2, f"{name} f2, {case}")


def _theorem4_steep(phi: Phi, L: float):
    """B.5.6, regime 2 Delta > L |x_max - x_min|: linear between the extremes, tents outside (capped)."""
    lo, hi = phi.f_min, phi.f_max
    delta = hi - lo
    if phi.x_min > phi.x_max:
        g1, g2 = _theorem4_steep(Phi(phi.x_max, phi.x_min, lo, hi), L)
        case = "steep regime, x_min > x_max (value reflection)"
        return (_label(_swap_values(g1, phi), f"Thm 4 f1, {case}"),
                _label(_swap_values(g2, phi), f"Thm 4 f2, {case}"))
    a, b = phi.x_min, phi.x_max
    f1 = PiecewiseAffine1D([0, a, b, 1], [lo, lo, hi, hi])
    left_k, left_v = ([0.0], [lo + L * a]) if L * a <= delta else ([0.0, a - delta / L], [hi, hi])
    right_k, right_v = ([1.0], [hi - L * (1 - b)]) if L * (1 - b) <= delta else ([b + delta / L, 1.0], [lo, lo])
    f2 = PiecewiseAffine1D(left_k + [a, b] + right_k, left_v + [lo, hi] + right_v)
    case = "steep regime 2(f_max-f_min) > L|x_max-x_min|, x_min < x_max"
    return _label(f1, f"Thm 4 f1, {case}"), _label(f2, f"Thm 4 f2 (capped tents), {case}")


def _lipschitz(phi: Phi, L: float):
    delta, width = phi.spread, abs(phi.x_max - phi.x_min)
    if delta > L * width * (1 + 1e-12) + 1e-15:
        raise FvtrustError(
            f"no {L:g}-Lipschitz function has this phi: it must climb f_max - f_min = {delta:g} over "
            f"|x_max - x_min| = {width:g}, which needs L >= {delta / width:g}")
    if 2 * delta <= L * width:
        f1, f2 = _theorem1(phi, "Thm 4 (via Thm 1)")
        return f1, f2
    return _theorem4_steep(phi, L)


def _theorem3(phi: Phi):
    """B.5.5: convex f has x_max in {0, 1}; linear vs. flat-then-twice-as-steep."""
    if phi.f_min == phi.f_max:
        return _constant_pair(phi, "Thm 3")
    lo, hi, a = phi.f_min, phi.f_max, phi.x_min
    if phi.x_max == 1.0:
        f1 = PiecewiseAffine1D([0, a, 1], [lo, lo, hi])
        f2 = PiecewiseAffine1D([0, (a + 1) / 2, 1], [lo, lo, hi])
        case = "x_max = 1"
    elif phi.x_max == 0.0:
        # The paper's g(x) = f(1 - x), written out so that f(x_min) = f_min exactly.
        f1 = PiecewiseAffine1D([0, a, 1], [hi, lo, lo])
        f2 = PiecewiseAffine1D([0, a / 2, 1], [hi, lo, lo])
        case = "x_max = 0 (mirror)"
    else:
        raise FvtrustError(f"a non-constant convex function attains its maximum at 0 or 1, not at "
                           f"x_max = {phi.x_max:g}")
    return _label(f1, f"Thm 3 f1, {case}"), _label(f2, f"Thm 3 f2, {case}")


def _is_corner(x) -> bool:
    return bool(np.all((np.asarray(x) == 0.0) | (np.asarray(x) == 1.0)))


def affine_compatible_range(phi, *, d: int | None = None) -> dict:
    """All affine f on [0, 1]^d with this Phi, by linear programming.

    The compatible f are an (a, c)-polytope: f(x_min) = f_min, f(x_max) = f_max
    and f_min <= f(corner) <= f_max at every corner (an affine function takes
    its extremes at corners). Since |f - f'| is also maximal at a corner, the
    largest sup distance between two compatible f is the largest range of
    f(corner) over the polytope. Returns {"max_distance", "corner", "f_hi",
    "f_lo"}; FvtrustError if no affine function has this Phi.
    """
    from scipy.optimize import linprog

    phi = validate_phi(phi, d)
    d = phi.d
    corners = np.array([[0.0], [1.0]]) if d == 1 else Affine2D.CORNERS
    xmin, xmax = np.ravel(phi.x_min), np.ravel(phi.x_max)
    A_eq = np.array([np.append(xmin, 1.0), np.append(xmax, 1.0)])
    b_eq = np.array([phi.f_min, phi.f_max])
    C = np.column_stack([corners, np.ones(len(corners))])
    A_ub = np.vstack([C, -C])
    b_ub = np.concatenate([np.full(len(C), phi.f_max), np.full(len(C), -phi.f_min)])
    best = None
    for i, row in enumerate(C):
        hi = linprog(-row, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(None, None)] * (d + 1),
                     method="highs")
        lo = linprog(row, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(None, None)] * (d + 1),
                     method="highs")
        if hi.status == 2 or lo.status == 2:
            raise FvtrustError("no affine function on [0, 1]^d has this phi (its extremes must be at "
                               "corners or on faces where it is flat)")
        if hi.status != 0 or lo.status != 0:  # pragma: no cover - bounded LP, should not happen
            raise FvtrustError(f"linear program failed: {hi.message} / {lo.message}")
        rng = float(row @ hi.x - row @ lo.x)
        if best is None or rng > best[0]:
            best = (rng, i, hi.x, lo.x)
    rng, i, x_hi, x_lo = best
    if d == 1:
        f_hi = PiecewiseAffine1D([0, 1], [x_hi[1], x_hi[0] + x_hi[1]], label="LP: highest at corner")
        f_lo = PiecewiseAffine1D([0, 1], [x_lo[1], x_lo[0] + x_lo[1]], label="LP: lowest at corner")
    else:
        f_hi = Affine2D(*x_hi, label="LP: highest at corner")
        f_lo = Affine2D(*x_lo, label="LP: lowest at corner")
    return {"max_distance": max(rng, 0.0), "corner": corners[i].tolist(), "f_hi": f_hi, "f_lo": f_lo}


def _theorem6(phi: Phi):
    """B.5.8 for d = 2 (with the diagonal case repaired, see the module docstring)."""
    if phi.f_min == phi.f_max:
        return _constant_pair(phi, "Thm 6")
    xmin, xmax = np.asarray(phi.x_min, float), np.asarray(phi.x_max, float)
    if not (_is_corner(xmin) and _is_corner(xmax)):
        res = affine_compatible_range(phi)
        return (_label(res["f_hi"], "Thm 6 f1, non-corner phi (LP extremes)"),
                _label(res["f_lo"], "Thm 6 f2, non-corner phi (LP extremes)"))
    lo, hi = phi.f_min, phi.f_max
    if np.array_equal(xmin + xmax, [1.0, 1.0]):
        # Opposite corners: the value t at a third corner p is free in [f_min, f_max]
        # (the fourth corner then takes f_min + f_max - t).
        others = [c for c in Affine2D.CORNERS if not (np.array_equal(c, xmin) or np.array_equal(c, xmax))]
        p = min(others, key=lambda c: (c.sum(), c[0]))
        pts = [xmin, xmax, p]
        case = "opposite corners, " + ("anti-diagonal (paper's cases 1, 2)" if xmin[0] != xmin[1]
                                       else "diagonal (paper claims recoverable; it is not)")
        f1 = Affine2D.through(pts, [lo, hi, lo])
        f2 = Affine2D.through(pts, [lo, hi, hi])
        return _label(f1, f"Thm 6 f1, {case}"), _label(f2, f"Thm 6 f2, {case}")
    # Adjacent corners: f = f_min + Delta * (x_i - x_min,i) / (x_max,i - x_min,i) is the only choice.
    i = int(np.nonzero(xmin != xmax)[0][0])
    coef = np.zeros(2)
    coef[i] = (hi - lo) / (xmax[i] - xmin[i])
    f = Affine2D(coef[0], coef[1], lo - coef[i] * xmin[i])
    f.label = "Thm 6, adjacent corners: phi determines f (f1 = f2)"
    return f, Affine2D(f.a, f.b, f.c, label=f.label)


def _affine_1d(phi: Phi):
    """Thm 8: in d = 1 a non-constant affine f has {x_min, x_max} = {0, 1} and is determined by Phi."""
    if phi.f_min == phi.f_max:
        return _constant_pair(phi, "Thm 8")
    if {phi.x_min, phi.x_max} != {0.0, 1.0}:
        raise FvtrustError("a non-constant affine function on [0, 1] has its extremes at 0 and 1, not at "
                           f"x_min = {phi.x_min:g}, x_max = {phi.x_max:g}")
    vals = [phi.f_min, phi.f_max] if phi.x_min == 0.0 else [phi.f_max, phi.f_min]
    label = "Thm 8: phi determines f (f1 = f2)"
    return PiecewiseAffine1D([0, 1], vals, label=label), PiecewiseAffine1D([0, 1], vals, label=label)


def _constant(phi: Phi):
    if phi.f_min != phi.f_max:
        raise FvtrustError(f"a constant function has f_min = f_max, got {phi.f_min:g} < {phi.f_max:g}")
    return _constant_pair(phi, "Thm 8")


def counterexamples(cls: str, phi, **params):
    """(f1, f2) in class `cls` with Phi_minmax(f1) = Phi_minmax(f2) = phi, as in App. B.5.

    `phi` = (x_min, x_max, f_min, f_max); x is a float, or a length-2 array for
    cls = "affine". Class "lipschitz" needs `L=`. For the Yes classes of
    Table 1 ("affine_1d", "constant") f1 = f2: Phi determines f.
    """
    info = check_class(cls)
    unknown = set(params) - ({"L"} if info.needs_L else set())
    if unknown:
        raise FvtrustError(f"unexpected parameter(s) for class {cls!r}: {', '.join(sorted(unknown))}")
    phi = validate_phi(phi, info.d)
    if cls in THEOREM_1_CLASSES:
        return _theorem1(phi)
    if cls == "lipschitz":
        return _lipschitz(phi, check_L(params.get("L")))
    if cls == "convex":
        return _theorem3(phi)
    if cls == "affine":
        return _theorem6(phi)
    if cls == "affine_1d":
        return _affine_1d(phi)
    return _constant(phi)


def lipschitz_envelopes(phi, L: float):
    """The pointwise largest and smallest L-Lipschitz functions with this Phi (d = 1).

    U(x) = min(f_max, f_min + L|x - x_min|), V(x) = max(f_min, f_max - L|x - x_max|).
    Every compatible f lies between them, so ||U - V|| / 2 is the exact minimax
    decoder error for F_Lip^L at this Phi (attained by the decoder (U + V) / 2).
    Reported next to Thm 4 as a sharper reference; not part of the paper.
    """
    phi = validate_phi(phi, 1)
    L = check_L(L)
    _lipschitz(phi, L)  # raises if no L-Lipschitz function has this Phi
    lo, hi, a, b = phi.f_min, phi.f_max, phi.x_min, phi.x_max
    r = (hi - lo) / L
    knots = np.unique(np.clip([0.0, 1.0, a, b, a - r, a + r, b - r, b + r], 0.0, 1.0))
    upper = np.minimum(hi, lo + L * np.abs(knots - a))
    lower = np.maximum(lo, hi - L * np.abs(knots - b))
    return (PiecewiseAffine1D(knots, upper, label="Lipschitz upper envelope"),
            PiecewiseAffine1D(knots, lower, label="Lipschitz lower envelope"))


def proven_bound(cls: str, phi, **params) -> Bound:
    """What the matching theorem guarantees for this Phi (see the module docstring for repairs)."""
    info = check_class(cls)
    phi = validate_phi(phi, info.d)
    delta = phi.spread
    nonconst = 1.0 if delta > 0 else 0.0
    if cls in THEOREM_1_CLASSES:
        case = "constant" if not delta else ("x_min < x_max" if phi.x_min < phi.x_max else "x_min > x_max")
        return Bound(delta / 2, nonconst, "Theorem 1 / 2", case, delta / 2)
    if cls == "lipschitz":
        L = check_L(params.get("L"))
        _lipschitz(phi, L)
        width = abs(phi.x_max - phi.x_min)
        if 2 * delta <= L * width:
            return Bound(delta / 2, nonconst, "Theorem 4 / 5", "regime 2*Delta <= L*|dx|", delta / 2)
        room = max(min(phi.x_min, phi.x_max), 1 - max(phi.x_min, phi.x_max))
        return Bound(min(delta, L * room) / 2, 0.0, "Theorem 4 (corrected)", "regime 2*Delta > L*|dx|",
                     L * room)
    if cls == "convex":
        _theorem3(phi)  # raises for impossible phi
        case = "constant" if not delta else f"x_max = {phi.x_max:g}"
        return Bound(delta / 4, nonconst, "Theorem 3 / 2", case, delta / 4)
    if cls == "affine":
        # The printed bound of Thms 6/7 (which assume corner extremes).
        anti = float(phi.x_min[0] != phi.x_min[1]) * float(phi.x_max[0] != phi.x_max[1])
        printed = anti * delta / 2
        if not delta:
            return Bound(0.0, 0.0, "Theorem 6 / 7", "constant", 0.0)
        if not (_is_corner(phi.x_min) and _is_corner(phi.x_max)):
            exact = affine_compatible_range(phi)["max_distance"] / 2
            return Bound(exact, 0.0, "Theorem 6 (LP; the theorem assumes corners)", "non-corner phi", printed)
        if np.array_equal(np.add(phi.x_min, phi.x_max), [1.0, 1.0]):
            case = "opposite corners, " + ("anti-diagonal" if anti else "diagonal (repaired)")
            return Bound(delta / 2, 1.0, "Theorem 6 / 7" if anti else "Theorem 6 / 7 (repaired)", case, printed)
        return Bound(0.0, 0.0, "Theorem 6 / 7", "adjacent corners: phi determines f", printed)
    if cls == "affine_1d":
        _affine_1d(phi)
    else:
        _constant(phi)
    return Bound(0.0, 0.0, "Theorem 8 / 8", "determined by phi", 0.0)
