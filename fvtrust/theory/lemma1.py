"""Lemma 1 (App. B.1): the fooling circuit's switch, checked numerically.

With B(x, z) = relu(x - k z), C(y, z) = relu(y + k z - k) and A = B + C,
N(x, y, z) = A(B(x, z), C(y, z)) equals x when z = 0 and y when z = 1,
provided k >= max(x, y) and x, y >= 0. (In §2.1, x is the unit D whose
visualization is shown -- routed when the detector says "visualization" --
and y the unit F that answers on natural images.)

`check_lemma1` evaluates the circuit twice -- in closed form and as a
three-layer torch ReLU network with the weights of §2.1 -- on random
non-negative inputs, and also on inputs that break the hypothesis
k >= max(x, y), to show the hypothesis is needed (the switch leaks there).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import FvtrustError


def switch_circuit(k: float, dtype=torch.float64) -> nn.Sequential:
    """Input (x, y, z) -> N(x, y, z): Linear(3 -> 2), ReLU (the units B, C), Linear(2 -> 1) (A)."""
    layer_bc = nn.Linear(3, 2, dtype=dtype)
    layer_a = nn.Linear(2, 1, dtype=dtype)
    with torch.no_grad():
        layer_bc.weight.copy_(torch.tensor([[1.0, 0.0, -k], [0.0, 1.0, k]]))
        layer_bc.bias.copy_(torch.tensor([0.0, -k]))
        layer_a.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer_a.bias.zero_()
    return nn.Sequential(layer_bc, nn.ReLU(), layer_a).requires_grad_(False)


def switch(x, y, z, k: float) -> np.ndarray:
    """N(x, y, z) of Lemma 1 in closed form."""
    return np.maximum(0.0, x - k * z) + np.maximum(0.0, y + k * z - k)


def check_lemma1(k: float = 10.0, *, n: int = 10000, seed: int = 0) -> dict:
    """Numerical check of Lemma 1; returns errors where it must hold and leaks where it need not.

    "holds" is True when, for every sampled x, y in [0, k], the closed form
    and the torch network both return x for z = 0 and y for z = 1 (up to
    rounding of y + k - k), and the two implementations agree.
    """
    try:
        k = float(k)
    except (TypeError, ValueError):
        raise FvtrustError(f"k must be a number, got {k!r}") from None
    if not (np.isfinite(k) and k > 0):
        raise FvtrustError(f"Lemma 1 needs k > 0, got {k}")
    rng = np.random.default_rng(seed)
    x, y = rng.random(n) * k, rng.random(n) * k
    x[:2], y[:2] = [k, 0.0], [0.0, k]  # the boundary k = max(x, y)
    net = switch_circuit(k)

    def run_net(x, y, z):
        inp = torch.tensor(np.column_stack([x, y, np.full_like(x, z)]))
        return net(inp).reshape(-1).numpy()

    eps = 4 * np.finfo(float).eps * k
    err0 = float(np.max(np.abs(switch(x, y, 0, k) - x)))
    err1 = float(np.max(np.abs(switch(x, y, 1, k) - y)))
    net_err = float(max(np.max(np.abs(run_net(x, y, 0) - switch(x, y, 0, k))),
                        np.max(np.abs(run_net(x, y, 1) - switch(x, y, 1, k)))))
    # Outside the hypothesis (max(x, y) > k) the other unit leaks through.
    xb, yb = k * (1 + rng.random(n)), k * (1 + rng.random(n))
    leak0 = float(np.max(np.abs(switch(xb, yb, 0, k) - xb)))
    leak1 = float(np.max(np.abs(switch(xb, yb, 1, k) - yb)))
    return {
        "k": k,
        "samples": n,
        "max_error_z0": err0,
        "max_error_z1": err1,
        "max_error_torch_vs_closed_form": net_err,
        "tolerance": eps,
        "holds": bool(err0 <= eps and err1 <= eps and net_err <= eps),
        "leak_when_k_too_small_z0": leak0,
        "leak_when_k_too_small_z1": leak1,
    }
