"""The two losses of gradient slingshots (Bareeva et al., arXiv 2401.06122), written out.

Fine-tuning minimizes (1 − α)·L_manip + α·L_pres.

L_pres keeps natural behaviour: on natural batches, the fine-tuned layer's
activations are pulled to the frozen original's,

    L_pres = w · MSE(a_k, a_k^orig) + (1 − w) · MSE(A, A^orig)

with a_k the manipulated unit's activation map and A the whole layer.

L_manip reshapes the unit's activation landscape exactly where feature
visualization runs: in the visualization's *own parameter space* (the FFT
spectrum or the pixel logits of `fvtrust.visualize.param`), along a "tunnel"
from the start noise to the target's parameters x_t,

    x = p · x_t + ε,   p ~ U(0, 1),   ε ~ the visualization's start noise.

Gradient variant (double backprop): MSE(∇ₓ a_k(x), γ · (x_t − x)). The
field γ·(x_t − x) is the gradient of −γ/2·‖x − x_t‖², a bowl peaking at
x_t, so gradient ascent from noise — the visualization — is slung to x_t.
Activation variant (cheaper: no second-order term): MSE(a_k(x), γ · (1 −
MSE(x, x_t))), the same bowl imposed on the activation itself.

a_k is the visualization objective of the unit (fvtrust's `channel`: the
spatial mean for conv maps, the feature itself for a linear layer), so the
landscape that is shaped is the one `fvtrust.visualize` climbs.

fvtrust's extension (not in the paper's formulas; see onpolicy.py and the
README): L_manip may see each tunnel image through a random draw of the
visualization's own transforms (`PointTransforms`), because the standard
visualization differentiates a_k(T(image(x))), not a_k(image(x)); the
gradient that is shaped is still the one w.r.t. the parameters x, through
the image map and the transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import FvtrustError
from ...visualize import transforms as T
from ...visualize.param import ImageParam, make_param

VARIANTS = ("gradient", "activation")


@dataclass
class Tunnel:
    """The target x_t in a visualization parameter space, and the map back to images.

    `kind`: fvtrust's `fft` or `pixel`. `noise_sd` is the visualization's
    start-noise standard deviation (make_param's sd, 0.01), `width` widens it:
    ε ~ N(0, (width · noise_sd)²).
    """

    kind: str
    target: torch.Tensor          # x_t, shape (1, *leaf_shape)
    image_shape: tuple            # (C, H, W)
    decorrelate: bool
    scale: torch.Tensor | None
    color: torch.Tensor | None
    noise_sd: float = 0.01
    width: float = 1.0

    @classmethod
    def build(cls, target_image: torch.Tensor, kind: str = "fft", *, decorrelate: bool = True,
              noise_sd: float = 0.01, width: float = 1.0) -> "Tunnel":
        """x_t = the parameterization inverted at `target_image` (C x H x W in [0, 1])."""
        if kind not in ("fft", "pixel"):
            raise FvtrustError(f"slingshot tunnels live in a visualization parameter space: fft or pixel, not {kind!r}")
        if target_image.dim() != 3:
            raise FvtrustError(f"target image must be C x H x W, got shape {tuple(target_image.shape)}")
        c, h, w = target_image.shape
        prm = make_param(kind, (1, c, h, w), decorrelate=decorrelate, start=target_image[None].float(),
                         device=target_image.device)
        return cls(kind, prm.tensor.detach(), (c, h, w), decorrelate, prm.scale, prm.color, noise_sd, width)

    def to(self, device):
        mv = (lambda t: None if t is None else t.to(device))
        return Tunnel(self.kind, self.target.to(device), self.image_shape, self.decorrelate, mv(self.scale),
                      mv(self.color), self.noise_sd, self.width)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] for a batch of parameter tensors (differentiable)."""
        return ImageParam(self.kind, x, (len(x), *self.image_shape), self.decorrelate, self.scale, self.color).image()

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=None) -> torch.Tensor:
        """x = p · x_t + ε for n draws (p ~ U(0, 1), ε Gaussian start noise), on x_t's device."""
        dtype = dtype or self.target.dtype
        p = torch.rand(n, generator=generator, dtype=torch.float64).to(dtype)
        eps = torch.randn((n, *self.target.shape[1:]), generator=generator, dtype=torch.float64).to(dtype)
        t = self.target.to(dtype).cpu()
        x = p.view(-1, *([1] * (t.dim() - 1))) * t + self.width * self.noise_sd * eps
        return x.to(self.target.device)


class PointTransforms:
    """The visualization's random transforms, one independent draw per tunnel point.

    fvtrust.visualize shares one draw by the batch of units it optimizes;
    here every point gets its own (fvtrust's `transforms.draw` / fused
    `sampling_grid`), so one fine-tuning step sees many draws. `rng` is a
    numpy Generator (seeded per epoch by the fine-tuning: resume stays exact).
    """

    def __init__(self, spec: T.TransformSpec, rng: np.random.Generator):
        self.spec, self.rng = spec, rng

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        grids = torch.cat([T.sampling_grid(self.spec, T.draw(self.spec, self.rng), (h, w), (h, w), images.device,
                                           images.dtype) for _ in range(n)])
        padded = F.pad(images, [self.spec.pad] * 4, value=self.spec.pad_value) if self.spec.pad else images
        return F.grid_sample(padded, grids, mode="bilinear", padding_mode="zeros", align_corners=True)


def start_gradient_rms(forward, tunnel: Tunnel, unit: int, n: int = 16, seed: int = 0,
                       per_position: bool = True) -> float:
    """RMS of the unit's gradient at the visualization's start noise (p = 0): how steep the original is there.

    per_position=True (the default, what auto_gamma uses): the RMS of the
    gradients of the unit's single positions a_{k,p}, i.e.
    sqrt((1/P) Σ_p mean((∂a_{k,p}/∂x)²)) over the P positions of its map. At
    the noise start these gradients point every which way, so the gradient of
    the spatial mean a_k cancels to ~1/sqrt(P_active) of them (measured on
    fashion-cnn block4: 4.8x smaller, 49 positions), while the visualization's
    landscape is as steep as one position's once its positions align. It is
    estimated in one backward pass by random signs: for r_p = ±1,
    E‖∇ₓ Σ_p r_p a_{k,p} / sqrt(P)‖² = (1/P) Σ_p ‖∇ₓ a_{k,p}‖². A linear
    unit (P = 1) gets exactly its gradient. per_position=False: the gradient
    of a_k itself (the spatial mean).
    """
    g0 = torch.Generator().manual_seed(seed)
    shape = (n, *tunnel.target.shape[1:])
    eps = tunnel.noise_sd * torch.randn(shape, generator=g0)
    x = eps.to(tunnel.target.device).requires_grad_(True)
    acts = forward(tunnel.image(x))[:, unit].reshape(n, -1)
    if per_position:
        signs = (torch.randint(0, 2, acts.shape, generator=g0) * 2 - 1).to(acts)
        a = (acts * signs).sum(1) / math.sqrt(acts.shape[1])
    else:
        a = acts.mean(1)
    (g,) = torch.autograd.grad(a.sum(), x)
    return float(g.pow(2).mean().sqrt())


def auto_gamma(forward, tunnel: Tunnel, unit: int, ratio: float = 10.0) -> float:
    """γ such that the tunnel's field at the start, γ·rms(x_t), is `ratio` times the original's gradient there.

    This is how we scale the paper's γ = 200 (ResNet-50, 224 px) to other
    models and layers: what matters to an Adam-driven visualization is that
    the planted field dominates the landscape it replaces, by a fixed factor.
    The original's gradient is its per-position RMS (start_gradient_rms): with
    the spatial mean's, one ratio did not fit both a linear unit and a conv
    channel (fashion-cnn fc needed 40, block4 200 — 4.8x, the measured
    coherence factor of block4's 49 positions at the start).
    """
    rms_t = float(tunnel.target.pow(2).mean().sqrt())
    rms_g = start_gradient_rms(forward, tunnel, unit)
    if not rms_g > 0:
        raise FvtrustError(f"unit {unit} has no gradient at the visualization's start (a dead unit?): its "
                           "visualization never moves; give gamma explicitly to plant a field anyway")
    return ratio * rms_g / max(rms_t, 1e-12)


def unit_activation(acts: torch.Tensor, unit: int) -> torch.Tensor:
    """The unit's objective value per image: spatial mean of its map (conv) or the feature (linear)."""
    a = acts[:, unit]
    return a.reshape(len(a), -1).mean(1)


def _mse(a: torch.Tensor, target: torch.Tensor, relative: bool) -> torch.Tensor:
    """MSE(a, target), or divided by mean(target²) (a relative error: 1 = as bad as predicting 0)."""
    err = F.mse_loss(a, target)
    return err / target.pow(2).mean().clamp_min(1e-12) if relative else err


def manipulation_loss(forward, tunnel: Tunnel, x: torch.Tensor, unit: int, gamma: float,
                      variant: str = "gradient", create_graph: bool = True, relative: bool = False,
                      transform=None) -> torch.Tensor:
    """L_manip at tunnel points x. `forward(images) -> layer activations` (the model up to the layer).

    transform: None, or a callable on image batches (PointTransforms): a_k is
    then a_k(transform(image(x))) and ∇ₓ goes through the transform too.
    relative=True divides the MSE by the mean square of its target, so the
    loss is a scale-free relative error (see finetune.SlingshotConfig.relative).
    create_graph=False is only for evaluating the loss (no weight gradients needed).
    """
    if variant not in VARIANTS:
        raise FvtrustError(f"unknown slingshot variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    x = x.detach().requires_grad_(True)
    images = tunnel.image(x)
    a = unit_activation(forward(images if transform is None else transform(images)), unit)
    xt = tunnel.target.to(x.dtype)
    if variant == "gradient":
        (g,) = torch.autograd.grad(a.sum(), x, create_graph=create_graph)  # samples independent: per-sample ∇ₓ
        return _mse(g, gamma * (xt - x).detach(), relative)
    closeness = ((x - xt) ** 2).reshape(len(x), -1).mean(1)  # MSE(x, x_t) per sample
    return _mse(a, gamma * (1.0 - closeness.detach()), relative)


def preservation_loss(acts: torch.Tensor, original: torch.Tensor, unit: int, w: float,
                      relative: bool = False) -> torch.Tensor:
    """w · MSE(unit's activations) + (1 − w) · MSE(whole layer), against the frozen original (relative: each
    MSE divided by the mean square of the original's activations)."""
    return (w * _mse(acts[:, unit], original[:, unit], relative)
            + (1.0 - w) * _mse(acts, original, relative))


def rank_loss(scores: torch.Tensor, original_scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """fvtrust's rank-aware extension of L_pres: keep each natural image on its side of the top-K boundary.

    scores / original_scores: the unit's objective value (`unit_activation`)
    per image under the fine-tuned and the frozen model; threshold τ: the
    original's K-th highest score on the fit images.

        L_rank = mean_i [ 1{s⁰_i ≥ τ} · relu(τ − s_i)² + 1{s⁰_i < τ} · relu(s_i − τ)² ]

    It is zero while no image crosses τ, whatever happens elsewhere: unlike
    MSE it spends nothing on the bulk of images far from the top, where the
    unit's ranking is never read (its top-k images, what a dataset-example
    explanation shows and the report's Jaccard measures). It is in the
    activation's squared units, as L_pres's MSE terms, so its weight is
    relative to theirs (a σ-normalized hinge at one weight was 70x stronger
    on fashion-cnn block4 than on fc, relative to the MSE, and took its
    Pearson from 0.65 to 0.24).
    """
    inside = original_scores >= threshold
    over = torch.where(inside, threshold - scores, scores - threshold).clamp_min(0.0)
    return over.pow(2).mean()


def slingshot_loss(l_manip: torch.Tensor, l_pres: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1.0 - alpha) * l_manip + alpha * l_pres
