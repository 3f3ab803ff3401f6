"""The sanity check of §3 / App. C.3: are visualizations processed like natural images?

For every layer l and similarity Γ (Spearman, Pearson, cosine) of flattened
activations, three conditions:

* ``same_class``: natural vs natural image of the same class (upper bound);
* ``different_class``: natural vs natural image of two different classes (lower bound);
* ``natural_vs_visualization``: natural image of class c vs a visualization of
  the last-layer unit of class c.

Natural images the model misclassifies (wrong top-1) are excluded, as in the
paper. Per layer we report, for each condition, ``mean``: the average over
classes of the per-class means ("the results are averaged across classes",
§3; for different classes, class c's mean is the average over the other
classes c' of the mean over the pairs of c and c'), ``per_class_mean``,
and over all pairs pooled ``pooled_mean``, ``std`` (ddof=0), ``n_pairs``.
Pairs whose similarity is undefined (e.g. an all-zero post-ReLU activation)
are counted in ``n_undefined`` and left out of every mean; a class without a
defined pair is left out of the class average. Averaging per class gives
every class the same weight even when misclassified images were excluded
unevenly; with equal counts, all pairs and none undefined it equals the
pooled mean.

**Pair sub-sampling** (paper: every 10th same-class pair, every 100th
different-class pair, every 5th natural-vs-visualization pair for Spearman
and Pearson; every pair for cosine). The pairs form blocks: one per class
(natural pairs i < j; natural rows x visualizations) and one per class pair
(natural rows of c x of c'). Each block keeps the share of its pairs that
"every s-th", counted across the blocks in class order, would keep, but
spread evenly over the block's images under a seeded relabelling
(``pair_seed``), so every visualization and nearly every natural image
takes part: see :func:`enumerate_pairs` for why a literal stride does not.
The selection does not depend on the metric. ``pair_stride="all"`` (CLI
``--all-pairs``) keeps every pair: with the rank-once engine that is cheap,
which is the point of it.

**Normalization** (Figures 6, 8, 10): per layer, (x - different) / (same -
different), so same class = 1 and different class = 0, from the class-averaged
means.
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


def _kept_count(pos: int, size: int, stride: int) -> int:
    """How many of a block's pairs the paper's global stride keeps: the multiples of stride in [pos, pos + size)."""
    return (pos + size + stride - 1) // stride - (pos + stride - 1) // stride


def _generator(seed: int, condition: str) -> torch.Generator:
    """One generator per condition, from the seed and the condition's name."""
    digest = hashlib.sha256(f"{int(seed)}|{condition}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _rect_order(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Entry t of the order of the a x b pairs whose every prefix uses rows and columns evenly
    (use counts differ by <= 1); elementwise over blocks.

    Torus diagonals: t -> (t mod a, (t + t // L) mod b) with L = lcm(a, b). Within one
    diagonal (L entries) the map is the Chinese-remainder bijection onto the pairs with
    i = j (mod gcd); the shift t // L moves to the next residue class, so [0, a b) covers
    every pair once.
    """
    lcm = a * b // torch.gcd(a, b).clamp_min(1)
    return torch.stack([t % a, (t + torch.div(t, lcm.clamp_min(1), rounding_mode="floor")) % b], dim=1)


def _permutations(sizes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A uniform random permutation of range(size) per row (rows padded to the largest size)."""
    width = int(sizes.max()) if len(sizes) else 0
    keys = torch.rand(len(sizes), width, generator=gen)
    keys[torch.arange(width) >= sizes[:, None]] = 2.0  # padding sorts last
    return keys.argsort(dim=1)


def _sample_rect_blocks(shapes: list[tuple[int, int]], keep: list[int], gen: torch.Generator,
                        chunk: int = 4096) -> list[torch.Tensor]:
    """Kept local pairs of many a x b blocks at once: the first k of :func:`_rect_order`, rows and
    columns relabelled by random permutations. A block that keeps every pair keeps them row-major."""
    out = []
    for start in range(0, len(shapes), chunk):
        sh = torch.tensor(shapes[start:start + chunk], dtype=torch.long).reshape(-1, 2)
        a, b = sh[:, 0], sh[:, 1]
        k = torch.minimum(torch.tensor(keep[start:start + chunk], dtype=torch.long), a * b)
        rows, cols = _permutations(a, gen), _permutations(b, gen)
        blk = torch.arange(len(sh)).repeat_interleave(k)
        t = torch.arange(len(blk)) - (torch.cumsum(k, 0) - k).repeat_interleave(k)
        full = (k == a * b)[blk]
        order = _rect_order(a[blk], b[blk], t)
        i = torch.where(full, torch.div(t, b[blk].clamp_min(1), rounding_mode="floor"), rows[blk, order[:, 0]])
        j = torch.where(full, t % b[blk].clamp_min(1), cols[blk, order[:, 1]])
        out += list(torch.stack([i, j], dim=1).split(k.tolist()))
    return out


def _tri_order(n: int) -> torch.Tensor:
    """All pairs i < j of n rows, ordered so that every prefix uses the rows evenly (counts differ by <= 2).

    Round robin by difference: for d = 1, 2, ... the pairs {i, (i + d) mod n}, each row
    twice per round (the last round, d = n/2 for even n, has n/2 pairs, each row once).
    """
    if n < 2:
        return torch.empty((0, 2), dtype=torch.long)
    rounds = []
    for d in range(1, n // 2 + 1):
        i = torch.arange(n // 2 if 2 * d == n else n, dtype=torch.long)
        j = (i + d) % n
        rounds.append(torch.stack([torch.minimum(i, j), torch.maximum(i, j)], dim=1))
    return torch.cat(rounds)


def _sample_tri(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if k >= n * (n - 1) // 2:
        return torch.triu_indices(n, n, 1).T.contiguous()  # every pair, row-major
    pairs = torch.randperm(n, generator=gen)[_tri_order(n)[:k]]
    return torch.sort(pairs, dim=1).values


def enumerate_pairs(nat_counts: list[int], vis_counts: list[int], strides: dict, seed: int = 0) -> dict:
    """The kept pairs of each condition, block by block.

    A block is one class (same class: natural pairs i < j; natural vs
    visualization: natural rows x visualizations) or one class pair c < c'
    (natural rows of c x natural rows of c'). Returns
    {condition: [(a_block, b_block or None, class position(s), local pairs (k, 2))]}
    where a block is ("nat" | "vis", class position); only kept pairs are made.

    **How many** pairs a block keeps is what the paper's "every s-th
    comparison" keeps of it when the comparisons of a condition are counted
    across blocks in class order: the multiples of s among the block's
    global positions. So each condition keeps ceil(N / s) of its N pairs, and
    each block size / s of its own, rounded up or down.

    **Which** pairs: every s-th pair of a row-major list locks onto it when the
    block's row length shares a factor with s (10 visualizations and s = 5
    keep visualizations #0 and #5 only; 50 x 50 blocks and s = 100 keep one
    image of the second class). Instead each block keeps a prefix of an
    order that spreads the pairs evenly over its images (:func:`_rect_order`,
    :func:`_tri_order`: row and column use counts differ by at most 1, resp.
    2), under a random relabelling of the block's images (one generator per
    condition, seeded from ``seed``). The relabelling makes every pair of a block
    equally likely to be kept (an unbiased sample, like the stride on
    arbitrary dataset order), the order makes every image contribute as
    equally as the count allows (every visualization and natural image takes
    part wherever the count reaches the number of images), and different
    blocks use different images where they cannot all take part (as for
    different classes with s = 100). Strides coprime with the block sizes
    would spread the pairs too but change the paper's fraction; a plain
    random subset keeps the fraction but may leave images out by chance.

    A block that keeps every pair (stride 1) keeps them in row-major order.
    The pairs depend on the counts, strides and seed only, never on the
    metric, so metrics with the same strides compare the same pairs.
    Different-class blocks are drawn in chunks of tensor ops (499,500 of
    them for 1000 classes).
    """
    n_cls = len(nat_counts)
    out = {c: [] for c in CONDITIONS}
    pos, s, gen = 0, strides["same_class"], _generator(seed, "same_class")
    for k in range(n_cls):
        n = nat_counts[k]
        size = n * (n - 1) // 2
        out["same_class"].append((("nat", k), None, k, _sample_tri(n, _kept_count(pos, size, s), gen)))
        pos += size
    blocks = [(k, k2) for k in range(n_cls) for k2 in range(k + 1, n_cls)]
    shapes = [(nat_counts[k], nat_counts[k2]) for k, k2 in blocks]
    starts = np.cumsum([0] + [a * b for a, b in shapes])
    s = strides["different_class"]
    keep = [_kept_count(int(p), a * b, s) for p, (a, b) in zip(starts, shapes)]
    local = _sample_rect_blocks(shapes, keep, _generator(seed, "different_class"))
    out["different_class"] = [(("nat", k), ("nat", k2), (k, k2), q) for (k, k2), q in zip(blocks, local)]
    shapes = list(zip(nat_counts, vis_counts))
    starts = np.cumsum([0] + [a * b for a, b in shapes])
    s = strides["natural_vs_visualization"]
    keep = [_kept_count(int(p), a * b, s) for p, (a, b) in zip(starts, shapes)]
    local = _sample_rect_blocks(shapes, keep, _generator(seed, "natural_vs_visualization"))
    out["natural_vs_visualization"] = [(("nat", k), ("vis", k), k, q) for k, q in enumerate(local)]
    return out


def count_pairs(nat_counts, vis_counts, strides: dict) -> dict:
    """Number of kept pairs per condition (no similarity computed, no pairs made)."""
    out = {}
    for cond in CONDITIONS:
        if cond == "same_class":
            sizes = [n * (n - 1) // 2 for n in nat_counts]
        elif cond == "different_class":
            sizes = [a * b for i, a in enumerate(nat_counts) for b in nat_counts[i + 1:]]
        else:
            sizes = [a * b for a, b in zip(nat_counts, vis_counts)]
        out[cond] = -(-sum(sizes) // strides[cond])  # ceil(N / s): the multiples of s in [0, N)
    return out


# ----------------------------------------------------------- one layer's stats


def _summarize(values: torch.Tensor) -> dict:
    v = values[~torch.isnan(values)]
    return {"mean": float(v.mean()) if len(v) else math.nan, "std": float(v.std(correction=0)) if len(v) else math.nan,
            "n_pairs": len(values), "n_undefined": int(len(values) - len(v))}


def _nanmean_by(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of the defined values of each group (NaN for a group without any), one scatter."""
    ok = ~torch.isnan(values)
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups[ok], values[ok].double())
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups[ok], torch.ones(int(ok.sum()),
                                                                                         dtype=torch.float64))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _class_means(cond: str, vals: list, live: list, n_cls: int) -> torch.Tensor:
    """Per class: the mean over its pairs (same class, natural vs visualization), or the mean over the
    other classes of the mean over that class pair's pairs (different class)."""
    if not live:
        return torch.full((n_cls,), math.nan, dtype=torch.float64)
    lengths = torch.tensor([len(blk[3]) for blk in live])
    block_of = torch.arange(len(live)).repeat_interleave(lengths)
    block_mean = _nanmean_by(torch.cat(vals), block_of, len(live))
    if cond != "different_class":
        out = torch.full((n_cls,), math.nan, dtype=torch.float64)
        out[torch.tensor([blk[2] for blk in live])] = block_mean
        return out
    ends = torch.tensor([blk[2] for blk in live])  # (blocks, 2): the two classes of each class pair
    return _nanmean_by(block_mean.repeat(2), torch.cat([ends[:, 0], ends[:, 1]]), n_cls)


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
    n_cls = len(pairs["same_class"])
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
        per_class = _class_means(cond, vals, live, n_cls)
        defined = per_class[~torch.isnan(per_class)]
        stats["pooled_mean"] = stats["mean"]
        stats["mean"] = float(defined.mean()) if len(defined) else math.nan  # the paper: averaged across classes
        stats["per_class_mean"] = per_class.tolist()
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
        drop_below: float = DROP_BELOW, smoothing_window: int = SMOOTHING_WINDOW, std_window: int = STD_WINDOW,
        pair_seed: int = 0, exclude_misclassified=True) -> dict:
    """The sanity check on ``model``; returns a JSON-able dict (see :mod:`fvtrust.sanity.analysis`).

    ``natural``: (images, labels), [0, 1] images of the model's input shape;
    the first ``per_class_natural`` of each class in ``classes`` are used (all
    if None) and misclassified ones are excluded. ``visualizations``: per
    class, visualizations of that class's last-layer unit (see
    :func:`arrange_visualizations`), ``per_class`` of each (all if None).
    ``classes``: indices or class names (default: all classes of the model).
    ``layers``: "all" or layer names (see :mod:`fvtrust.sanity.activations`).
    ``pair_stride``: "paper" (10 / 100 / 5 for Spearman and Pearson, all pairs
    for cosine), "all", or see :func:`resolve_strides`; ``pair_seed`` draws
    which pairs a sub-sampled block keeps (:func:`enumerate_pairs`).
    ``cache_dir`` makes the run resumable (finished layers are skipped on rerun).
    ``exclude_misclassified``: True (the paper), False, or "auto": exclude unless
    that leaves no natural image at all (a random-init model), then keep them
    all and say so in ``natural.misclassified_excluded``.
    """
    t0 = time.time()
    metrics = check_metrics(metrics)
    strides = resolve_strides(pair_stride, metrics)
    dt = _dtype(dtype)
    for name, w in (("smoothing_window", smoothing_window), ("std_window", std_window), ("batch_size", batch_size)):
        if not isinstance(w, (int, np.integer)) or w < 1:
            raise FvtrustError(f"{name} must be a positive integer, got {w!r}")
    if not isinstance(pair_seed, (int, np.integer)) or isinstance(pair_seed, bool):
        raise FvtrustError(f"pair_seed must be an integer, got {pair_seed!r}")
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
    excluded = exclude_misclassified is True or (exclude_misclassified == "auto" and bool(correct.any()))
    keep = correct if excluded else torch.ones_like(correct)
    nat_kept, y_kept = nat[keep], nat_y[keep]
    nat_counts = [int((y_kept == c).sum()) for c in classes]
    if sum(nat_counts) == 0:
        raise FvtrustError("the model misclassifies every selected natural image; nothing to compare (for a "
                           "random-init model, keep them: --misclassified keep, exclude_misclassified=False)")

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
    by_stride = {}  # metrics with the same strides share one (identical) selection
    for m in metrics:
        key = tuple(strides[m][c] for c in CONDITIONS)
        if key not in by_stride:
            by_stride[key] = enumerate_pairs(nat_counts, vis_counts, strides[m], pair_seed)
    pairs = {m: by_stride[tuple(strides[m][c] for c in CONDITIONS)] for m in metrics}

    cache = _LayerCache(cache_dir, {"fingerprint": weights_digest(model, images), "dtype": str(dt),
                                    "counts": [nat_counts, vis_counts]})
    results: dict[str, dict] = {m: {} for m in metrics}

    def cached(lay: Layer) -> bool:
        if all(lay.name in results[m] for m in metrics):  # computed by a worker (below)
            return True
        hits = {m: cache.get(lay.name, f"{m}-{_stride_tag(strides[m], pair_seed)}") for m in metrics}
        for m, h in hits.items():
            if h is not None:  # a layer killed between its metrics keeps the finished ones
                results[m][lay.name] = h
        return all(h is not None for h in hits.values())

    engine = {"dtype": dt}
    from ..cache import locked
    from ..scale import current, run_shards

    with contextlib.nullcontext() if cache_dir is None else locked(cache_dir, what="sanity cache"):
        if current() is not None:
            # on workers (--ray): one shard per unfinished layer, its metrics' statistics written here as
            # each arrives; the loop below then finds every layer done. In one process the loop's grouped
            # forward passes (several layers per pass) do the same work with fewer passes.
            def finished(name, stats):
                for m in metrics:
                    results[m][name] = stats[m]
                    cache.put(name, f"{m}-{_stride_tag(strides[m], pair_seed)}", _clean(stats[m]))

            shards = [(lay.name, (lay, metrics, batch_size, dt, budget_bytes)) for lay in found if not cached(lay)]
            run_shards(_layer_shard, shards, shared=(model, images, offsets, pairs), on_result=finished,
                       desc="sanity layers", unit="layer")
        for rows in collect(model, images, found, metrics, batch_size=batch_size, dtype=dt,
                            budget_bytes=budget_bytes, spill_dir=spill_dir, skip=cached, desc="sanity"):
            for m in metrics:
                if rows.layer.name in results[m]:  # cached: computed before an interruption
                    continue
                stats = layer_conditions(rows.prepared[m], offsets, pairs[m], blockwise=rows.spilled, **engine)
                results[m][rows.layer.name] = stats
                cache.put(rows.layer.name, f"{m}-{_stride_tag(strides[m], pair_seed)}", _clean(stats))
            del rows

    out_metrics = {}
    for m in metrics:
        per_layer = [results[m][n] for n in names]
        conds = {}
        for c in CONDITIONS:
            conds[c] = {k: [_nan(s[c][k]) if k in ("mean", "pooled_mean", "std") else s[c][k] for s in per_layer]
                        for k in ("mean", "pooled_mean", "std", "n_pairs", "n_undefined")}
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
            "excluded_indices": nat_idx[~keep].tolist(),
            "misclassified_excluded": excluded,
            "accuracy": float(correct.float().mean()),
        },
        "visualizations": {
            "per_class": vis_counts,
            "classified_as_their_class": float((vis_pred == vis_target).float().mean()),
            "predicted": vis_pred.view(-1).tolist(),
        },
        "settings": {"metrics": metrics, "pair_stride": strides, "pair_seed": int(pair_seed),
                     "pair_sampling": "per block: the paper's share of pairs, spread evenly over its images "
                                      "under a seeded relabelling",
                     "condition_mean": "mean over classes of per-class means (different class: over class "
                                       "pairs); pooled_mean and std are over all pairs",
                     "all_pairs": all(v == 1 for s in strides.values() for v in s.values()),
                     "dtype": str(dt).replace("torch.", ""), "smoothing_window": smoothing_window,
                     "smoothing": "scipy.ndimage.convolve(x, np.ones(w) / w), mode='reflect'",
                     "std_window": std_window, "band": "smoothed +/- moving std of the normalized values",
                     "drop_below": drop_below, "std_ddof": 0},
        "metrics": out_metrics,
        "runtime_s": time.time() - t0,
    }
    return _clean(result)


@torch.no_grad()
def _layer_shard(model, images, offsets, pairs, lay, metrics, batch_size, dtype, budget_bytes) -> dict:
    """{metric: condition statistics} of one layer (a `fvtrust.scale` shard): exactly what `run`'s loop
    computes for it, from a forward pass that stops at this layer."""
    from .activations import collect

    out = {}
    for rows in collect(model, images, [lay], metrics, batch_size=batch_size, dtype=dtype, budget_bytes=budget_bytes,
                        desc=f"sanity {lay.name}"):
        for m in metrics:
            out[m] = layer_conditions(rows.prepared[m], offsets, pairs[m],
                                      blockwise=rows.spilled, dtype=dtype)
    return out


def _stride_tag(strides: dict, seed: int) -> str:
    """Cache tag of the pair selection; "v2": balanced per-block pairs and per-class means (issue 19)."""
    return "v2-s" + "-".join(str(strides[c]) for c in CONDITIONS) + f"-seed{int(seed)}"
