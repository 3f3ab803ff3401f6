"""Evidence that a piecewise-affine f is in F_ERM (App. B.2, proof of Thm 1).

F_ERM = {f in F_NN : f = argmin_{f' in F} E_pi l(f'(X), Y) for some
distribution pi on [0, 1] x [0, 1] and a Bregman loss l}. The paper's
argument: take X ~ Unif[0, 1] and Y | X ~ Ber(f(X)); the squared loss (a
Bregman loss) is minimized by the conditional mean E[Y | X] = f.

What is *checked* here, for a given f:
1. f is realized exactly by a ReLU network (so f in F_NN);
2. with labels Y = f(X) (pi = Unif x delta_f, also a valid distribution),
   actually running ERM -- least squares over the output layer of that
   network architecture -- returns f again with zero empirical loss; zero is
   the global minimum of a non-negative loss, so f is an ERM solution over
   all of F;
3. with the paper's Bernoulli labels, the same ERM on M samples lands within
   a few 1/sqrt(M) of f (reported as `bernoulli_sup_error`; statistical, so
   it is evidence, not part of `ok`); the population risk of f under that
   distribution is reported next to the Bayes risk, the integral of f (1 - f).
What is *argued*, not checked: that the population minimizer over all
measurable functions is the conditional mean (a textbook fact).
"""
from __future__ import annotations

import numpy as np

from .relu_nets import certify_relu_network


def _features(g, x):
    """Hidden activations of the exact network of g, plus a bias column."""
    hidden = np.maximum(0.0, x[:, None] - np.concatenate([[0.0], g.knots[1:-1]])[None, :])
    return np.column_stack([hidden, np.ones(len(x))])


def erm_certificate(f, *, n: int | None = None, tol: float = 1e-9, seed: int = 0,
                    bernoulli_samples: int = 20000) -> dict:
    cert = certify_relu_network(f, 1, n=n, tol=tol, seed=seed)
    out = {"ok": False, "relu_network_error": cert["max_error"], "hidden_units": cert["hidden_units"]}
    if not cert["ok"]:
        return out
    g = cert["function"]
    rng = np.random.default_rng(seed)
    # 2. ERM with deterministic labels.
    x = np.concatenate([np.linspace(0, 1, 1001), rng.random(1000)])
    y = np.asarray(f(x), float).reshape(-1)
    Phi = _features(g, x)
    w, *_ = np.linalg.lstsq(Phi, y, rcond=None)
    empirical_loss = float(np.mean((Phi @ w - y) ** 2))
    xt = rng.random(4000)
    erm_error = float(np.max(np.abs(_features(g, xt) @ w - np.asarray(f(xt), float).reshape(-1))))
    # 3. The paper's Bernoulli distribution.
    xb = rng.random(bernoulli_samples)
    yb = (rng.random(bernoulli_samples) < np.asarray(f(xb), float).reshape(-1)).astype(float)
    wb, *_ = np.linalg.lstsq(_features(g, xb), yb, rcond=None)
    xq = np.linspace(0, 1, 20001)
    fq = np.asarray(f(xq), float).reshape(-1)
    bern_error = float(np.max(np.abs(_features(g, xq) @ wb - fq)))
    bayes_risk = float(np.trapezoid(fq * (1 - fq), xq))
    # Population squared risk of f under Ber(f): E[(f(X) - Y)^2] = E[f (1 - f)^2 + (1 - f) f^2].
    risk_f = float(np.trapezoid(fq * (1 - fq) ** 2 + (1 - fq) * fq ** 2, xq))
    out.update({
        "erm_empirical_loss": empirical_loss,
        "erm_recovery_error": erm_error,
        "bernoulli_samples": bernoulli_samples,
        "bernoulli_sup_error": bern_error,
        "population_risk": risk_f,
        "bayes_risk": bayes_risk,
    })
    out["ok"] = bool(empirical_loss <= tol ** 2 and erm_error <= 1e3 * tol)
    return out
