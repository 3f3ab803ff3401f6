"""The sanity check of §3 / App. C.3: are visualizations processed like natural images?

For every layer l and similarity Γ (Spearman, Pearson, cosine) of flattened
activations, three conditions:

* ``same_class``: natural vs natural image of the same class (upper bound);
* ``different_class``: natural vs natural image of two different classes (lower bound);
* ``natural_vs_visualization``: natural image of class c vs a visualization of
  the last-layer unit of class c.

Natural images the model misclassifies (wrong top-1) are excluded, as in the
paper. Per layer we report the mean, std (ddof=0) and number of pairs of each
condition, pooled over all computed pairs (pairs whose similarity is undefined,
e.g. an all-zero post-ReLU activation, are counted in ``n_undefined`` and left
out of the mean), and per-class means of the class-wise conditions.

**Pair enumeration and sub-sampling** (paper: every 10th same-class pair, every
100th different-class pair, every 5th natural-vs-visualization pair for
Spearman and Pearson; every pair for cosine). Each condition's pairs are
listed in one fixed order and every s-th entry is kept, starting with the
first, counting across class blocks:

* same class: classes in the given order; within a class, natural rows i < j
  in row-major order ((0,1), (0,2), ..., (1,2), ...);
* different class: class pairs (c, c') with c before c' in the given order;
  within, natural rows of c (outer) x natural rows of c' (inner);
* natural vs visualization: classes in order; natural rows of c (outer) x
  visualizations of c (inner).

Natural rows of a class are in dataset order; visualizations in replicate
order. ``pair_stride="all"`` (CLI ``--all-pairs``) keeps every pair: with the
rank-once engine that is cheap, which is the point of it.

**Normalization** (Figures 6, 8, 10): per layer, (x - different) / (same -
different), so same class = 1 and different class = 0, from the pooled means.
Layers whose same- and different-class means differ by strictly less than
``drop_below`` = 0.01 (or are undefined) are dropped. The remaining normalized
natural-vs-visualization values are smoothed with
``scipy.ndimage.convolve(x, np.ones(7) / 7)`` (scipy's default ``mode="reflect"``,
which the paper's call used). The band is ``smoothed ± s`` where s is the
standard deviation of the normalized values over a moving window of 5 (same
reflect padding): our reading of "the standard deviation of the orange data
points, convolved over a window of size 5"; it shows how much the per-layer
values scatter around the curve, not a significance interval.

Memory: layers arrive from :func:`fvtrust.sanity.activations.collect` already
prepared; every similarity call touches one or two class blocks of one layer,
so a layer spilled to disk is read a block at a time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import FvtrustError, nearest
from ..io import atomic_write_json
from .activations import BUDGET_BYTES, Layer, collect, discover_layers
from .similarity import DOT_COST, METRICS, similarity, similarity_at

CONDITIONS = ("same_class", "different_class", "natural_vs_visualization")
PAPER_STRIDES = {"spearman": (10, 100, 5), "pearson": (10, 100, 5), "cosine": (1, 1, 1)}
SMOOTHING_WINDOW = 7
STD_WINDOW = 5
DROP_BELOW = 0.01
# Up to this many images per layer, a full similarity matrix (8 * n**2 bytes) may replace pair gathering.
DENSE_ROWS = 4096


# ------------------------------------------------------------------ options


def check_metrics(metrics) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = list(metrics)
    if not metrics:
        raise FvtrustError(f"no similarity metric given; choose from {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise FvtrustError(f"unknown similarity metric {m!r}; did you mean {nearest(m, METRICS)}?")
    return list(dict.fromkeys(metrics))


def resolve_strides(pair_stride, metrics) -> dict:
    """'paper' | 'all' | None | int | (same, different, natvis) | {metric: ...} -> {metric: {condition: stride}}."""
    def one(s, metric):
        if s is None or s == "all":
            s = (1, 1, 1)
        elif s == "paper":
            s = PAPER_STRIDES[metric]
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            s = (int(s),) * 3
        elif isinstance(s, dict):
            s = tuple(s.get(c, 1) for c in CONDITIONS)
        s = tuple(s) if isinstance(s, (tuple, list)) else None
        if s is None or len(s) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in s):
            raise FvtrustError(f"bad pair_stride {pair_stride!r}: use 'paper', 'all', a positive integer or "
                               "(same_class, different_class, natural_vs_visualization) strides")
        return dict(zip(CONDITIONS, (int(v) for v in s)))

    if isinstance(pair_stride, dict) and set(pair_stride) & set(METRICS):
        unknown = set(pair_stride) - set(METRICS)
        if unknown:
            raise FvtrustError(f"pair_stride names unknown metric(s) {sorted(unknown)}; use {', '.join(METRICS)}")
        return {m: one(pair_stride.get(m, "paper"), m) for m in metrics}
    return {m: one(pair_stride, m) for m in metrics}


def resolve_classes(classes, num_classes: int, class_names=None) -> list[int]:
    """Class indices or names -> validated, duplicate-free list of indices."""
    if classes is None:
        return list(range(num_classes))
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    out = []
    names = list(class_names or [])
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in names:
                raise FvtrustError(f"unknown class {c!r}; nearest: {nearest(c, names) if names else 'no names known'}")
            c = names.index(c)
        c = int(c)
        if not 0 <= c < num_classes:
            raise FvtrustError(f"class {c} out of range: the model has {num_classes} classes (0..{num_classes - 1})")
        out.append(c)
    if not out:
        raise FvtrustError("no classes given")
    if len(set(out)) != len(out):
        raise FvtrustError(f"classes must be distinct, got {out}")
    return out


def random_classes(num_classes: int, n: int, seed: int = 42) -> list[int]:
    """The paper's draw: ``numpy.random.seed(seed); sorted(numpy.random.choice(num_classes, n))``.

    That gives [20, 71, 102, 106, 121, 270, 435, 614, 700, 860] for 1000
    classes, 10, seed 42. It draws with replacement; if that repeats a class
    (likely for few classes) we draw without replacement from the same seed.
    """
    if not 1 <= n <= num_classes:
        raise FvtrustError(f"cannot draw {n} distinct classes from {num_classes}")
    picked = sorted(int(c) for c in np.random.RandomState(seed).choice(num_classes, n))
    if len(set(picked)) < n:
        picked = sorted(int(c) for c in np.random.RandomState(seed).choice(num_classes, n, replace=False))
    return picked


# --------------------------------------------------------- pairs and strides


def _block_positions(pos: int, size: int, stride: int) -> torch.Tensor:
    """Local positions q in [0, size) whose global position pos + q is a multiple of stride."""
    first = (-pos) % stride
    if first >= size:
        return torch.empty(0, dtype=torch.long)
    return torch.arange(first, size, stride, dtype=torch.long)


def _tri_pairs(n: int, q: torch.Tensor) -> torch.Tensor:
    """Pairs i < j of n rows at row-major positions q."""
    if len(q) == 0:
        return torch.empty((0, 2), dtype=torch.long)
    return torch.triu_indices(n, n, 1).T[q]


def _rect_pairs(b: int, q: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.div(q, b, rounding_mode="floor"), q % b], dim=1)


def enumerate_pairs(nat_counts: list[int], vis_counts: list[int], strides: dict) -> dict:
    """The kept pairs of each condition as blocks (see the module docstring for the order).

    Returns {condition: [(a_block, b_block or None, class position(s), local pairs (k, 2))]}
    where a block is ("nat" | "vis", class position). Only kept pairs are materialized.
    """
    n_cls = len(nat_counts)
    out = {c: [] for c in CONDITIONS}
    pos = 0
    s = strides["same_class"]
    for k in range(n_cls):
        n = nat_counts[k]
        size = n * (n - 1) // 2
        q = _block_positions(pos, size, s)
        out["same_class"].append((("nat", k), None, k, _tri_pairs(n, q)))
        pos += size
    pos = 0
    s = strides["different_class"]
    for k in range(n_cls):
        for k2 in range(k + 1, n_cls):
            size = nat_counts[k] * nat_counts[k2]
            q = _block_positions(pos, size, s)
            out["different_class"].append((("nat", k), ("nat", k2), (k, k2), _rect_pairs(nat_counts[k2], q)))
            pos += size
    pos = 0
    s = strides["natural_vs_visualization"]
    for k in range(n_cls):
        size = nat_counts[k] * vis_counts[k]
        q = _block_positions(pos, size, s)
        out["natural_vs_visualization"].append((("nat", k), ("vis", k), k, _rect_pairs(vis_counts[k], q)))
        pos += size
    return out


def count_pairs(nat_counts, vis_counts, strides: dict) -> dict:
    """Number of kept pairs per condition (no similarity computed)."""
    return {c: sum(len(b[3]) for b in blocks) for c, blocks in enumerate_pairs(nat_counts, vis_counts, strides).items()}


# ----------------------------------------------------------- one layer's stats


def _summarize(values: torch.Tensor) -> dict:
    v = values[~torch.isnan(values)]
    return {"mean": float(v.mean()) if len(v) else math.nan, "std": float(v.std(correction=0)) if len(v) else math.nan,
            "n_pairs": len(values), "n_undefined": int(len(values) - len(v))}


def layer_conditions(prepared, offsets: dict, pairs: dict, *, blockwise: bool = False, **engine) -> dict:
    """Statistics of the three conditions for one layer and metric.

    ``prepared``: the layer's :class:`Prepared` rows (natural rows then
    visualizations); ``offsets[("nat"|"vis", k)] = (start, stop)`` locate the
    class blocks; ``pairs`` from :func:`enumerate_pairs`. Three ways, by cost:

    * dense (few rows, many pairs: every fashion-cnn run): one symmetric
      similarity matrix of all rows, then look the pairs up -- one blocked
      matrix product beats gathering hundreds of thousands of row pairs;
    * sparse (many rows, sub-sampled pairs): one engine call per condition
      over global row indices (the engine tiles the pairs itself);
    * ``blockwise`` (layers spilled to disk): one call per class block, so
      only one or two class blocks are ever read into memory.
    """
    def rows(block):
        a, b = offsets[block]
        return prepared[a:b]

    n = len(prepared)
    total = sum(len(blk[3]) for blocks in pairs.values() for blk in blocks)
    dense = None
    if not blockwise and n <= DENSE_ROWS and total * DOT_COST >= n * n // 2:
        dense = similarity(prepared, metric=prepared.metric, **engine)
    out = {}
    for cond, blocks in pairs.items():
        live = [blk for blk in blocks if len(blk[3])]
        if not live:
            vals = []
        elif blockwise:
            vals = [similarity_at(rows(a_blk), local, None if b_blk is None else rows(b_blk), prepared.metric,
                                  **engine) for a_blk, b_blk, _, local in live]
        else:
            glob = torch.cat([local + torch.tensor([offsets[a_blk][0], offsets[b_blk or a_blk][0]])
                              for a_blk, b_blk, _, local in live])
            if dense is not None:
                allv = dense[glob[:, 0], glob[:, 1]]
            else:
                allv = similarity_at(prepared, glob, None, prepared.metric, **engine)
            vals = list(allv.split([len(blk[3]) for blk in live]))
        allv = torch.cat(vals) if vals else torch.empty(0, dtype=torch.float64)
        stats = _summarize(allv)
        if cond != "different_class":
            per_class = {blk[2]: v for blk, v in zip(live, vals)}
            stats["per_class_mean"] = [_summarize(per_class[k])["mean"] if k in per_class else math.nan
                                       for k in range(len(blocks))]
        out[cond] = stats
    return out


# ------------------------------------------------------- normalize and smooth


def normalize(same, different, natvis, drop_below: float = DROP_BELOW):
    """(natvis - different) / (same - different) per layer; returns (values, kept mask).

    A layer is dropped when |same - different| < drop_below or any input is undefined.
    """
    same, different, natvis = (np.asarray(a, dtype=np.float64) for a in (same, different, natvis))
    gap = same - different
    kept = np.isfinite(gap) & np.isfinite(natvis) & ~(np.abs(gap) < drop_below)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(kept, (natvis - different) / np.where(kept, gap, 1.0), np.nan)
    return values, kept


def smooth(values, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """The paper's smoothing: ``scipy.ndimage.convolve`` with uniform weights (mode reflect)."""
    from scipy.ndimage import convolve

    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    return convolve(x, np.ones(window) / window)


def moving_std(values, window: int = STD_WINDOW) -> np.ndarray:
    """Standard deviation over a moving window (reflect padding, like :func:`smooth`)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    mean = smooth(x, window)
    return np.sqrt(np.maximum(smooth(x * x, window) - mean * mean, 0.0))


def normalized_curve(same, different, natvis, layer_names, *, drop_below=DROP_BELOW,
                     window=SMOOTHING_WINDOW, std_window=STD_WINDOW) -> dict:
    """Normalized, smoothed natural-vs-visualization curve over the kept layers, and a summary."""
    values, kept = normalize(same, different, natvis, drop_below)
    names = [n for n, k in zip(layer_names, kept) if k]
    raw = values[kept]
    smoothed = smooth(raw, window)
    band = moving_std(raw, std_window)
    summary = {}
    if len(raw):
        lo, hi = int(np.argmin(raw)), int(np.argmax(raw))
        summary = {
            "mean": float(raw.mean()),
            "min": {"layer": names[lo], "value": float(raw[lo])},
            "max": {"layer": names[hi], "value": float(raw[hi])},
            "last": {"layer": names[-1], "value": float(raw[-1])},
            "below_zero": [n for n, v in zip(names, raw) if v < 0],
            "at_least_half": [n for n, v in zip(names, raw) if v >= 0.5],
            "smoothed_below_zero": [n for n, v in zip(names, smoothed) if v < 0],
        }
    return {"layers": names, "values": raw.tolist(), "smoothed": smoothed.tolist(), "band": band.tolist(),
            "dropped": [n for n, k in zip(layer_names, kept) if not k], "summary": summary}


# ---------------------------------------------------------------------- run


def _dtype(dtype) -> torch.dtype:
    d = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if d not in (torch.float32, torch.float64):
        raise FvtrustError(f"dtype must be float32 or float64, got {dtype!r}")
    return d


def class_indices(labels: torch.Tensor, classes, per_class: int | None) -> torch.Tensor:
    """Indices of the first ``per_class`` items of each class (dataset order; all if None), grouped by class."""
    labels = torch.as_tensor(labels).long().cpu()
    idx = []
    for c in classes:
        where = (labels == c).nonzero().squeeze(1)
        if per_class is not None:
            if len(where) < per_class:
                raise FvtrustError(f"class {c} has only {len(where)} natural images, fewer than "
                                   f"per_class_natural={per_class}; lower it to at most {len(where)}")
            where = where[:per_class]
        elif len(where) == 0:
            raise FvtrustError(f"class {c} has no natural images")
        idx.append(where)
    return torch.cat(idx)


def select_natural(images: torch.Tensor, labels: torch.Tensor, classes, per_class: int | None):
    """The first ``per_class`` images of each class (dataset order); all of them if None.

    Returns (images, labels, source indices), grouped by class in the order of ``classes``.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if len(images) != len(labels):
        raise FvtrustError(f"{len(images)} natural images but {len(labels)} labels")
    idx = class_indices(labels, classes, per_class)
    return images[idx], labels[idx], idx


def arrange_visualizations(visualizations, classes, per_class: int | None, input_shape) -> tuple[torch.Tensor, list]:
    """Visualizations per class -> (rows grouped by class, count per class).

    Accepts a tensor (classes x replicates x C x H x W, aligned with
    ``classes``) or a dict {class: (replicates x C x H x W)}; the first
    ``per_class`` replicates of each class are used (all if None).
    """
    if isinstance(visualizations, dict):
        missing = [c for c in classes if c not in visualizations]
        if missing:
            raise FvtrustError(f"no visualizations for class(es) {missing}; have {sorted(visualizations)}")
        per = [torch.as_tensor(visualizations[c]) for c in classes]
    else:
        v = torch.as_tensor(visualizations)
        if v.ndim != 5 or v.shape[0] != len(classes):
            raise FvtrustError(f"visualizations must be (classes={len(classes)}) x replicates x C x H x W, "
                               f"got shape {tuple(v.shape)}")
        per = list(v)
    out = []
    for c, v in zip(classes, per):
        if v.ndim != 4 or tuple(v.shape[1:]) != tuple(input_shape):
            raise FvtrustError(f"visualizations of class {c} have shape {tuple(v.shape)}; the model needs "
                               f"replicates x {tuple(input_shape)}")
        if per_class is not None:
            if len(v) < per_class:
                raise FvtrustError(f"class {c} has only {len(v)} visualizations, fewer than per_class={per_class}")
            v = v[:per_class]
        if len(v) == 0:
            raise FvtrustError(f"class {c} has no visualizations")
        out.append(v.float())
    return torch.cat(out), [len(v) for v in out]


def weights_digest(model, images: torch.Tensor | None = None) -> str:
    """Hash of the weights (and images): cached results are only reused for the same inputs."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    if images is not None:
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _LayerCache:
    """One verified JSON entry per (layer, metric) (`fvtrust.cache`): a rerun skips the layers already done.

    A damaged entry, or one written for other weights, images or settings, is recomputed.
    """

    def __init__(self, cache_dir, key: dict):
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def _path(self, layer: str, metric: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer)
        return self.dir / f"{safe}.{metric}.{self.key}.json"

    def get(self, layer: str, metric: str):
        from ..cache import read_entry

        if self.dir is None:
            return None
        return read_entry(self._path(layer, metric), "json", f"{self.key}:{layer}:{metric}")

    def put(self, layer: str, metric: str, stats: dict) -> None:
        from ..cache import write_entry

        if self.dir is not None:
            write_entry(self._path(layer, metric), "json", stats, f"{self.key}:{layer}:{metric}")


def _clean(obj):
    """NaN -> None, so similarity.json is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _nan(x):
    return math.nan if x is None else x


@torch.no_grad()
def run(model, natural, visualizations, classes=None, per_class: int | None = None, *,
        per_class_natural: int | None = None, layers="all", metrics=METRICS, pair_stride="paper",
        dtype="float32", batch_size: int = 128, budget_bytes: int = BUDGET_BYTES, cache_dir=None, spill_dir=None,
        drop_below: float = DROP_BELOW, smoothing_window: int = SMOOTHING_WINDOW, std_window: int = STD_WINDOW) -> dict:
    """The sanity check on ``model``; returns a JSON-able dict (see :mod:`fvtrust.sanity.analysis`).

    ``natural``: (images, labels), [0, 1] images of the model's input shape;
    the first ``per_class_natural`` of each class in ``classes`` are used (all
    if None) and misclassified ones are excluded. ``visualizations``: per
    class, visualizations of that class's last-layer unit (see
    :func:`arrange_visualizations`), ``per_class`` of each (all if None).
    ``classes``: indices or class names (default: all classes of the model).
    ``layers``: "all" or layer names (see :mod:`fvtrust.sanity.activations`).
    ``pair_stride``: "paper" (10 / 100 / 5 for Spearman and Pearson, all pairs
    for cosine), "all", or see :func:`resolve_strides`. ``cache_dir`` makes
    the run resumable (finished layers are skipped on rerun).
    """
    t0 = time.time()
    metrics = check_metrics(metrics)
    strides = resolve_strides(pair_stride, metrics)
    dt = _dtype(dtype)
    for name, w in (("smoothing_window", smoothing_window), ("std_window", std_window), ("batch_size", batch_size)):
        if not isinstance(w, (int, np.integer)) or w < 1:
            raise FvtrustError(f"{name} must be a positive integer, got {w!r}")
    n_classes_model = model.num_classes or 0
    classes = resolve_classes(classes, n_classes_model, model.class_names)
    if per_class is not None and per_class < 1:
        raise FvtrustError(f"per_class must be >= 1, got {per_class}")
    if per_class_natural is not None and per_class_natural < 1:
        raise FvtrustError(f"per_class_natural must be >= 1, got {per_class_natural}")

    # Natural images: per class, minus the misclassified ones.
    x, y = natural
    x = torch.as_tensor(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.input_shape):
        raise FvtrustError(f"natural images have shape {tuple(x.shape)}; {model.spec} needs N x "
                           f"{tuple(model.input_shape)}")
    nat, nat_y, nat_idx = select_natural(x, y, classes, per_class_natural)
    from ..evaluate import predict

    pred = predict(model, nat, batch_size=batch_size).argmax(dim=1)
    correct = pred == nat_y
    nat_kept, y_kept = nat[correct], nat_y[correct]
    nat_counts = [int((y_kept == c).sum()) for c in classes]
    if sum(nat_counts) == 0:
        raise FvtrustError("the model misclassifies every selected natural image; nothing to compare")

    vis, vis_counts = arrange_visualizations(visualizations, classes, per_class, model.input_shape)
    vis_pred = predict(model, vis, batch_size=batch_size).argmax(dim=1)
    vis_target = torch.cat([torch.full((k,), c) for c, k in zip(classes, vis_counts)])

    images = torch.cat([nat_kept.float(), vis])
    n_nat = len(nat_kept)
    offsets, a = {}, 0
    for k, m in enumerate(nat_counts):
        offsets[("nat", k)] = (a, a + m)
        a += m
    for k, m in enumerate(vis_counts):
        offsets[("vis", k)] = (a, a + m)
        a += m

    probe = images[torch.tensor(sorted({0, n_nat // 2, n_nat, len(images) - 1}))]
    found = discover_layers(model, probe, layers)
    names = [lay.name for lay in found]
    pairs = {m: enumerate_pairs(nat_counts, vis_counts, strides[m]) for m in metrics}

    cache = _LayerCache(cache_dir, {"fingerprint": weights_digest(model, images), "dtype": str(dt),
                                    "counts": [nat_counts, vis_counts]})
    results: dict[str, dict] = {m: {} for m in metrics}

    def cached(lay: Layer) -> bool:
        hits = {m: cache.get(lay.name, f"{m}-{_stride_tag(strides[m])}") for m in metrics}
        if all(h is not None for h in hits.values()):
            for m, h in hits.items():
                results[m][lay.name] = h
            return True
        return False

    engine = {"dtype": dt}
    from ..cache import locked

    with contextlib.nullcontext() if cache_dir is None else locked(cache_dir, what="sanity cache"):
        for rows in collect(model, images, found, metrics, batch_size=batch_size, dtype=dt,
                            budget_bytes=budget_bytes, spill_dir=spill_dir, skip=cached, desc="sanity"):
            for m in metrics:
                stats = layer_conditions(rows.prepared[m], offsets, pairs[m], blockwise=rows.spilled, **engine)
                results[m][rows.layer.name] = stats
                cache.put(rows.layer.name, f"{m}-{_stride_tag(strides[m])}", _clean(stats))
            del rows

    out_metrics = {}
    for m in metrics:
        per_layer = [results[m][n] for n in names]
        conds = {}
        for c in CONDITIONS:
            conds[c] = {k: [_nan(s[c][k]) if k in ("mean", "std") else s[c][k] for s in per_layer]
                        for k in ("mean", "std", "n_pairs", "n_undefined")}
            if c != "different_class":
                conds[c]["per_class_mean"] = [[_nan(v) for v in s[c]["per_class_mean"]] for s in per_layer]
        curve = normalized_curve(conds["same_class"]["mean"], conds["different_class"]["mean"],
                                 conds["natural_vs_visualization"]["mean"], names, drop_below=drop_below,
                                 window=smoothing_window, std_window=std_window)
        out_metrics[m] = {"pair_stride": strides[m], "conditions": conds, "normalized": curve}

    class_names = model.class_names or [str(c) for c in range(n_classes_model)]
    result = {
        "spec": getattr(model, "spec", None),
        "classes": classes,
        "class_names": [class_names[c] if c < len(class_names) else str(c) for c in classes],
        "layers": [lay.to_dict() for lay in found],
        "natural": {
            "per_class_requested": per_class_natural,
            "selected_per_class": [int((nat_y == c).sum()) for c in classes],
            "correct_per_class": nat_counts,
            "excluded_indices": nat_idx[~correct].tolist(),
            "accuracy": float(correct.float().mean()),
        },
        "visualizations": {
            "per_class": vis_counts,
            "classified_as_their_class": float((vis_pred == vis_target).float().mean()),
            "predicted": vis_pred.view(-1).tolist(),
        },
        "settings": {"metrics": metrics, "pair_stride": strides,
                     "all_pairs": all(v == 1 for s in strides.values() for v in s.values()),
                     "dtype": str(dt).replace("torch.", ""), "smoothing_window": smoothing_window,
                     "smoothing": "scipy.ndimage.convolve(x, np.ones(w) / w), mode='reflect'",
                     "std_window": std_window, "band": "smoothed +/- moving std of the normalized values",
                     "drop_below": drop_below, "std_ddof": 0},
        "metrics": out_metrics,
        "runtime_s": time.time() - t0,
    }
    return _clean(result)


def _stride_tag(strides: dict) -> str:
    return "s" + "-".join(str(strides[c]) for c in CONDITIONS)
