"""Path linearity of feature visualization (paper §5, App. C.4, equations 12-18).

For every unit, a visualization is started from each of its M most activating
natural images x^s and run for N steps to its end point x^f. Two measures of
how far the optimization path is from a straight line:

* gradient angles (eqs. 12-14): the angle between successive normalized
  gradients d objective / d image, averaged over starts (AGPA_j) and steps (AGA);
* line distances (eqs. 15-18): the l2 distance of each intermediate image to
  the segment [x^s, x^f], divided by ||x^s - x^f||, averaged likewise (ALDP_j, ALD).

Indexing (the paper leaves it implicit; we fix it so both measures have N - 1
terms as in eqs. 13 and 17): step j = 1..N takes the gradient ĝ_j at the image
x_{j-1} and moves it to x_j, so x_0 = x^s and x_N = x^f. a_j = ∠(ĝ_j, ĝ_{j+1})
for j = 1..N-1, and d_j is the distance of x_j, j = 1..N-1: the interior
points of the path (x_0 and x_N lie on the segment by definition). x^s is the
image the optimizer actually starts from: the natural image after the
parameterization's round trip (exact for `param="raw"`, within ~1e-4 for the
sigmoid parameterizations, which clamp to [1e-4, 1 - 1e-4]).

Line distances need x^f before any d_j can be computed. Two exact strategies
(`line_mode`): "store" keeps every x_j - x^s (float32; U·M·(N-1)·C·H·W·4 bytes)
and projects at the end; "two-pass" runs the optimization once for x^f and
again streaming the two inner products per step that the distance needs,
doubling compute but keeping memory at a few images per path. "auto" stores
when the trajectory fits `max_store_bytes`. Gradient angles are always
streamed: only the previous normalized gradient is kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import locked, read_entry, write_entry
from ..errors import FvtrustError, nearest
from ..models.hooks import forward_to
from ..models.layers import layer_units, parse_units
from ..visualize import visualize
from ..visualize.objectives import make_objective

LINE_MODES = ("auto", "store", "two-pass")


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean ignoring NaN (undefined terms, see `normalize_rows`); NaN where every term is undefined."""
    ok = ~np.isnan(a)
    count = ok.sum(axis)
    total = np.where(ok, a, 0.0).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def running_mean(per_step: np.ndarray) -> np.ndarray:
    """(U, N-1) -> (U, N-1): column n-2 is the mean of the first n-1 terms, for n = 2..N.

    The "first n steps" variant of eqs. 14 and 18 behind Figure 12: n steps
    give n gradients, hence n - 1 angles (and the first n - 1 interior path
    points). NaN terms are skipped as in `_nanmean`.
    """
    ok = ~np.isnan(per_step)
    total = np.cumsum(np.where(ok, per_step, 0.0), axis=-1)
    count = np.cumsum(ok, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass
class PathMetrics:
    """Per-start terms of eqs. 12 and 17 and their averages (eqs. 13, 14, 17, 18).

    angles: (U, M, N-1) a_j in degrees; distances: (U, M, N-1) d_j / d(x^s, x^f);
    start_end: (U, M) d(x^s, x^f); objective_start / objective_final: (U, M).
    """

    layer: str
    units: list
    angles: np.ndarray
    distances: np.ndarray
    start_end: np.ndarray
    objective_start: np.ndarray
    objective_final: np.ndarray
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.angles.shape[-1] + 1

    @property
    def m(self) -> int:
        return self.angles.shape[1]

    @property
    def agpa(self) -> np.ndarray:
        """Eq. 13: AGPA_j = (1/M) Σ_i a_j(x_i^s), shape (U, N-1)."""
        return _nanmean(self.angles, axis=1)

    @property
    def aga(self) -> np.ndarray:
        """Eq. 14: AGA = (1/(N-1)) Σ_j AGPA_j, one per unit."""
        return _nanmean(self.agpa, axis=1)

    @property
    def aldp(self) -> np.ndarray:
        """Eq. 17: ALDP_j = (1/M) Σ_i d_j(x_i^s) / d(x_i^s, x_i^f), shape (U, N-1)."""
        return _nanmean(self.distances, axis=1)

    @property
    def ald(self) -> np.ndarray:
        """Eq. 18: ALD = (1/(N-1)) Σ_j ALDP_j, one per unit."""
        return _nanmean(self.aldp, axis=1)

    def running(self, measure: str) -> np.ndarray:
        """AGA_n ("aga") or ALD_n ("ald") for n = 2..N steps: (U, N-1), last column = AGA / ALD."""
        if measure not in ("aga", "ald"):
            raise FvtrustError(f"unknown measure {measure!r}; choose aga or ald")
        return running_mean(self.agpa if measure == "aga" else self.aldp)

    def to_dict(self, per_start: bool = False) -> dict:
        """JSON-able summary; per-start arrays (U x M x (N-1) each) only on request."""
        out = {"layer": self.layer, "units": list(self.units), "m": self.m, "steps": self.steps,
               "aga": self.aga, "ald": self.ald, "agpa": self.agpa, "aldp": self.aldp,
               "start_end_distance": self.start_end, "objective_start": self.objective_start,
               "objective_final": self.objective_final, "settings": self.settings,
               "diagnostics": self.diagnostics}
        if per_start:
            out.update(angles=self.angles, distances=self.distances)
        return json.loads(json.dumps(out, default=_jsonable, allow_nan=True))


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


# -- the geometry --------------------------------------------------------------------------------------------

def angle_degrees(a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 12's ∠ between unit vectors (rows), in degrees.

    2·atan2(||a - b||, ||a + b||) instead of acos(<a, b>): acos is
    ill-conditioned near 0°, where float32 would report ~0.02° for identical
    vectors; this form gives exactly 0 for them and full precision nearby.
    """
    return torch.rad2deg(2 * torch.atan2((a_hat - b_hat).norm(dim=-1), (a_hat + b_hat).norm(dim=-1)))


def normalize_rows(g: torch.Tensor) -> torch.Tensor:
    """ĝ = g / ||g|| per row; NaN rows where the gradient is zero or not finite (angle undefined)."""
    norm = g.norm(dim=1, keepdim=True)
    ok = (norm > 0) & torch.isfinite(norm)
    return torch.where(ok, g / torch.where(ok, norm, torch.ones_like(norm)), torch.full_like(g, float("nan")))


def segment_distances(p: torch.Tensor, q: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
    """Eqs. 15-17: d_j / d(x^s, x^f) from inner products, for rows of points.

    With w_j = x_j - x^s and v = x^f - x^s: p = <w_j, v>, q = ||w_j||²,
    vv = ||v||². The closest segment point is x^s + t v with
    t = clamp(p / vv, 0, 1) (eq. 15 restricts α to [0, 1]: a segment, not a
    line), so d_j² = q - 2 t p + t² vv (float64: the cancellation costs
    ~1e-8 relative). Degenerate x^s == x^f (vv = 0): the segment is a point
    and the ratio is undefined; we return 0 for a path that never moved
    (trivially straight) and NaN (skipped by the means) for one that moved
    and came back.
    """
    p, q, vv = p.double(), q.double(), vv.double().unsqueeze(-1)
    safe = torch.where(vv > 0, vv, torch.ones_like(vv))
    t = (p / safe).clamp(0.0, 1.0)
    d = (q - 2 * t * p + t * t * vv).clamp(min=0.0).sqrt()
    ratio = d / safe.sqrt()
    never_moved = (q.amax(dim=-1, keepdim=True) == 0).expand_as(q)
    degenerate = torch.where(never_moved, torch.zeros_like(q), torch.full_like(q, float("nan")))
    return torch.where((vv > 0).expand_as(q), ratio, degenerate)


def line_distances(path: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Normalized distance of each point of `path` (..., J, D) to the segment [start, end] (..., D)."""
    w = path.double() - start.double().unsqueeze(-2)
    v = end.double() - start.double()
    return segment_distances((w * v.unsqueeze(-2)).sum(-1), (w * w).sum(-1), (v * v).sum(-1))


class _PathRecorder:
    """`on_step` callback: streams angles, and either stores x_j - x^s or streams <w_j, v>, ||w_j||².

    At step s visualize hands over x_{s-1} and the gradient taken there (ĝ_s);
    step 1 gives x^s. For s >= 2 it records a_{s-1} = ∠(ĝ_{s-1}, ĝ_s) and the
    point x_{s-1}, both in column s - 2.
    """

    def __init__(self, n: int, dim: int, steps: int, device, *, store: bool, end: torch.Tensor | None = None):
        self.prev = torch.full((n, dim), float("nan"), device=device)
        self.x0 = torch.zeros(n, dim, device=device)
        self.angles = torch.full((n, steps - 1), float("nan"), dtype=torch.float64)
        self.zero_grads = torch.zeros(n, dtype=torch.long)  # steps with an undefined ĝ, per path
        self.store = store
        if store:
            self.traj = torch.empty(n, steps - 1, dim)
        else:
            self.end = end.reshape(n, -1).to(device=device, dtype=torch.float64)
            self.v = torch.zeros(n, dim, dtype=torch.float64, device=device)
            self.p = torch.zeros(n, steps - 1, dtype=torch.float64)
            self.q = torch.zeros(n, steps - 1, dtype=torch.float64)

    def __call__(self, step, image, grad, sl):
        x = image.reshape(image.shape[0], -1)
        g_hat = normalize_rows(grad.reshape(grad.shape[0], -1).float())
        self.zero_grads[sl] += torch.isnan(g_hat[:, 0]).cpu()
        if step == 1:
            self.x0[sl] = x
            if not self.store:
                self.v[sl] = self.end[sl] - x.double()
        else:
            col = step - 2
            self.angles[sl, col] = angle_degrees(self.prev[sl], g_hat).double().cpu()
            w = x - self.x0[sl]
            if self.store:
                self.traj[sl, col] = w.cpu()
            else:
                wd = w.double()
                self.p[sl, col] = (wd * self.v[sl]).sum(1).cpu()
                self.q[sl, col] = (wd * wd).sum(1).cpu()
        self.prev[sl] = g_hat

    def distances(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized d_j (n, N-1), d(x^s, x^f) (n,)) given the final images."""
        v = final.reshape(final.shape[0], -1).double().cpu() - self.x0.double().cpu()
        vv = (v * v).sum(1)
        if not self.store:
            return segment_distances(self.p, self.q, vv), vv.sqrt()
        n, j, dim = self.traj.shape
        out = torch.empty(n, j, dtype=torch.float64)
        per = max(1, int(2**26 // max(1, j * dim * 8)))  # float64 working set per block ~64 MB
        for a in range(0, n, per):
            w = self.traj[a:a + per].double()
            p = torch.bmm(w, v[a:a + per].unsqueeze(-1)).squeeze(-1)
            out[a:a + per] = segment_distances(p, (w * w).sum(-1), vv[a:a + per])
        return out, vv.sqrt()


# -- running it ----------------------------------------------------------------------------------------------

def _model_digest(model) -> str:
    h = hashlib.sha1(str(getattr(model, "spec", type(model).__name__)).encode())
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _unit_key(base: str, unit: int, starts: torch.Tensor) -> str:
    h = hashlib.sha1(base.encode())
    h.update(str(unit).encode())
    h.update(starts.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def _objective_values(model, obj, x: torch.Tensor, units_t: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for a in range(0, len(x), batch):
        acts = forward_to(model, x[a:a + batch], list(obj.layers), detach=True)
        out.append(obj(acts, units_t[a:a + batch]).float().cpu())
    return torch.cat(out)


def _check_starts(starts, n_units: int, model, param: str) -> torch.Tensor:
    if not isinstance(starts, torch.Tensor):
        starts = torch.as_tensor(np.asarray(starts))
    if starts.dim() != 5 or starts.shape[0] != n_units or tuple(starts.shape[2:]) != tuple(model.input_shape):
        raise FvtrustError(f"starts must have shape (units={n_units}, M, {', '.join(map(str, model.input_shape))}), "
                           f"got {tuple(starts.shape)}")
    if starts.shape[1] < 1:
        raise FvtrustError("starts has no images per unit (M = 0)")
    starts = starts.float()
    if not torch.isfinite(starts).all():
        raise FvtrustError("starts contain NaN or inf")
    if param != "raw" and (starts.min() < -1e-6 or starts.max() > 1 + 1e-6):
        raise FvtrustError(f"starts must lie in [0, 1] for param={param!r} (found "
                           f"{float(starts.min()):.3g}..{float(starts.max()):.3g}); use param='raw' for other ranges")
    return starts


def check_path_options(*, steps: int, lr: float) -> None:
    """The checks `path_metrics` makes on its options, for callers to run before any slow work."""
    from ..visualize.render import check_learning_rate

    if steps < 2:
        raise FvtrustError(f"steps must be >= 2 (angles need two gradients), got {steps}")
    check_learning_rate(lr)


def path_metrics(model, layer: str, units, starts: torch.Tensor, *, steps: int = 512, objective="channel",
                 param: str = "fft", decorrelate: bool = True, transforms="standard", lr: float = 0.05,
                 optimizer: str = "adam", seed: int = 0, line_mode: str = "auto", max_store_bytes: int = 2**30,
                 group_size: int | None = None, chunk_size: int | None = None, cache_dir=None) -> PathMetrics:
    """Gradient angles and line distances of visualization paths from natural starts (eqs. 12-18).

    `starts`: (units, M, C, H, W) in [0, 1], e.g. `top_activating_many(...).images`.
    The visualization options are `fvtrust.visualize`'s; defaults are its
    standard ones (the paper's "standard hyperparameters"), with the channel
    objective. `param="raw"` with `transforms="none"` is the plain
    gradient-ascent path in pixel space (no sigmoid, no clamping). All U·M
    paths of a group of units (`group_size`, default all) are one batched
    optimization. With `cache_dir`, each finished unit is cached (keyed by
    model weights, settings and its starts; verified by `fvtrust.cache`, so
    a damaged or foreign entry is recomputed) and skipped on rerun.
    """
    from ..models import as_model

    model = as_model(model, example=starts[0] if isinstance(starts, torch.Tensor) and starts.dim() == 5 else None)
    units = parse_units(units, layer_units(model, layer), layer)
    if len(set(units)) != len(units):
        raise FvtrustError(f"units must be distinct, got duplicates in {units}")
    check_path_options(steps=steps, lr=lr)
    if line_mode not in LINE_MODES:
        raise FvtrustError(f"unknown line_mode {line_mode!r}; nearest: {nearest(line_mode, LINE_MODES)}")
    if group_size is not None and group_size < 1:
        raise FvtrustError(f"group_size must be >= 1, got {group_size}")
    starts = _check_starts(starts, len(units), model, param)
    m = starts.shape[1]
    obj = make_objective(objective, layer)
    settings = {"steps": steps, "m": m, "objective": repr(obj), "param": param, "decorrelate": decorrelate,
                "transforms": transforms if isinstance(transforms, str) else repr(transforms), "lr": lr,
                "optimizer": optimizer, "seed": seed}
    vis_kw = {"steps": steps, "objective": obj, "param": param, "decorrelate": decorrelate,
              "transforms": transforms, "lr": lr, "optimizer": optimizer, "seed": seed, "chunk_size": chunk_size}

    cache = Path(cache_dir) if cache_dir is not None else None
    with contextlib.nullcontext() if cache is None else locked(cache, what="linearity cache"):
        results, cached = _run_cached(model, layer, units, starts, settings, obj, vis_kw, line_mode,
                                      max_store_bytes, group_size, cache)

    def stack(name):
        return np.stack([results[u][name] for u in units])

    modes = sorted({str(results[u]["line_mode"]) for u in units})
    diagnostics = {"line_mode": modes[0] if len(modes) == 1 else modes,
                   "zero_gradient_steps": int(sum(int(results[u]["zero_grads"]) for u in units)),
                   "endpoint_deviation": float(max(float(results[u]["deviation"]) for u in units)),
                   "cached_units": cached}
    return PathMetrics(layer, list(units), stack("angles"), stack("distances"), stack("start_end"),
                       stack("objective_start"), stack("objective_final"), settings, diagnostics)


def _run_cached(model, layer, units, starts, settings, obj, vis_kw, line_mode, max_store_bytes, group_size, cache):
    """Per-unit results: verified cache entries where they exist, batched optimization for the rest."""
    keys = {}
    results: dict[int, dict] = {}
    if cache is not None:
        base = json.dumps({"layer": layer, "model": _model_digest(model), **settings}, sort_keys=True)
        for k, u in enumerate(units):
            keys[u] = _unit_key(base, u, starts[k])
            entry = read_entry(cache / f"unit{u}-{keys[u]}.npz", "npz", keys[u])
            if entry is not None:
                results[u] = entry
    cached = [u for u in units if u in results]
    todo = [k for k, u in enumerate(units) if u not in results]
    size = group_size or max(1, len(todo))
    for g0 in range(0, len(todo), size):
        idx = todo[g0:g0 + size]
        group = _run_group(model, layer, [units[k] for k in idx], starts[idx], obj, vis_kw, line_mode,
                           max_store_bytes)
        for u, res in group.items():
            results[u] = res
            if cache is not None:
                write_entry(cache / f"unit{u}-{keys[u]}.npz", "npz", res, keys[u])
    return results, cached


def _run_group(model, layer, units, starts, obj, vis_kw, line_mode, max_store_bytes) -> dict[int, dict]:
    """One batched optimization of len(units) x M paths; per-unit arrays."""
    u, m = starts.shape[:2]
    n, dim, steps = u * m, int(np.prod(starts.shape[2:])), vis_kw["steps"]
    flat_units = [x for x in units for _ in range(m)]
    x_start = starts.reshape(n, *starts.shape[2:]).to(model.device)
    store = line_mode == "store" or (line_mode == "auto" and n * (steps - 1) * dim * 4 <= max_store_bytes)
    desc = f"linearity {layer} units {units[0]}" + (f"..{units[-1]}" if len(units) > 1 else "")
    deviation = 0.0
    if store:
        rec = _PathRecorder(n, dim, steps, model.device, store=True)
        res = visualize(model, layer, flat_units, start=x_start, record_images=False, on_step=rec,
                        progress_desc=desc, **vis_kw)
    else:
        first = visualize(model, layer, flat_units, start=x_start, record_images=False,
                          progress_desc=desc + " (pass 1/2)", **vis_kw)
        rec = _PathRecorder(n, dim, steps, model.device, store=False, end=first.final)
        res = visualize(model, layer, flat_units, start=x_start, record_images=False, on_step=rec,
                        progress_desc=desc + " (pass 2/2)", **vis_kw)
        # distances use pass 1's x^f; deterministic backends make both passes identical, else report the gap
        gap = (res.final - first.final).reshape(n, -1).norm(dim=1).double()
        span = (first.final.reshape(n, -1).double().cpu() - rec.x0.double().cpu()).norm(dim=1)
        deviation = float(torch.where(span > 0, gap / span.clamp(min=1e-300), gap).max())
    dist, start_end = rec.distances(res.final)
    units_t = torch.as_tensor(flat_units, device=model.device)
    obj_start = _objective_values(model, obj, rec.x0.reshape(n, *starts.shape[2:]), units_t)

    def per_unit(t):
        return t.reshape(u, m, *t.shape[1:]).numpy()

    angles, dist, start_end = per_unit(rec.angles), per_unit(dist), per_unit(start_end)
    obj_start, obj_final = per_unit(obj_start.double()), per_unit(res.objective[-1].double())
    zero = rec.zero_grads.reshape(u, m).sum(1)
    out = {}
    for k, unit in enumerate(units):
        out[unit] = {"angles": angles[k], "distances": dist[k], "start_end": start_end[k],
                     "objective_start": obj_start[k], "objective_final": obj_final[k],
                     "line_mode": np.asarray("store" if store else "two-pass"),
                     "zero_grads": np.asarray(int(zero[k])), "deviation": np.asarray(deviation)}
    return out


__all__ = [
    "LINE_MODES",
    "PathMetrics",
    "angle_degrees",
    "line_distances",
    "normalize_rows",
    "path_metrics",
    "running_mean",
    "segment_distances",
]
