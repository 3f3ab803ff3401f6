"""Prop. 1, Thm 8 and Lemmas 3/4 on concrete decoders."""
import numpy as np
import pytest

from fvtrust.theory import (CLASS_INFO, affine_decoder, counterexamples, midpoint_decoder, phi_minmax,
                            sup_error)
from fvtrust.theory.decoders import indicator_error
from fvtrust.theory.sampling import random_member


@pytest.mark.parametrize("cls", ["affine_1d", "constant"])
def test_thm8_decoder_is_exact_on_yes_classes(cls):
    rng = np.random.default_rng(7)
    for _ in range(50):
        f, _ = random_member(cls, rng)
        phi = phi_minmax(f, 1)
        g = affine_decoder(phi)
        assert sup_error(f, g) <= 1e-12
        assert indicator_error(f, g, (phi.f_min + phi.f_max) / 2) == 0


@pytest.mark.parametrize("cls", ["monotone", "convex", "piecewise_affine", "lipschitz"])
def test_thm8_decoder_fails_elsewhere(cls):
    rng = np.random.default_rng(8)
    worst = 0.0
    for _ in range(20):
        f, params = random_member(cls, rng)
        phi = phi_minmax(f, 1)
        if phi.f_max > phi.f_min:
            worst = max(worst, sup_error(f, affine_decoder(phi)) / (phi.f_max - phi.f_min))
    assert worst > 0.05


@pytest.mark.parametrize("cls", ["black_box", "monotone", "convex", "lipschitz", "affine"])
def test_prop1_midpoint_error_at_most_half_range(cls):
    rng = np.random.default_rng(9)
    d = CLASS_INFO[cls].d
    for _ in range(20):
        f, _ = random_member(cls, rng)
        phi = phi_minmax(f, d)
        assert sup_error(f, midpoint_decoder(phi), d) <= (phi.f_max - phi.f_min) / 2 + 1e-12


def test_lemma3_and_lemma4_bind_any_decoder():
    phi = (0.25, 0.6, 0.1, 0.7)
    f1, f2 = counterexamples("monotone", phi)
    lb = sup_error(f1, f2) / 2
    m = (phi[2] + phi[3]) / 2

    def bad_guess(x):  # an arbitrary decoder output: it must fail on f1 or f2
        return 0.1 + 0.6 * np.asarray(x) ** 2

    for g in (midpoint_decoder(phi), affine_decoder(phi), bad_guess, f1, f2):
        assert max(sup_error(f1, g), sup_error(f2, g)) >= lb - 1e-12
        assert max(indicator_error(f1, g, m), indicator_error(f2, g, m)) == 1
    # And the midpoint decoder attains it exactly: the bound is tight (Prop. 1).
    assert max(sup_error(f1, midpoint_decoder(phi)), sup_error(f2, midpoint_decoder(phi))) == pytest.approx(lb)


def test_affine_decoder_refuses_d2():
    from fvtrust.errors import FvtrustError

    with pytest.raises(FvtrustError, match="d = 1"):
        affine_decoder((np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.1, 0.9))
