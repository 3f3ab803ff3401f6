"""Candidate audit signals that were measured and *not* adopted: does any separate a unit from its layer?

The audit's slingshot signal `start_gap` misses block4 slingshots (README, "Audit"). This measures
candidates per unit, for every unit of a layer, so a slung unit can be compared with the clean range
(run it on clean models as the baseline). The first set (`--set first`, the default), six candidates:

* start steepness: median over the audit's 8 standard start images of ||grad_x a|| / G, G the median
  ||grad_x a|| on the unit's top natural images (a tunnel needs a steep start);
* transformed start_gap: `start_gap` with both starts seen through 4 draws of the visualization's own
  standard transforms (the tunnel is trained through them);
* snapshot steepness: the median over the visualization's log-spaced snapshots of ||grad_x a|| / G;
* seed agreement: Pearson between the 128-step visualizations of seeds 0 and 1, and the mean over the six
  pairs of seeds 0-3 (a slingshot is an attractor);
* setting agreement: Pearson between the standard visualization and the one with stronger transforms /
  with no transforms (its tunnel is built for the standard ones);
* tunnel coherence: along straight lines, in the visualization's fft parameter space, from the 8 standard
  starts to the unit's visualization, the cosine between the unit's gradients (through 4 draws of the standard
  transforms) a quarter and three quarters of the way, median over the lines (the slingshot's planted field
  γ(θ_t − θ) keeps one direction along such a line; a clean unit's gradient turns). Measured: block4:0 dev
  slingshot 0.806 against at most 0.677 for its other units and 0.667 on the clean model, but trained block3
  reaches 0.718 and random-init fashion-cnn 0.93-0.99 (fc, block3, block4: a random network's gradient
  hardly turns), so no threshold fixed on clean models separates it.

Seed agreement and tunnel coherence, each useless alone on an absolute scale, became the two probes of the
audit's `pinning` signal: read as robust z-scores within the layer, where a slung unit stands out on both at
once (fvtrust/audit/pinning.py, README; agreement under 5 % weight noise was a third probe for one session).

The second set (`--set second`; `more_candidates` says what each is): planted curvature, smoothness,
seed agreement as a z-score in the layer, wide-start disagreement, natural-start reach. The README's audit
section gives the values measured on the block4:0 slingshot and on the clean models.

    python benchmarks/audit_candidates.py SLINGSHOT_DIR/model --layer block4 --unit 0
    python benchmarks/audit_candidates.py SLINGSHOT_DIR/model --layer block4 --unit 0 --set second
    python benchmarks/audit_candidates.py fashion-cnn --layer block4 --unit 0            # the clean range
    python benchmarks/audit_candidates.py fashion-cnn --weights random --layer block3 --unit 0
"""
from __future__ import annotations

import argparse
import numpy as np
import torch

import fvtrust
from fvtrust.audit.core import AuditSettings
from fvtrust.audit.pinning import Lines, gradient_coherence, pearson_rows
from fvtrust.audit.pinning import robust_z as audit_robust_z
from fvtrust.audit.probes import frozen, probe, snapshot_steps, start_images, unit_activations
from fvtrust.audit.signals import start_gap
from fvtrust.data import natural
from fvtrust.errors import FvtrustError
from fvtrust.fool.slingshot.report import stronger_transforms
from fvtrust.linearity.top_activating import top_activating_many
from fvtrust.models.layers import layer_units
from fvtrust.visualize import transforms as T
from fvtrust.visualize import visualize


def tunnel_coherence(model, layer: str, visualizations: torch.Tensor, units, *, pairs: int, seed: int) -> torch.Tensor:
    """(U,) median over `pairs` standard starts of the cosine between the unit's fft-leaf gradients a quarter and
    three quarters of the way to its visualization: `fvtrust.audit.pinning.gradient_coherence`, which the audit
    adopted as the third probe of its `pinning` signal (read there as a z-score within the layer)."""
    return gradient_coherence(model, layer, visualizations, units, lines=pairs, seed=seed).float()


class Runs:
    """The work both candidate sets need, done once per layer: the natural images and the standard
    visualizations per seed (`--set all` would otherwise read the data twice and visualize seeds 0-2 twice;
    recording snapshots does not change a visualization's final image)."""

    def __init__(self, model, layer: str, steps: int):
        self.model, self.layer, self.steps = model, layer, steps
        self.units = list(range(layer_units(model, layer)))
        self._finals, self._data = {}, None

    def data(self) -> torch.Tensor:
        if self._data is None:
            self._data = natural(None, model=self.model).evaluation.tensors(
                AuditSettings().natural_limit, desc="read natural images")[0]
        return self._data

    def final(self, seed: int) -> torch.Tensor:
        if seed not in self._finals:
            self._finals[seed] = visualize(self.model, self.layer, self.units, steps=self.steps,
                                           objective="channel", seed=seed, progress_desc=None).final
        return self._finals[seed]

    def snapshots(self, seed: int):
        """The seed's visualization with its log-spaced snapshots (its final image is kept for `final`)."""
        snaps = visualize(self.model, self.layer, self.units, steps=self.steps, objective="channel", seed=seed,
                          thresholds=snapshot_steps(self.steps), progress_desc=None)
        self._finals.setdefault(seed, snaps.final)
        return snaps


def candidates(model, layer: str, steps: int, seed: int, runs: Runs | None = None) -> dict:
    """{candidate: (U,) values} for every unit of `layer`, as the module docstring defines them."""
    st = AuditSettings()
    runs = runs or Runs(model, layer, steps)
    units = runs.units
    n = len(units)
    u_t = torch.arange(n)
    data = runs.data()
    top = top_activating_many(model, layer, units, data, m=st.top_k, objective="channel", batch_size=st.batch_size)
    nat = probe(model, layer, data[top.indices].flatten(0, 1), u_t.repeat_interleave(st.top_k), image_grad=True)
    g_nat = nat.image_grad.reshape(n, st.top_k, -1).norm(dim=-1).median(1).values
    out = {}

    std, wide = start_images(tuple(model.input_shape), pairs=st.start_pairs, seed=seed)
    s = len(std)
    ps = probe(model, layer, std.repeat(n, 1, 1, 1), u_t.repeat_interleave(s), image_grad=True)
    out["start steepness"] = ps.image_grad.reshape(n, s, -1).norm(dim=-1).median(1).values / g_nat

    spec = T.TransformSpec.standard(int(model.input_shape[1]))
    rng = np.random.default_rng(seed)
    draws = [T.draw(spec, rng) for _ in range(4)]

    def through(x):
        return torch.cat([T.apply(x, spec, d) for d in draws])

    a = unit_activations(model, layer, torch.cat([through(std)] + [through(w) for w in wide]), units)
    k = len(draws) * s
    dist = torch.stack([(w - std).flatten(1).norm(dim=1).repeat(len(draws)) for w in wide])
    out["transformed start_gap"] = start_gap(a[:k].T, a[k:].T.reshape(n, len(wide), k), dist, g_nat)["gap"]

    snaps = runs.snapshots(seed)
    t = len(snaps.images)
    pv = probe(model, layer, snaps.images.transpose(0, 1).flatten(0, 1), u_t.repeat_interleave(t), image_grad=True)
    out["snapshot steepness"] = (pv.image_grad.norm(dim=1).reshape(n, t) / g_nat[:, None]).median(1).values

    finals = [snaps.final] + [runs.final(seed + i) for i in (1, 2, 3)]
    out["seed agreement (seeds 0, 1)"] = pearson_rows(finals[0], finals[1])
    out["seed agreement (mean of 6 pairs)"] = torch.stack(
        [pearson_rows(finals[i], finals[j]) for i in range(4) for j in range(i + 1, 4)]).mean(0)

    out["tunnel coherence"] = tunnel_coherence(model, layer, snaps.final, units, pairs=st.start_pairs, seed=seed)

    for name, tr in (("stronger", stronger_transforms(int(model.input_shape[1]))), ("no", "none")):
        other = visualize(model, layer, units, steps=steps, objective="channel", seed=seed, transforms=tr,
                          progress_desc=None).final
        out[f"setting agreement ({name} transforms)"] = pearson_rows(finals[0], other)
    return out


def planted_curvature(model, layer: str, visualizations: torch.Tensor, units, *, pairs: int, seed: int,
                      points=(0.25, 0.5, 0.75), steps_per_point: int = 4, sd: float = 0.01,
                      draws: int = 4) -> torch.Tensor:
    """(U,) how much the unit's gradient field bends like a planted bowl: at points θ a fraction p of the way
    from the 8 standard starts to the visualization (`Lines`), for random steps δ ~ N(0, sd²) (sd: the
    slingshot tunnel's width), c = -cos(δ, g(θ + δ) - g(θ - δ)), averaged over `steps_per_point` steps, median
    over starts, mean over `points`. A field γ(θ_t - θ) gives c = 1; a field that does not bend, 0 (NaN
    where the gradient does not change: the unit is off there)."""
    lines = Lines(model, visualizations, units, pairs=pairs, seed=seed, draws=draws)
    gen = torch.Generator().manual_seed(seed + 7)
    per_point = []
    with frozen(model):
        for pt in points:
            th = lines.at(pt)
            cs = []
            for _ in range(steps_per_point):
                dl = sd * torch.randn(th.shape, generator=gen)
                dg = lines.gradients(model, layer, th + dl) - lines.gradients(model, layer, th - dl)
                d = dl.flatten(1).double()
                c = -(d * dg).sum(1) / (d.norm(dim=1) * dg.norm(dim=1)).clamp_min(1e-300)
                cs.append(torch.where(dg.norm(dim=1) > 0, c, torch.full_like(c, float("nan"))))
            per_point.append(lines.per_unit_median(torch.stack(cs).nanmean(0)))
    return torch.stack(per_point).nanmean(0).float()


def smoothness(images: torch.Tensor) -> torch.Tensor:
    """(U,) total variation of each image (mean absolute neighbour difference, both axes, channel mean) divided
    by its standard deviation: low for a smooth photograph, high for the textures gradient ascent paints."""
    x = images.double() - images.double().mean((1, 2, 3), keepdim=True)
    tv = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2, 3)) + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean((1, 2, 3))
    return (tv / x.flatten(1).std(1).clamp_min(1e-12)).float()


def robust_z(v: torch.Tensor) -> torch.Tensor:
    """(v - median) / (1.4826 MAD) over the layer (`fvtrust.audit.pinning.robust_z`, here for any layer size:
    the candidate was also read on fc's 10 units)."""
    return torch.from_numpy(audit_robust_z(v.double().numpy(), min_units=1)).float()


def more_candidates(model, layer: str, steps: int, seed: int, runs: Runs | None = None) -> dict:
    """The second set (measured after the first had failed), {candidate: (U,) values}:

    * planted curvature (`planted_curvature`);
    * smoothness of the visualization (`smoothness`);
    * seed agreement, robust z in the layer: the mean Pearson over the 3 pairs of seeds 0-2, as a z-score
      among the layer's units (an attractor that stands out from its neighbours);
    * wide-start disagreement: Pearson between visualizations from two standard starts minus Pearson between
      one of them and one from a start with 30x the noise (same seed: same transforms), i.e. how much a
      start outside the tunnel changes the result beyond what another standard start does;
    * natural-start reach: the unit's activation at its visualization over its mean activation at two
      visualizations started from its top-2 natural images (a tunnel ends lower than the landscape it hides).
    """
    st = AuditSettings()
    runs = runs or Runs(model, layer, steps)
    units = runs.units
    n = len(units)
    out = {}
    finals = [runs.final(seed + i) for i in range(3)]
    out["planted curvature"] = planted_curvature(model, layer, finals[0], units, pairs=st.start_pairs, seed=seed)
    out["smoothness (TV / std)"] = smoothness(finals[0])
    agree = torch.stack([pearson_rows(finals[i], finals[j]) for i in range(3) for j in range(i + 1, 3)]).mean(0)
    out["seed agreement (3 pairs)"] = agree
    out["seed agreement, z in the layer"] = robust_z(agree)
    std, wide = start_images(tuple(model.input_shape), pairs=2, seed=seed)

    def from_start(x):
        return visualize(model, layer, units, steps=steps, objective="channel", seed=seed,
                         start=x[None].expand(n, -1, -1, -1).clone(), progress_desc=None).final

    v0, v1, w30 = from_start(std[0]), from_start(std[1]), from_start(wide[-1, 0])
    out["wide-start disagreement"] = pearson_rows(v0, v1) - pearson_rows(v0, w30)
    data = runs.data()
    top = top_activating_many(model, layer, units, data, m=2, objective="channel", batch_size=st.batch_size)
    reach = torch.stack([unit_activations(model, layer, visualize(
        model, layer, units, steps=steps, objective="channel", seed=seed, start=data[top.indices[:, j]].clone(),
        progress_desc=None).final, units).diagonal() for j in range(2)]).mean(0)
    out["natural-start reach"] = unit_activations(model, layer, finals[0], units).diagonal() / reach
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a spec or a saved model directory")
    ap.add_argument("--weights", default=None, help="e.g. random")
    ap.add_argument("--layer", required=True)
    ap.add_argument("--unit", type=int, default=0, help="the unit to compare with the rest of its layer")
    ap.add_argument("--steps", type=int, default=128, help="visualization steps (the audit's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", choices=("first", "second", "all"), default="first",
                    help="which candidates: the first six (default), the second set, or both")
    args = ap.parse_args()
    try:
        model = fvtrust.load_model(args.model, **({"weights": args.weights} if args.weights else {}))
        n = layer_units(model, args.layer)
        if not 0 <= args.unit < n:
            raise FvtrustError(f"unit {args.unit} out of range for {args.layer}: valid units are 0..{n - 1}")
        values, runs = {}, Runs(model, args.layer, args.steps)
        if args.set in ("first", "all"):
            values.update(candidates(model, args.layer, args.steps, args.seed, runs))
        if args.set in ("second", "all"):
            values.update(more_candidates(model, args.layer, args.steps, args.seed, runs))
    except FvtrustError as e:
        raise SystemExit(f"audit_candidates: {e}")
    print(f"{args.model} {args.layer}: unit {args.unit} against the other {n - 1} units of the layer")
    for name, v in values.items():
        v = v.double().numpy()
        others = v.copy()
        others[args.unit] = np.nan  # the rest of the layer, indexed as the layer is
        top = int(np.nanargmax(others)) if np.isfinite(others).any() else None
        low = int(np.nanargmin(others)) if np.isfinite(others).any() else None
        print(f"  {name:40s} unit {v[args.unit]:7.3f}   others: median {np.nanmedian(others):7.3f}, "
              f"max {np.nanmax(others):7.3f} (unit {top}), min {np.nanmin(others):7.3f} (unit {low})", flush=True)


if __name__ == "__main__":
    main()
