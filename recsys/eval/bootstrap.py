"""Paired bootstrap confidence intervals over users (and seeds).

Two arms scored on the same impressions are compared by resampling USERS
with replacement (impressions of one user are correlated, so rows are not
independent draws). A replicate is expressed as per-row weights = the
multiplicity of the row's user, so every metric is computed on exactly the
same resampled users for both arms (paired).

With S seeds per arm (each seed reruns the arm's whole chain: teachers,
student, match features, ranker), the interval is a two-level (hierarchical)
bootstrap: each replicate also resamples the S seeds with replacement and
averages the per-seed deltas on the replicate's users. It therefore covers
the variation between users AND the randomness of training the treatment
and the control; with one seed it covers users only.

Shared by the LightGBM report and `recsys experiment compare`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from recsys.eval import rank_pairs
from recsys.eval.metrics import Metric, compute, per_group_auc, weighted_avg_ranks


@dataclass(frozen=True)
class PairedCI:
    metric: str
    treatment: float  # metric of the treatment on all rows
    control: float  # metric of the control on all rows
    delta: float  # treatment - control
    ci_low: float
    ci_high: float
    n_boot: int
    n_users: int
    higher_is_better: bool
    p_value: float = float("nan")  # two-sided bootstrap p-value of "no difference"

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    @property
    def regression(self) -> bool:
        """The whole interval lies on the worse side of zero."""
        return bool(self.ci_high < 0) if self.higher_is_better else bool(self.ci_low > 0)


def user_multiplicities(n_users: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_users) counts of each user in each bootstrap replicate."""
    draws = rng.integers(0, n_users, size=(n_boot, n_users))
    offsets = (np.arange(n_boot) * n_users)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_users).reshape(n_boot, n_users)


def replicate_values(metric: Metric, users_idx: np.ndarray, y: np.ndarray, score: np.ndarray,
                     counts: np.ndarray) -> np.ndarray:
    """(B,) values of `metric` on each bootstrap replicate, whose rows are
    weighted by `counts[b, users_idx]` (B, U): vectorised for auc, gauc,
    logloss and spearman (the sort, the per-user AUCs and the per-user sums
    are computed once; auc and spearman as quadratic forms in the user counts,
    `recsys.eval.rank_pairs`, when users are few enough), a loop for the rest."""
    n_boot = counts.shape[0]
    if metric.kind == "gauc":
        _, a, n = per_group_auc(users_idx, y, score)
        ok = ~np.isnan(a)
        w = counts[:, ok] * n[ok]  # (B, U_ok)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ a[ok]) / w.sum(axis=1)
    if metric.kind == "logloss":
        p = np.clip(score, 1e-7, 1 - 1e-7)
        ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))  # (n,)
        n_users = counts.shape[1]
        per_user = np.bincount(users_idx, weights=ll, minlength=n_users)
        rows = np.bincount(users_idx, minlength=n_users).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (counts @ per_user) / (counts @ rows)
    if metric.kind == "auc" and rank_pairs.worth_it(counts.shape[1], len(y)):
        return rank_pairs.replicate_auc(users_idx, y, score, counts)
    if metric.kind == "auc":
        order = np.argsort(score, kind="mergesort")
        s_sorted, pos_row, u_sorted = score[order], (y[order] > 0).astype(np.float64), users_idx[order]
        if not len(s_sorted):
            return np.full(n_boot, np.nan)
        starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # first row of each tie group
        out = np.empty(n_boot)
        chunk = max(1, 4_000_000 // len(s_sorted))  # replicates per block: ~32 MB of row weights
        for b0 in range(0, n_boot, chunk):
            rw = counts[b0:b0 + chunk][:, u_sorted].astype(np.float64)  # (b, n)
            pos = np.add.reduceat(rw * pos_row, starts, axis=1)  # (b, G)
            neg = np.add.reduceat(rw * (1 - pos_row), starts, axis=1)  # (b, G)
            below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
            wp, wn = pos.sum(axis=1), neg.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[b0:b0 + chunk] = np.where((wp > 0) & (wn > 0), (pos * (below + 0.5 * neg)).sum(axis=1) / (wp * wn), np.nan)
        return out
    if metric.kind == "spearman":
        coarse = rank_pairs.spearman_order(score, y, counts.shape[1])
        if coarse is not None:
            return rank_pairs.replicate_spearman(coarse[0], coarse[1], users_idx, counts)
        return _replicate_spearman(score, y, users_idx, counts)
    return np.array([compute(metric, users_idx, y, score, counts[b, users_idx]) for b in range(n_boot)])


def _replicate_spearman(x: np.ndarray, y: np.ndarray, users_idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) Spearman correlations with rows repeated by their user's multiplicity
    (the same value `spearman(x, y, weights)` gives), vectorised over replicates."""
    n_boot, n = counts.shape[0], len(x)
    out = np.full(n_boot, np.nan)
    if n < 2:
        return out
    chunk = max(1, 2_000_000 // n)
    for b0 in range(0, n_boot, chunk):
        rw = counts[b0:b0 + chunk][:, users_idx].astype(np.float64)  # (b, n)
        rx, ry = weighted_avg_ranks(x, rw), weighted_avg_ranks(y, rw)
        tot = rw.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            dx = rx - (rw * rx).sum(axis=1, keepdims=True) / tot
            dy = ry - (rw * ry).sum(axis=1, keepdims=True) / tot
            den = np.sqrt((rw * dx * dx).sum(axis=1) * (rw * dy * dy).sum(axis=1))
            r = (rw * dx * dy).sum(axis=1) / den
        out[b0:b0 + chunk] = np.where((den > 0) & (tot[:, 0] >= 2), r, np.nan)
    return out


_MEMO: OrderedDict[bytes, np.ndarray] = OrderedDict()
_MEMO_SIZE = 64


def _memo_replicates(metric: Metric, users_idx: np.ndarray, y: np.ndarray, score: np.ndarray,
                     counts: np.ndarray) -> np.ndarray:
    """`replicate_values`, remembered for the last few distinct inputs: a
    compare scores the control arm against every treatment on the same rows
    and replicates, and would otherwise recompute the control's values."""
    h = hashlib.blake2b(metric.name.encode(), digest_size=16)
    for a in (users_idx, y, score, counts):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.data)
    key = h.digest()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    out = replicate_values(metric, users_idx, y, score, counts)
    _MEMO[key] = out
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return out


def bootstrap_p_value(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "delta = 0": twice the smaller tail share
    of replicate deltas at or beyond zero, with the +1 correction that keeps it
    above 0 (the smallest value is 2 / (B + 1))."""
    if not len(deltas):
        return float("nan")
    b = len(deltas)
    tail = min((np.sum(deltas <= 0) + 1) / (b + 1), (np.sum(deltas >= 0) + 1) / (b + 1))
    return float(min(1.0, 2 * tail))


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down rejections for a family of tests (NaN: never rejected)."""
    idx = sorted((i for i, p in enumerate(p_values) if not np.isnan(p)), key=lambda i: p_values[i])
    m = len(idx)
    reject = [False] * len(p_values)
    for k, i in enumerate(idx):
        if p_values[i] > alpha / (m - k):
            break
        reject[i] = True
    return reject


def paired_bootstrap(
    metric: Metric,
    users: np.ndarray,
    y: np.ndarray,
    score_treatment: np.ndarray,
    score_control: np.ndarray,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator,
) -> PairedCI:
    """Percentile interval of metric(treatment) - metric(control).

    Scores are (n,) or (S, n) for S paired seeds: values are means over
    seeds; each replicate resamples users and, with S > 1, the seeds too
    (module docstring), so user noise and training noise are both inside
    the interval."""
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    users = np.asarray(users)
    y = np.asarray(y, dtype=np.float64)
    st = np.atleast_2d(np.asarray(score_treatment, dtype=np.float64))  # (S, n)
    sc = np.atleast_2d(np.asarray(score_control, dtype=np.float64))  # (S, n)
    if st.shape != sc.shape or st.shape[1] != len(y) or len(users) != len(y):
        raise ValueError("paired bootstrap needs the same rows (and seeds) for both arms")
    u_vals, u_idx = np.unique(users, return_inverse=True)
    nan = float("nan")
    if len(y) == 0:  # nothing to score (e.g. no observed long-term label): undefined, not an error
        return PairedCI(metric.name, nan, nan, nan, nan, nan, n_boot, 0, metric.higher_is_better)
    t_all = float(np.mean([compute(metric, users, y, s) for s in st]))
    c_all = float(np.mean([compute(metric, users, y, s) for s in sc]))
    if np.isnan(t_all) or np.isnan(c_all):  # undefined on all rows: no delta, no interval
        return PairedCI(metric.name, t_all, c_all, nan, nan, nan, n_boot, len(u_vals), metric.higher_is_better)
    counts = user_multiplicities(len(u_vals), n_boot, rng)  # (B, U)
    per_seed = np.stack([np.zeros(n_boot) if np.array_equal(s_t, s_c) else
                         _memo_replicates(metric, u_idx, y, s_t, counts) - _memo_replicates(metric, u_idx, y, s_c, counts)
                         for s_t, s_c in zip(st, sc)])  # (S, B)
    n_seeds = per_seed.shape[0]
    if n_seeds > 1:
        draw = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # (B, S): the seeds of each replicate
        drawn = per_seed[draw, np.arange(n_boot)[:, None]]  # (B, S)
        ok = ~np.isnan(drawn)
        with np.errstate(invalid="ignore", divide="ignore"):  # all-NaN replicate: NaN, dropped below
            deltas = np.where(ok, drawn, 0.0).sum(axis=1) / ok.sum(axis=1)
    else:
        deltas = per_seed[0]
    deltas = deltas[~np.isnan(deltas)]
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2]) if len(deltas) else (np.nan, np.nan)
    return PairedCI(
        metric=metric.name,
        treatment=t_all,
        control=c_all,
        delta=t_all - c_all,
        ci_low=float(lo),
        ci_high=float(hi),
        n_boot=n_boot,
        n_users=len(u_vals),
        higher_is_better=metric.higher_is_better,
        p_value=bootstrap_p_value(deltas),
    )
