"""The App. B.5 constructions: membership, shared Phi, and the bounds they realize."""
import numpy as np
import pytest

from fvtrust.theory import (CLASS_INFO, CLASSES, Affine2D, PiecewiseAffine1D, affine_compatible_range,
                            counterexamples, is_member, lipschitz_envelopes, phi_minmax, phi_mismatch,
                            proven_bound, sup_error)
from fvtrust.theory.decoders import indicator_error
from fvtrust.theory.sampling import random_member

RNG_SEEDS = range(12)


def _pairs(cls):
    """(phi, params) from random members of the class, so every Phi is one a real f has."""
    rng = np.random.default_rng(1234)
    for _ in RNG_SEEDS:
        f, params = random_member(cls, rng)
        yield phi_minmax(f, CLASS_INFO[cls].d), params


def _check_pair(cls, phi, params):
    d = CLASS_INFO[cls].d
    f1, f2 = counterexamples(cls, phi, **params)
    assert is_member(f1, cls, **params), (cls, phi, f1)
    assert is_member(f2, cls, **params), (cls, phi, f2)
    assert phi_mismatch(f1, phi) <= 1e-9 and phi_mismatch(f2, phi) <= 1e-9
    # Both functions give the same numerical Phi_minmax values.
    p1, p2 = phi_minmax(f1, d), phi_minmax(f2, d)
    assert abs(p1.f_min - p2.f_min) <= 1e-9 and abs(p1.f_max - p2.f_max) <= 1e-9
    bound = proven_bound(cls, phi, **params)
    dist = sup_error(f1, f2, d)
    assert dist / 2 >= bound.decoder - 1e-9, (cls, phi, dist, bound)
    m = (phi[2] + phi[3]) / 2
    if bound.closer:
        assert indicator_error(f1, f2, m, d, strict_both=True) == 1
    return f1, f2, dist, bound


@pytest.mark.parametrize("cls", CLASSES)
def test_random_phi_members_shared_phi_and_bound(cls):
    for phi, params in _pairs(cls):
        _check_pair(cls, phi, params)


@pytest.mark.parametrize("cls", ["black_box", "nn", "erm", "piecewise_affine", "monotone"])
@pytest.mark.parametrize("phi", [(0.2, 0.7, 0.1, 0.9), (0.7, 0.2, 0.1, 0.9), (0.0, 1.0, 0.0, 1.0),
                                 (1.0, 0.0, 0.3, 0.35), (0.5, 0.5, 0.4, 0.4)])
def test_theorem1_cases_realize_full_range(cls, phi):
    _, _, dist, bound = _check_pair(cls, phi, {})
    assert dist == pytest.approx(phi[3] - phi[2], abs=1e-12)  # ||f1 - f2|| = f_max - f_min
    assert bound.decoder == pytest.approx((phi[3] - phi[2]) / 2)


@pytest.mark.parametrize("phi", [(0.3, 1.0, 0.1, 0.9), (0.0, 1.0, 0.1, 0.9), (0.6, 0.0, 0.0, 1.0),
                                 (1.0, 0.0, 0.2, 0.5)])
def test_convex_cases_realize_quarter_bound(phi):
    f1, f2, dist, _ = _check_pair("convex", phi, {})
    assert dist == pytest.approx((phi[3] - phi[2]) / 2)  # Lemma 3 then gives (f_max - f_min) / 4
    # The Thm 2 witness point of App. B.5.4 (x_max = 1): f1 > m there while f2 = m.
    if phi[1] == 1.0:
        x = np.array([phi[0] / 4 + 3 / 4])
        m = (phi[2] + phi[3]) / 2
        assert f1(x)[0] > m and f2(x)[0] == pytest.approx(m)


def test_convex_rejects_interior_argmax():
    from fvtrust.errors import FvtrustError

    with pytest.raises(FvtrustError, match="maximum at 0 or 1"):
        counterexamples("convex", (0.2, 0.5, 0.1, 0.9))


@pytest.mark.parametrize("phi,L", [((0.1, 0.9, 0.2, 0.6), 2.0), ((0.9, 0.1, 0.2, 0.6), 1.0),
                                   ((0.4, 0.6, 0.3, 0.45), 1.0), ((0.6, 0.4, 0.3, 0.45), 1.0),
                                   ((0.1, 0.15, 0.5, 0.9), 8.0), ((0.0, 1.0, 0.0, 1.0), 1.0)])
def test_lipschitz_both_regimes(phi, L):
    f1, f2, dist, bound = _check_pair("lipschitz", phi, {"L": L})
    delta, width = phi[3] - phi[2], abs(phi[1] - phi[0])
    if 2 * delta <= L * width:
        assert dist == pytest.approx(delta)
        assert "via Thm 1" in f1.label
    else:
        room = max(min(phi[0], phi[1]), 1 - max(phi[0], phi[1]))
        assert dist == pytest.approx(min(delta, L * room))
        assert "steep" in f1.label
        # The envelopes bound every compatible function, so no pair can beat them.
        upper, lower = lipschitz_envelopes(phi, L)
        assert sup_error(upper, lower) >= dist - 1e-12


def test_lipschitz_printed_bound_is_repaired():
    # App. B.5.6 as printed: f2(0) = f_min + L x_min = 0.7 > f_max, so Phi would change ...
    phi, L = (0.4, 0.6, 0.3, 0.45), 1.0
    b = proven_bound("lipschitz", phi, L=L)
    assert b.paper_decoder == pytest.approx(0.4)  # ... and the printed bound 0.4 exceeds Prop. 1's 0.075
    assert b.decoder == pytest.approx(0.075)
    f1, f2 = counterexamples("lipschitz", phi, L=L)
    assert f2(np.array([0.0]))[0] == pytest.approx(0.45)  # capped at f_max


CORNERS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]


@pytest.mark.parametrize("xmin,xmax", [(a, b) for a in CORNERS for b in CORNERS if a != b])
def test_affine_2d_corner_cases(xmin, xmax):
    phi = (np.array(xmin), np.array(xmax), 0.2, 0.8)
    f1, f2, dist, bound = _check_pair("affine", phi, {})
    opposite = xmin[0] + xmax[0] == 1 and xmin[1] + xmax[1] == 1
    assert dist == pytest.approx(0.6 if opposite else 0.0, abs=1e-12)
    # The LP over all compatible affine functions agrees: the construction is the worst case.
    assert affine_compatible_range(phi)["max_distance"] == pytest.approx(dist, abs=1e-9)
    # The paper's printed Thm 6 bound: nonzero only when both points are off the diagonal.
    anti = xmin[0] != xmin[1] and xmax[0] != xmax[1]
    assert bound.paper_decoder == pytest.approx(0.3 if anti else 0.0)


def test_affine_2d_diagonal_case_is_not_identifiable():
    f1, f2 = counterexamples("affine", (np.array([0.0, 0.0]), np.array([1.0, 1.0]), 0.2, 0.8))
    x = np.array([[1.0, 0.0]])
    assert abs(f1(x)[0] - f2(x)[0]) == pytest.approx(0.6)


def test_affine_2d_constant_and_edge_phi():
    f1, f2 = counterexamples("affine", (np.array([0.3, 0.3]), np.array([0.3, 0.3]), 0.5, 0.5))
    assert sup_error(f1, f2, 2) == 0.0 and is_member(f1, "affine")
    # Minimizer on an edge: only the flat-in-x2 function fits; the LP proves it.
    phi = (np.array([0.0, 0.3]), np.array([1.0, 0.5]), 0.2, 0.8)
    f1, f2, dist, _ = _check_pair("affine", phi, {})
    assert dist == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("phi", [(0.0, 1.0, 0.2, 0.7), (1.0, 0.0, 0.0, 1.0), (0.4, 0.9, 0.3, 0.3)])
def test_yes_classes_pair_is_identical(phi):
    f1, f2, dist, _ = _check_pair("affine_1d", phi, {})
    assert dist == 0.0
    assert affine_compatible_range(phi)["max_distance"] == pytest.approx(0.0, abs=1e-12)


def test_constant_pair():
    f1, f2, dist, _ = _check_pair("constant", (0.1, 0.9, 0.25, 0.25), {})
    assert dist == 0.0 and f1(np.array([0.3]))[0] == 0.25


# -- the membership checks can say no ---------------------------------------------------

def test_membership_rejects_non_members():
    bump = PiecewiseAffine1D([0, 0.5, 1], [0.1, 0.9, 0.1])
    assert is_member(bump, "piecewise_affine") and is_member(bump, "nn") and is_member(bump, "black_box")
    assert not is_member(bump, "monotone")
    assert not is_member(bump, "convex")
    assert is_member(PiecewiseAffine1D([0, 0.5, 1], [0.9, 0.1, 0.9]), "convex")
    assert not is_member(bump, "lipschitz", L=1.5) and is_member(bump, "lipschitz", L=1.6)
    assert not is_member(bump, "affine_1d") and not is_member(bump, "constant")
    smooth = lambda x: 0.5 + 0.4 * np.sin(6 * np.asarray(x))  # noqa: E731
    assert is_member(smooth, "black_box")
    assert not is_member(smooth, "piecewise_affine") and not is_member(smooth, "nn")
    assert not is_member(smooth, "erm")
    assert not is_member(lambda x: 1.5 * np.asarray(x), "black_box")  # leaves [0, 1]
    assert is_member(Affine2D(0.3, -0.3, 0.5), "affine")
    bilinear = lambda x: 0.5 * np.asarray(x)[:, 0] * np.asarray(x)[:, 1]  # noqa: E731
    assert not is_member(bilinear, "affine")


def test_relu_fit_certifies_plain_callables():
    # A callable (not a PiecewiseAffine1D) with kinks off the grid is still recovered exactly.
    f = lambda x: np.clip(np.abs(np.asarray(x) - 0.3137) * 2.1 + 0.05, 0, 1)  # noqa: E731
    assert is_member(f, "nn") and is_member(f, "piecewise_affine") and is_member(f, "erm")
