"""Paired bootstrap confidence intervals over users.

Two arms scored on the same impressions are compared by resampling USERS
with replacement (impressions of one user are correlated, so rows are not
independent draws). A replicate is expressed as per-row weights = the
multiplicity of the row's user, so every metric is computed on exactly the
same resampled users for both arms (paired). Shared by the LightGBM report
and `recsys experiment compare`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.eval.metrics import Metric, compute, per_group_auc


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
    seeds, and each replicate averages the per-seed deltas computed on the
    SAME resampled users, so seed noise and user noise are both inside the
    interval."""
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
    if metric.kind == "gauc":
        # per-user AUCs do not change under user resampling: reweight them
        deltas = np.zeros(n_boot)
        for s_t, s_c in zip(st, sc):
            _, a_t, n = per_group_auc(u_idx, y, s_t)
            _, a_c, _ = per_group_auc(u_idx, y, s_c)
            ok = ~np.isnan(a_t) & ~np.isnan(a_c)
            w = counts[:, ok] * n[ok]  # (B, U_ok)
            with np.errstate(invalid="ignore", divide="ignore"):
                deltas += (w @ a_t[ok] - w @ a_c[ok]) / w.sum(axis=1)
        deltas /= len(st)
    else:
        deltas = np.empty(n_boot)
        for b in range(n_boot):
            rw = counts[b, u_idx]  # (n,) row weights
            deltas[b] = np.mean(
                [compute(metric, users, y, s_t, rw) - compute(metric, users, y, s_c, rw) for s_t, s_c in zip(st, sc)]
            )
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
    )
