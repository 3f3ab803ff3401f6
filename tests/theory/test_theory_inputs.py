"""Bad input raises FvtrustError; Lemma 1; Phi_minmax itself."""
import numpy as np
import pytest

from fvtrust.errors import FvtrustError
from fvtrust.theory import (PiecewiseAffine1D, check_lemma1, counterexamples, is_member, phi_minmax,
                            switch_circuit)


@pytest.mark.parametrize("cls,phi,params,match", [
    ("convexx", (0.1, 1.0, 0.1, 0.9), {}, "unknown function class.*convex"),
    ("monotone", (1.2, 0.5, 0.1, 0.9), {}, r"\[0, 1\]"),
    ("monotone", (0.2, 0.5, -0.1, 0.9), {}, r"\[0, 1\]"),
    ("monotone", (0.2, 0.5, 0.9, 0.1), {}, "f_min .* > f_max"),
    ("monotone", (0.5, 0.5, 0.1, 0.9), {}, "constant"),
    ("monotone", (0.5, 0.2), {}, "tuple"),
    ("monotone", (np.nan, 0.2, 0.1, 0.3), {}, "non-finite"),
    ("lipschitz", (0.4, 0.6, 0.1, 0.9), {"L": 2.0}, "needs L >= 4"),
    ("lipschitz", (0.4, 0.6, 0.1, 0.2), {}, "needs the Lipschitz constant"),
    ("lipschitz", (0.4, 0.6, 0.1, 0.2), {"L": -1}, "positive"),
    ("monotone", (0.4, 0.6, 0.1, 0.2), {"L": 1.0}, "unexpected parameter"),
    ("affine", (0.0, 1.0, 0.1, 0.2), {}, "d = 2"),
    ("affine_1d", (0.3, 1.0, 0.1, 0.2), {}, "extremes at 0 and 1"),
    ("constant", (0.3, 1.0, 0.1, 0.2), {}, "f_min = f_max"),
    ("affine", (np.array([0.5, 0.5]), np.array([1.0, 1.0]), 0.1, 0.2), {}, "no affine function"),
])
def test_bad_input_raises_fvtrust_error(cls, phi, params, match):
    with pytest.raises(FvtrustError, match=match):
        counterexamples(cls, phi, **params)


def test_bad_membership_input():
    with pytest.raises(FvtrustError, match="unknown function class"):
        is_member(lambda x: x, "lipshitz")
    with pytest.raises(FvtrustError, match="needs the Lipschitz constant"):
        is_member(lambda x: x, "lipschitz")
    f, _ = counterexamples("monotone", (0.2, 0.6, 0.1, 0.9))
    with pytest.raises(FvtrustError, match=r"\[0, 1\]"):
        f(np.array([1.5]))


def test_phi_minmax_exact_at_kinks():
    # The minimum 0.0123 sits at a knot that is not on the grid.
    f = PiecewiseAffine1D([0, 0.123456789, 0.8, 1], [0.5, 0.0123, 0.97, 0.6])
    phi = phi_minmax(f)
    assert phi.x_min == 0.123456789 and phi.f_min == 0.0123
    assert phi.x_max == 0.8 and phi.f_max == 0.97
    # For a callable, the grid finds it to grid accuracy.
    phi2 = phi_minmax(lambda x: (np.asarray(x) - 0.3) ** 2)
    assert abs(phi2.x_min - 0.3) < 1e-3 and phi2.x_max == 1.0


def test_lemma1_switch():
    res = check_lemma1(k=7.5, n=2000, seed=1)
    assert res["holds"]
    assert res["max_error_z0"] == 0.0 and res["max_error_z1"] <= res["tolerance"]
    # Outside the hypothesis k >= max(x, y) the other unit leaks through: the hypothesis matters.
    assert res["leak_when_k_too_small_z0"] > 1 and res["leak_when_k_too_small_z1"] > 1
    import torch

    net = switch_circuit(2.0)
    out = net(torch.tensor([[1.5, 0.25, 0.0], [1.5, 0.25, 1.0], [3.0, 0.0, 0.0]], dtype=torch.float64))
    assert out.reshape(-1).tolist() == [1.5, 0.25, 3.0]
    with pytest.raises(FvtrustError):
        check_lemma1(k=0)
