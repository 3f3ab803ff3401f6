"""Spearman correlation of path linearity with per-unit interpretability scores (App. C.4, Figure 12).

The whole-path measures AGA (eq. 14) and ALD (eq. 18) are correlated with
the scores, and so are their "first n steps" versions AGA_n, ALD_n for
n = 2..N (`PathMetrics.running`): the paper's Figure 12. All N - 1
correlations are computed at once: rank every row, then one Pearson
correlation of ranks per row (average ranks for ties, as scipy.stats.spearmanr).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import stats

from ..errors import FvtrustError

# App. C.4, 84 Inception-V1 units with Zimmermann et al. (2023) scores
PAPER_REFERENCE = {"agpa_n2": {"n": 2, "r": -0.36, "p": 0.001}, "ald": {"n": 512, "r": 0.02, "p": 0.86},
                   "units": 84, "model": "Inception-V1"}


def spearman_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman r and two-sided p of every row of x (K, U) with y (U,), as scipy.stats.spearmanr.

    NaN in a row gives NaN r and p for that row; constant rows give NaN (no ranking).
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[0]
    rx = stats.rankdata(x, axis=1, nan_policy="propagate")
    ry = stats.rankdata(y)
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rx @ ry) / (np.sqrt((rx * rx).sum(axis=1)) * np.sqrt((ry * ry).sum()))
        r = np.clip(r, -1.0, 1.0)
        dof = n - 2
        t = r * np.sqrt(dof / ((1.0 - r) * (1.0 + r)))
    p = 2 * stats.t.sf(np.abs(t), dof)
    p = np.where(np.isnan(r), np.nan, p)
    return r, p


def _score_vector(units, scores) -> np.ndarray:
    if isinstance(scores, Mapping):
        missing = [u for u in units if u not in scores and str(u) not in scores]
        if missing:
            have = sorted(scores, key=str)
            raise FvtrustError(f"no interpretability score for unit(s) {', '.join(map(str, missing))}; "
                               f"scores are given for {len(have)} unit(s): "
                               f"{', '.join(map(str, have[:10]))}{' ...' if len(have) > 10 else ''}")
        vals = [scores[u] if u in scores else scores[str(u)] for u in units]
    else:
        vals = list(np.asarray(scores, dtype=object).reshape(-1))
        if len(vals) != len(units):
            raise FvtrustError(f"got {len(vals)} scores for {len(units)} units: pass one score per unit "
                               "(in the metrics' unit order) or a {unit: score} mapping")
    try:
        out = np.asarray([float(v) for v in vals], dtype=np.float64)
    except (TypeError, ValueError):
        raise FvtrustError("scores must be numbers") from None
    bad = [u for u, v in zip(units, out) if not math.isfinite(v)]
    if bad:
        raise FvtrustError(f"score for unit(s) {', '.join(map(str, bad))} is not a finite number")
    return out


def correlate(metrics, scores) -> dict:
    """Spearman r, p of AGA and ALD with per-unit scores, and r, p against n (Figure 12).

    `metrics`: a PathMetrics. `scores`: {unit: score} or one score per unit
    in `metrics.units` order. Units whose whole-path measure is undefined
    (every gradient zero) are left out of that measure and listed under
    "excluded". Curve entry n uses AGA_n = mean(AGPA_1..AGPA_{n-1}) (the n - 1
    angles among the first n gradients) and likewise ALD_n; its last entry
    (n = N) equals the whole-path correlation. JSON-able.
    """
    units = list(metrics.units)
    y = _score_vector(units, scores)
    out = {"units": units, "scores": y.tolist(), "n": list(range(2, metrics.steps + 1)),
           "reference": PAPER_REFERENCE,
           "curve_definition": "AGA_n = mean(AGPA_1..AGPA_{n-1}), ALD_n = mean(ALDP_1..ALDP_{n-1})",
           "excluded": {}}
    for name in ("aga", "ald"):
        whole = getattr(metrics, name)
        keep = ~np.isnan(whole)
        if keep.sum() < 3:
            raise FvtrustError(f"need at least 3 units with a defined {name.upper()} to correlate, have "
                               f"{int(keep.sum())}")
        out["excluded"][name] = [u for u, k in zip(units, keep) if not k]
        r, p = spearman_rows(whole[keep][None, :], y[keep])
        curve_r, curve_p = spearman_rows(metrics.running(name)[keep].T, y[keep])
        out[name] = {"r": float(r[0]), "p": float(p[0]), "n_units": int(keep.sum())}
        out[f"{name}_curve"] = {"r": curve_r.tolist(), "p": curve_p.tolist()}
    return out


def load_scores_csv(path) -> dict[int, float]:
    """Read `unit,score` rows (header required) into {unit: score}; FvtrustError on anything malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FvtrustError(f"cannot read scores file {path}: {e.strerror or e}") from None
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(text.splitlines())) if r and any(c.strip() for c in r)]
    if not rows:
        raise FvtrustError(f"scores file {path} is empty: expected a header 'unit,score' and one row per unit")
    line, header = rows[0]
    if [c.strip().lower() for c in header] != ["unit", "score"]:
        raise FvtrustError(f"{path}:{line}: header must be 'unit,score', got {','.join(header)!r}")
    scores: dict[int, float] = {}
    for line, row in rows[1:]:
        if len(row) != 2:
            raise FvtrustError(f"{path}:{line}: expected 2 columns 'unit,score', got {len(row)}: {','.join(row)!r}")
        try:
            unit = int(row[0].strip())
            score = float(row[1].strip())
        except ValueError:
            raise FvtrustError(f"{path}:{line}: unit must be an integer and score a number, got "
                               f"{','.join(row)!r}") from None
        if not math.isfinite(score):
            raise FvtrustError(f"{path}:{line}: score for unit {unit} is not a finite number")
        if unit in scores:
            raise FvtrustError(f"{path}:{line}: unit {unit} appears twice")
        scores[unit] = score
    if not scores:
        raise FvtrustError(f"scores file {path} has a header but no rows")
    return scores


__all__ = ["PAPER_REFERENCE", "correlate", "load_scores_csv", "spearman_rows"]
