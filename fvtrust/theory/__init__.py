"""Theory of §4 / App. B: when can a feature visualization predict f?

A feature visualization is modelled as Phi_minmax(f) = (argmin, argmax, min,
max). For each function class of Table 1 this package builds the paper's
constructive counterexamples -- two functions of the class with the same
Phi_minmax that differ by a proven amount -- as exact closed forms and exact
ReLU networks, checks them numerically, and derives Table 1 from them.

    >>> from fvtrust.theory import counterexamples, table1
    >>> f1, f2 = counterexamples("monotone", (0.2, 0.7, 0.1, 0.9))
    >>> table1(samples=20)["convex"]
    {'exact': False, 'approx': False, 'closer': False}
"""
from .classes import CLASS_INFO, CLASSES, COLUMNS, FunctionClass, is_member, membership
from .counterexamples import (Bound, affine_compatible_range, counterexamples, lipschitz_envelopes,
                              proven_bound)
from .decoders import affine_decoder, indicator_error, midpoint_decoder, sup_error
from .erm import erm_certificate
from .figures import plot_counterexamples
from .functions import Affine2D, PiecewiseAffine1D
from .lemma1 import check_lemma1, switch_circuit
from .phi import Phi, phi_minmax, phi_mismatch, shares_phi, validate_phi
from .relu_nets import ReluNet, certify_relu_network, relu_fv_model, relu_network
from .table import Table1, TheoryCheckFailed, table1

__all__ = [
    "CLASSES", "CLASS_INFO", "COLUMNS", "FunctionClass", "is_member", "membership",
    "counterexamples", "proven_bound", "Bound", "affine_compatible_range", "lipschitz_envelopes",
    "midpoint_decoder", "affine_decoder", "sup_error", "indicator_error",
    "erm_certificate", "plot_counterexamples", "PiecewiseAffine1D", "Affine2D",
    "check_lemma1", "switch_circuit",
    "Phi", "phi_minmax", "phi_mismatch", "shares_phi", "validate_phi",
    "ReluNet", "relu_network", "relu_fv_model", "certify_relu_network",
    "table1", "Table1", "TheoryCheckFailed",
]
