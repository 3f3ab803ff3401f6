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

A refresh may continue the previous refresh's visualizations (`Rollout`,
finetune's `policy_horizon`) instead of restarting them: on fc:0 the
slingshot's Pearson to the target peaked at step 64 of the standard
visualization (0.67-0.73) and decayed to 0.50-0.53 by its step 512, where
64-step refreshes had never trained a point. Continued rollouts are reset
at every epoch's start, so resume stays exact.
"""
from __future__ import annotations

import numpy as np
import torch

from ...visualize import transforms as T
from ...visualize.param import make_param
from .loss import Tunnel, unit_activation


class Rollout:
    """`starts` visualizations that can be continued: Adam state, start noise and transform draws persist.

    Mirrors fvtrust.visualize's loop: `make_param` noise (sd 0.01) in the
    tunnel's space, Adam(lr), one transform draw per step shared by the batch,
    maximizing the unit's channel objective. `points` holds every parameter
    point visited since the start, shape (starts·(steps run + 1), *leaf).
    Start noise and transform draws come from `generator`; `start_generators`
    (one per start) and `rng` override them (the test that this is
    fvtrust.visualize's own path passes visualize's).
    """

    def __init__(self, tunnel: Tunnel, *, starts: int, lr: float = 0.05, transforms: T.TransformSpec | None = None,
                 generator: torch.Generator | None = None, start_generators=None,
                 rng: np.random.Generator | None = None):
        c, h, w = tunnel.image_shape
        seeds = torch.randint(2**62, (starts + 1,), generator=generator).tolist()
        gens = start_generators or [torch.Generator().manual_seed(int(s)) for s in seeds[:starts]]
        self.rng = rng if rng is not None else np.random.default_rng(int(seeds[-1]))
        self.prm = make_param(tunnel.kind, (starts, c, h, w), decorrelate=tunnel.decorrelate, sd=tunnel.noise_sd,
                              generators=gens, device=tunnel.target.device)
        self.opt = torch.optim.Adam([self.prm.tensor], lr=lr)
        self.transforms, self.hw, self.unit = transforms, (h, w), None
        self.steps_run = 0
        self._points = [self.prm.tensor.detach().clone()]

    def run(self, forward, unit: int, steps: int) -> "Rollout":
        """Continue every visualization by `steps` steps on `forward` (the model as it is now; no weight grads)."""
        prm, tf = self.prm, self.transforms
        for _ in range(steps):
            img = prm.image()
            x = T.apply(img, tf, T.draw(tf, self.rng), out_hw=self.hw) if tf is not None else img
            value = unit_activation(forward(x), unit)
            (g,) = torch.autograd.grad(-value.sum(), [prm.tensor])
            prm.tensor.grad = g
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self._points.append(prm.tensor.detach().clone())
        self.steps_run += steps
        return self

    @property
    def points(self) -> torch.Tensor:
        return torch.cat(self._points)


def visualization_trajectories(forward, tunnel: Tunnel, unit: int, *, starts: int, steps: int, lr: float = 0.05,
                               transforms: T.TransformSpec | None = None, generator: torch.Generator | None = None,
                               start_generators=None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Every parameter point (starts x (steps + 1)) of `starts` fresh visualizations run for `steps` steps
    (a `Rollout` run once; see there)."""
    return Rollout(tunnel, starts=starts, lr=lr, transforms=transforms, generator=generator,
                   start_generators=start_generators, rng=rng).run(forward, unit, steps).points
