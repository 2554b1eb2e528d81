"""The bootstrap's vectorised replicates and intervals against the definition:
each replicate computed on explicitly resampled users (a user drawn k times
enters as k distinct users), and each interval re-derived from the same draws.
A mutation audit (2026-12-01) found the weighting of gauc, the denominator of
logloss, the tie term of the row-path auc, the interval's percentiles, the
p-value's tails and the seed average each changeable without a test failing."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.eval import bootstrap as B
from recsys.eval import rank_pairs
from recsys.eval.metrics import METRICS, compute


def _data(seed: int = 0, n_users: int = 25, ties: bool = True):
    rng = np.random.default_rng(seed)
    per_user = rng.integers(1, 9, n_users)  # unequal users: gauc's and logloss's weights matter
    users = np.repeat(np.arange(n_users), per_user)
    n = len(users)
    y = (rng.random(n) < 0.4).astype(np.float64)
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + y)))
    if ties:  # tie groups within and across users, with both labels in them
        score = np.round(score, 1).clip(0.05, 0.95)
    days = np.minimum(7, rng.poisson(2 + 2 * y)).astype(np.float64)
    return users, y, score, days


def _explicit(metric, users, y, score, counts_b):
    """metric on the replicate's rows, each drawn user repeated as new users."""
    rows, new_users = [], []
    for u in np.flatnonzero(counts_b):
        mine = np.flatnonzero(users == u)
        for _ in range(counts_b[u]):
            rows.append(mine)
            new_users.append(np.full(len(mine), len(new_users)))
    if not rows:
        return float("nan")
    rows = np.concatenate(rows)
    return compute(metric, np.concatenate(new_users), y[rows], score[rows])


@pytest.mark.parametrize("name", ["auc", "gauc", "logloss", "lt_spearman"])
@pytest.mark.parametrize("row_path", [False, True])
def test_replicates_equal_the_metric_on_explicitly_resampled_users(name, row_path, monkeypatch):
    if row_path:  # the per-row path large user sets take, instead of the quadratic forms
        monkeypatch.setattr(rank_pairs, "worth_it", lambda *a: False)
    users, y, score, days = _data()
    label = days if name == "lt_spearman" else y
    counts = B.user_multiplicities(25, 30, np.random.default_rng(1))
    got = B.replicate_values(METRICS[name], users, label, score, counts)
    want = [_explicit(METRICS[name], users, label, score, counts[b]) for b in range(counts.shape[0])]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_the_interval_is_the_central_percentiles_of_the_replicate_deltas():
    users, y, score, _ = _data(2)
    other = np.clip(score + np.random.default_rng(3).normal(0, 0.1, len(score)), 0.01, 0.99)
    for alpha in (0.05, 0.3):
        ci = B.paired_bootstrap(METRICS["gauc"], users, y, other, score, n_boot=200, alpha=alpha,
                                rng=np.random.default_rng(7))
        counts = B.user_multiplicities(25, 200, np.random.default_rng(7))
        deltas = (B.replicate_values(METRICS["gauc"], users, y, other, counts)
                  - B.replicate_values(METRICS["gauc"], users, y, score, counts))
        deltas = deltas[~np.isnan(deltas)]
        lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
        assert (ci.ci_low, ci.ci_high) == pytest.approx((lo, hi), abs=1e-12)
        assert ci.p_value == pytest.approx(B.bootstrap_p_value(deltas))
    assert lo > np.quantile(deltas, 0.025) and hi < np.quantile(deltas, 0.975)  # alpha 0.3: narrower


def test_the_p_value_counts_both_tails_with_the_plus_one_correction():
    assert B.bootstrap_p_value(np.zeros(99)) == 1.0  # no difference at all
    assert B.bootstrap_p_value(np.full(99, 0.1)) == pytest.approx(2 / 100)
    assert B.bootstrap_p_value(np.full(99, -0.1)) == pytest.approx(2 / 100)
    d = np.r_[np.full(10, -1.0), np.full(89, 1.0)]
    assert B.bootstrap_p_value(d) == pytest.approx(2 * 11 / 100)
    assert B.bootstrap_p_value(-d) == pytest.approx(2 * 11 / 100)
    assert np.isnan(B.bootstrap_p_value(np.array([])))


def test_seed_replicates_average_the_defined_seeds_and_drop_undefined_replicates():
    """Two seeds on tiny data, where some replicates draw users of one class
    only (auc undefined): the interval is re-derived from the same draws."""
    users = np.array([0, 0, 1, 1, 2, 3])
    y = np.array([1.0, 0, 1, 1, 0, 0])
    rng = np.random.default_rng(5)
    st = np.stack([y + 0.8 * rng.random(6), y + 0.8 * rng.random(6)])  # the treatment is better
    sc = np.stack([rng.random(6), rng.random(6)])
    n_boot = 300
    ci = B.paired_bootstrap(METRICS["auc"], users, y, st, sc, n_boot=n_boot, rng=np.random.default_rng(11))
    r = np.random.default_rng(11)
    counts = B.user_multiplicities(4, n_boot, r)
    per_seed = np.stack([[_explicit(METRICS["auc"], users, y, t, counts[b]) - _explicit(METRICS["auc"], users, y, c, counts[b])
                          for b in range(n_boot)] for t, c in zip(st, sc)])  # (S, B)
    assert np.isnan(per_seed).any() and not np.isnan(per_seed).all()
    draw = r.integers(0, 2, size=(n_boot, 2))
    deltas = np.array([np.nanmean(per_seed[draw[b], b]) if not np.isnan(per_seed[draw[b], b]).all() else np.nan
                       for b in range(n_boot)])
    deltas = deltas[~np.isnan(deltas)]
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    assert (ci.ci_low, ci.ci_high) == pytest.approx((lo, hi), abs=1e-12)
    assert ci.p_value == pytest.approx(B.bootstrap_p_value(deltas))  # undefined replicates dropped, not read as 0
    assert ci.treatment == pytest.approx(np.mean([compute(METRICS["auc"], users, y, s) for s in st]))
