"""Offline ranking metrics: pure numpy functions with golden tests.

Every metric accepts optional non-negative row `weights` (a bootstrap
replicate is the same rows with user multiplicities as weights), and is
registered in METRICS with whether higher is better: that drives early
stopping and the sign convention of the compare command.

    auc      P(score of a random positive > score of a random negative), ties 1/2
    gauc     impression-weighted mean of per-user AUC over users with both labels
    logloss  mean binary cross-entropy of probabilities
    spearman rank correlation (average ranks for ties)

A metric that cannot be computed on its rows (none, one class only, no user
with both classes, constant values, non-finite scores) is NaN, never an
exception; `nan_reason` says why, metrics.json writes it as null next to a
`reasons` entry, and `format_metric` prints it as `n/a`.

`evaluate_predictions` computes every registered metric of a predictions
table (the one table every model writes) from the registry alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from features import schemas as S

if TYPE_CHECKING:
    import polars as pl

_EPS = 1e-7


def _check(y: np.ndarray, s: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if w.shape != y.shape:
        raise ValueError("weights must have one value per row")
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"weights must be finite and non-negative: row {i} is {float(w[i]):g} ({int(bad.sum())} such rows)")
    return y, s, w


def _binary(y: np.ndarray, what: str = "labels") -> np.ndarray:
    """`y` when every value is 0 or 1; a ValueError naming the first other
    value's row otherwise (a NaN label, a rating, a -1/1 coding: auc, gauc
    and logloss would each read it their own way)."""
    bad = (y != 0) & (y != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} must be 0 or 1: row {i} is {float(y[i]):g} ({int(bad.sum())} such rows)")
    return y


def auc(y_true: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC with ties counted 1/2; NaN when a class is absent."""
    y, s, w = _check(y_true, score, weights)
    _binary(y)
    if y.size == 0 or not np.isfinite(s).all():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    tie_id = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # (n,)
    pos = np.bincount(tie_id, weights=w * (y > 0))  # (G,)
    neg = np.bincount(tie_id, weights=w * (y <= 0))  # (G,)
    w_pos, w_neg = pos.sum(), neg.sum()
    if w_pos == 0 or w_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives strictly below each tie group
    return float((pos * (neg_below + 0.5 * neg)).sum() / (w_pos * w_neg))


def per_group_auc(groups: np.ndarray, y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of each group (NaN where a group lacks a class), vectorised.

    Returns (group values, auc per group, rows per group)."""
    y, s, _ = _check(y_true, score, None)
    _binary(y)
    g_vals, g = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    if len(g) != len(y):
        raise ValueError(f"groups and labels differ in length: {len(g)} vs {len(y)}")
    if len(y) == 0:
        return g_vals, np.zeros(0), np.zeros(0)
    order = np.lexsort((s, g))
    g, s, y = g[order], s[order], y[order]
    n = len(s)
    new_tie = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
    tie_id = np.cumsum(new_tie) - 1
    starts = np.flatnonzero(new_tie)
    ends = np.r_[starts[1:], n] - 1
    new_g = np.r_[True, g[1:] != g[:-1]]
    g_start = np.maximum.accumulate(np.where(new_g, np.arange(n), 0))
    rank = (starts[tie_id] + ends[tie_id]) / 2.0 - g_start + 1.0  # 1-based average rank within group
    k = len(g_vals)
    n_pos = np.bincount(g, weights=(y > 0).astype(float), minlength=k)
    n_all = np.bincount(g, minlength=k).astype(float)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(g, weights=rank * (y > 0), minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    a[(n_pos == 0) | (n_neg == 0)] = np.nan
    return g_vals, a, n_all


def gauc(
    groups: np.ndarray, y_true: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """Group (user) AUC: mean of per-user AUC weighted by the user's
    impressions (times `weights`, constant within a user), over users with
    both a positive and a negative. NaN when no user qualifies."""
    _binary(np.asarray(y_true, dtype=np.float64).ravel())
    if not np.isfinite(np.asarray(score, dtype=np.float64)).all():
        return float("nan")
    g_vals, a, n = per_group_auc(groups, y_true, score)
    if weights is not None:
        _, _, w = _check(y_true, score, weights)
        _, g = np.unique(np.asarray(groups).ravel(), return_inverse=True)
        n = np.bincount(g, weights=w, minlength=len(g_vals))
        mean = n / np.maximum(np.bincount(g, minlength=len(g_vals)), 1)
        varying = np.bincount(g, weights=np.abs(w - mean[g]), minlength=len(g_vals)) > 1e-9 * np.maximum(n, 1)
        if varying.any():
            raise ValueError("gauc weights must be constant within a user (the user's multiplicity): "
                             f"{int(varying.sum())} users have varying weights")
    ok = ~np.isnan(a) & (n > 0)
    if not ok.any():
        return float("nan")
    return float((a[ok] * n[ok]).sum() / n[ok].sum())


def logloss(y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-7, 1-1e-7])."""
    y, p, w = _check(y_true, prob, weights)
    _binary(y)
    if y.size == 0 or not np.isfinite(p).all() or w.sum() <= 0:
        return float("nan")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("logloss needs probabilities in [0, 1]; pass sigmoid(logits)")
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())


def _avg_rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    tie_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)] - 1
    r = np.empty(len(x))
    r[order] = (starts[tie_id] + ends[tie_id]) / 2.0 + 1.0
    return r


def weighted_avg_ranks(x: np.ndarray, rw: np.ndarray) -> np.ndarray:
    """(b, n) average ranks of x when row i counts rw[:, i] times (ties share
    their mean rank); integer weights give the ranks of the repeated rows."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1  # (n,) tie group of each sorted row
    w = np.add.reduceat(rw[:, order], starts, axis=1)  # (b, G)
    avg = np.cumsum(w, axis=1) - w + (w + 1) / 2  # (b, G)
    ranks = np.empty_like(rw)
    ranks[:, order] = avg[:, group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Spearman rank correlation; row i counts `weights[i]` times (integer
    weights: the rows repeated; any non-negative weight: the weighted
    Pearson correlation of the weighted average ranks). NaN if constant or
    fewer than 2 rows of positive weight."""
    x, y, w = _check(x, y, weights)
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    if weights is None:
        rx, ry = _avg_rank(x), _avg_rank(y)
    else:
        rx, ry = weighted_avg_ranks(x, w[None])[0], weighted_avg_ranks(y, w[None])[0]
    rx = rx - (w * rx).sum() / w.sum()
    ry = ry - (w * ry).sum() / w.sum()
    den = np.sqrt((w * rx * rx).sum() * (w * ry * ry).sum())
    return float((w * rx * ry).sum() / den) if den > 0 else float("nan")


def nan_reason(kind: str, y_true: np.ndarray, score: np.ndarray, label: str = "label") -> str:
    """Why a metric of `kind` ("auc", "gauc", "logloss", "spearman") is NaN
    on these rows; `label` names the truth column in the message."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.size == 0:
        return "no rows"
    if not np.isfinite(s).all():
        return f"{int((~np.isfinite(s)).sum())} non-finite scores"
    if kind == "auc":
        if (y > 0).all() or (y <= 0).all():
            return f"{label} has one class only (all {'positive' if (y > 0).all() else 'negative'})"
    if kind == "gauc":
        if (y > 0).all() or (y <= 0).all():
            return f"{label} has one class only (all {'positive' if (y > 0).all() else 'negative'})"
        return f"no user has both a positive and a negative {label}"
    if kind == "spearman":
        if y.size < 2:
            return "fewer than 2 rows"
        return f"{label} or the score is constant"
    return "undefined on these rows"


def constant_scores_warning(score: np.ndarray, model: str) -> str | None:
    """A warning when every test score is the same (a collapsed model: too
    high a learning rate, a LightGBM without a split): its AUC reads 0.5 and
    its GAUC n/a, numbers that look like results. None otherwise."""
    s = np.asarray(score, dtype=np.float64)
    if s.size < 2 or not np.isfinite(s).all() or s.min() != s.max():
        return None
    return (f"warning: {model}: every test score is {s[0]:.6g}: the model learned nothing a candidate can be told "
            "apart by (a collapsed model: check the learning rate, the epochs, or LightGBM's min_child_samples)")


def format_metric(value: float | None, digits: int = 4) -> str:
    """`0.7312`, or `n/a` for a metric that could not be computed (None/NaN)."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def auc_by_bucket(buckets: np.ndarray, y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUC inside each bucket (e.g. user-activity bucket), keyed by bucket label."""
    buckets = np.asarray(buckets)
    return {str(b): auc(np.asarray(y_true)[buckets == b], np.asarray(score)[buckets == b]) for b in np.unique(buckets)}


def activity_bucket(history_length: np.ndarray, edges: tuple[int, ...] = (1, 10, 50, 200)) -> np.ndarray:
    """Label each impression by the user's history length: '0', '1-9',
    '10-49', '50-199', '200+' for the default edges."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(history_length), side="right")
    names = ["0"] + [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    return np.asarray(names, dtype=object)[idx]


@dataclass(frozen=True)
class Metric:
    """A registered metric: how to compute it from a predictions table."""

    name: str
    higher_is_better: bool
    label: str  # predictions column holding the truth
    score: str  # predictions column holding the score
    kind: str  # "auc" | "gauc" | "logloss" | "spearman"
    rows: str | None = None  # boolean predictions column selecting the rows it is defined on (None: all)


# Predictions tables (every model writes one) have columns
# user_id, item_id, timestamp, label, score (probability), lt_score, plus
# returned_1d, active_days_7 and lt_observed for the LT-proxy metrics.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("auc", True, S.LABEL, "score", "auc"),
        Metric("gauc", True, S.LABEL, "score", "gauc"),
        Metric("logloss", False, S.LABEL, "score", "logloss"),
        Metric("lt_auc", True, S.RETURNED_1D, "lt_score", "auc", rows=S.LT_OBSERVED),
        Metric("lt_spearman", True, S.ACTIVE_DAYS_7, "lt_score", "spearman", rows=S.LT_OBSERVED),
    )
}

MetricFn = Callable[..., float]


def compute(metric: Metric, users: np.ndarray, y: np.ndarray, s: np.ndarray, weights: np.ndarray | None = None) -> float:
    if metric.kind == "auc":
        return auc(y, s, weights)
    if metric.kind == "gauc":
        return gauc(users, y, s, weights)
    if metric.kind == "logloss":
        return logloss(y, s, weights)
    if metric.kind == "spearman":
        return spearman(s, y, weights)
    raise ValueError(f"unknown metric kind {metric.kind!r}")


def evaluate_predictions(frame: pl.DataFrame) -> dict[str, Any]:
    """Every metric of METRICS on a predictions table, each over its `rows`
    (click AUC, user-grouped impression-weighted GAUC and logloss over all
    rows; LT AUC on returned_1d and LT Spearman with active_days_7 over
    lt_observed rows), then `n` (rows), `reasons` and `auc_by_activity`
    (click AUC per user-activity bucket of hist_len).

    A metric that cannot be computed is NaN, and `reasons[name]` says why
    (e.g. "no observed LT rows")."""
    users = frame[S.USER_ID].to_numpy()
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for name, metric in METRICS.items():
        keep = np.ones(frame.height, bool) if metric.rows is None \
            else frame[metric.rows].fill_null(False).to_numpy().astype(bool)  # (n,)
        y = frame[metric.label].to_numpy().astype(np.float64)
        if metric.kind != "spearman":
            bad = keep & (y != 0) & (y != 1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"predictions column {metric.label}: row {i} is {y[i]:g} ({int(bad.sum())} such rows), "
                                 f"but {name} needs labels 0 or 1")
        y, s = y[keep], frame[metric.score].to_numpy()[keep]
        out[name] = compute(metric, users[keep], y, s)
        if np.isfinite(out[name]):
            continue
        if metric.rows is not None and frame.height and not keep.any():
            reasons[name] = f"no observed LT rows ({metric.rows} is false on all {frame.height} rows)"
        else:
            reasons[name] = nan_reason(metric.kind, y, s, metric.label)
    out["n"] = int(frame.height)
    out["reasons"] = reasons
    click = METRICS["auc"]
    y, s = frame[click.label].to_numpy().astype(np.float64), frame[click.score].to_numpy()
    out["auc_by_activity"] = auc_by_bucket(activity_bucket(frame[S.HIST_LEN].to_numpy()), y, s)
    return out
