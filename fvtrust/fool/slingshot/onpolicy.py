"""On-policy tunnel points: where the visualization actually goes (fvtrust's extension of the paper).

Bareeva et al. sample L_manip's points on the straight segment x = p·x_t + ε.
The visualization that is attacked does not walk that segment: Adam moves
every parameter at roughly its own lr per step whatever the gradient's size
(it follows sign-like steps, not the gradient's direction), and random
transforms shake it further, so within a few steps it leaves the thin
segment for parameters where the landscape was never shaped. Measured on
fashion-cnn fc:0 with no preservation at all: the straight tunnel alone gave
Pearson 0.14 to the target; with half of the points from the visualization's
own trajectories, 0.65 (README, "Gradient slingshots").

The fix is the one imitation learning uses against distribution shift
(DAgger): every few fine-tuning steps, run the *real* visualization
procedure — the tunnel's parameterization from its start noise, Adam at
fvtrust's lr, the standard transforms, the unit's channel objective — on the
model as it is being fine-tuned, and add the parameters it visits to the
manipulation set. L_manip's formula is unchanged at those points:
MSE(∇ₓ a_k(x), γ·(x_t − x)) with x in the visualization's parameter space
(the FFT spectrum for `fft`), differentiated through the image map and the
transforms. Starts are fresh noise from the fine-tuning's own seeded
generator, never the seed an auditor's visualization will use.
"""
from __future__ import annotations

import numpy as np
import torch

from ...visualize import transforms as T
from ...visualize.param import make_param
from .loss import Tunnel, unit_activation


def visualization_trajectories(forward, tunnel: Tunnel, unit: int, *, starts: int, steps: int, lr: float = 0.05,
                               transforms: T.TransformSpec | None = None, generator: torch.Generator | None = None,
                               start_generators=None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Every parameter point (starts x (steps + 1)) of `starts` visualizations run for `steps` steps.

    Mirrors fvtrust.visualize's loop: `make_param` noise (sd 0.01) in the
    tunnel's space, Adam(lr), one transform draw per step shared by the batch,
    maximizing the unit's channel objective; `forward(images) -> layer
    activations` is the model being fine-tuned. Weight gradients are not
    taken. Returns a detached tensor of shape (starts·(steps + 1), *leaf).
    Start noise and transform draws come from `generator`; `start_generators`
    (one per start) and `rng` override them (the test that this is
    fvtrust.visualize's own path passes visualize's).
    """
    c, h, w = tunnel.image_shape
    seeds = torch.randint(2**62, (starts + 1,), generator=generator).tolist()
    gens = start_generators or [torch.Generator().manual_seed(int(s)) for s in seeds[:starts]]
    rng = rng if rng is not None else np.random.default_rng(int(seeds[-1]))
    prm = make_param(tunnel.kind, (starts, c, h, w), decorrelate=tunnel.decorrelate, sd=tunnel.noise_sd,
                     generators=gens, device=tunnel.target.device)
    opt = torch.optim.Adam([prm.tensor], lr=lr)
    points = [prm.tensor.detach().clone()]
    for _ in range(steps):
        img = prm.image()
        x = T.apply(img, transforms, T.draw(transforms, rng), out_hw=(h, w)) if transforms is not None else img
        value = unit_activation(forward(x), unit)
        (g,) = torch.autograd.grad(-value.sum(), [prm.tensor])
        prm.tensor.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        points.append(prm.tensor.detach().clone())
    return torch.cat(points)
