"""Golden values computed by hand, and cross-checks against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import log_loss, roc_auc_score

from recsys.eval.bootstrap import paired_bootstrap, user_multiplicities
from recsys.eval.metrics import METRICS, activity_bucket, auc, auc_by_bucket, gauc, logloss, per_group_auc, spearman


def test_auc_golden_with_ties():
    # positives at 0.9 and 0.5; negatives at 0.5 and 0.1
    # pairs: (0.9>0.5)=1, (0.9>0.1)=1, (0.5=0.5)=1/2, (0.5>0.1)=1 -> 3.5/4
    assert auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
    assert auc([1, 0], [0.2, 0.8]) == 0.0
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_weighted_auc_equals_repeated_rows():
    y, s, w = [1, 0, 1, 0], [0.3, 0.4, 0.9, 0.1], [2, 1, 0, 3]
    rep = np.repeat(np.arange(4), w)
    assert auc(y, s, w) == pytest.approx(auc(np.array(y)[rep], np.array(s)[rep]))


def test_gauc_golden():
    # user a: AUC 1.0 over 3 rows; user b: AUC 0.0 over 2 rows; user c: one class (skipped)
    users = ["a", "a", "a", "b", "b", "c"]
    y = [1, 0, 0, 1, 0, 1]
    s = [0.9, 0.1, 0.2, 0.1, 0.9, 0.5]
    assert gauc(users, y, s) == pytest.approx((1.0 * 3 + 0.0 * 2) / 5)
    vals, a, n = per_group_auc(np.array(users), y, s)
    assert list(vals) == ["a", "b", "c"] and a[0] == 1 and a[1] == 0 and math.isnan(a[2])


def test_logloss_golden():
    # -(ln 0.8 + ln 0.75)/2
    assert logloss([1, 0], [0.8, 0.25]) == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2)
    # weighted: the weights' mean, as repeated rows would give
    assert logloss([1, 0], [0.8, 0.25], [3, 1]) == pytest.approx(-(3 * math.log(0.8) + math.log(0.75)) / 4)
    assert logloss([1, 0], [0.8, 0.25], [3, 1]) == pytest.approx(logloss([1, 1, 1, 0], [0.8, 0.8, 0.8, 0.25]))
    with pytest.raises(ValueError):
        logloss([1], [1.5])


def test_spearman_golden():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> r = 0.866...
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_labels_other_than_0_and_1_are_refused_naming_the_row():
    """A NaN label was a negative for gauc and dropped by auc; a 2 or -1 gave
    logloss a negative cross-entropy."""
    for call in (lambda: auc([0, np.nan, 1, 0], [0.1, 0.95, 0.9, 0.2]),
                 lambda: gauc([1, 1, 1, 1], [0, np.nan, 1, 0], [0.1, 0.95, 0.9, 0.2]),
                 lambda: logloss([2, 0], [0.9, 0.1]),
                 lambda: logloss([-1, 0], [0.1, 0.1])):
        with pytest.raises(ValueError, match="must be 0 or 1: row [01] is"):
            call()
    assert auc([True, False], [0.3, 0.2]) == 1.0  # booleans are 0/1
    with pytest.raises(ValueError, match="must be 0 or 1"):  # checked before a non-finite score gives NaN
        gauc([1, 1], [2, 0], [np.inf, 0.1])


def test_weights_must_be_finite_non_negative_and_per_user_for_gauc():
    for w in ([np.nan, 1, 1, 1], [1, 1, -0.5, 1]):
        for call in (auc, logloss, spearman):
            with pytest.raises(ValueError, match="finite and non-negative"):
                call([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], w)
    with pytest.raises(ValueError, match="constant within a user"):
        gauc([1, 1, 2, 2], [0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [1, 2, 1, 1])


def test_spearman_takes_fractional_weights():
    """Weights were rounded to integers: 0.4 everywhere gave NaN, 2.5 read as 2."""
    x, y = np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 1, 4, 3, 5])
    assert spearman(x, y, np.full(5, 0.4)) == pytest.approx(spearman(x, y))
    rep = [2, 1, 1, 1, 1]
    assert spearman(x, y, rep) == pytest.approx(spearmanr(np.repeat(x, rep), np.repeat(y, rep))[0])
    w = np.array([2.5, 1, 1, 1, 1])  # between the repeats 2 and 3, as a weight should be
    lo, hi = sorted((spearman(x, y, [2, 1, 1, 1, 1]), spearman(x, y, [3, 1, 1, 1, 1])))
    assert lo < spearman(x, y, w) < hi


def test_cross_check_with_sklearn_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000) + 0.3 * y, 2)  # rounding creates ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p = np.clip(rng.random(2000), 0.01, 0.99)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)
    x = rng.integers(0, 8, 2000)
    assert spearman(s, x) == pytest.approx(spearmanr(s, x).statistic, abs=1e-12)
    users = rng.integers(0, 50, 2000)
    want = []
    weights = []
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            want.append(roc_auc_score(y[m], s[m]))
            weights.append(m.sum())
    assert gauc(users, y, s) == pytest.approx(np.average(want, weights=weights), abs=1e-12)


def test_buckets():
    assert list(activity_bucket([0, 1, 9, 10, 199, 200, 5000])) == ["0", "1-9", "1-9", "10-49", "50-199", "200+", "200+"]
    out = auc_by_bucket(np.array(["x", "x", "y", "y"]), [1, 0, 1, 0], [0.9, 0.1, 0.1, 0.9])
    assert out == {"x": 1.0, "y": 0.0}


def test_metric_registry_directions():
    assert METRICS["logloss"].higher_is_better is False
    assert all(METRICS[m].higher_is_better for m in ("auc", "gauc", "lt_auc", "lt_spearman"))


def test_user_multiplicities_sum_to_users():
    c = user_multiplicities(7, 50, np.random.default_rng(0))
    assert c.shape == (50, 7) and (c.sum(axis=1) == 7).all()


def _toy(n_users=200, per_user=10, lift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    y = rng.integers(0, 2, len(users))
    base = rng.normal(size=len(users)) + 0.5 * y
    better = base + lift * y + 0.3 * rng.normal(size=len(users))
    return users, y, better, base


def test_bootstrap_identical_arms_give_zero_interval():
    users, y, _, base = _toy()
    for name in ("auc", "gauc"):
        ci = paired_bootstrap(METRICS[name], users, y, base, base, n_boot=200, rng=np.random.default_rng(1))
        assert ci.delta == 0 and ci.ci_low == 0 and ci.ci_high == 0 and not ci.significant


def test_bootstrap_detects_a_real_lift_and_not_a_null_one():
    users, y, better, base = _toy(lift=1.0)
    ci = paired_bootstrap(METRICS["gauc"], users, y, better, base, n_boot=300, rng=np.random.default_rng(2))
    assert ci.delta > 0 and ci.ci_low > 0 and ci.significant and not ci.regression
    ci = paired_bootstrap(METRICS["auc"], users, y, base, better, n_boot=300, rng=np.random.default_rng(2))
    assert ci.ci_high < 0 and ci.regression
    users, y, noisy, base = _toy(lift=0.0, seed=5)
    ci = paired_bootstrap(METRICS["auc"], users, y, noisy, base, n_boot=300, rng=np.random.default_rng(3))
    assert ci.ci_low < ci.delta < ci.ci_high


def test_bootstrap_interval_matches_explicit_user_resampling():
    """The weighted replicate equals metric on explicitly resampled users."""
    users, y, better, base = _toy(n_users=30, per_user=6, lift=0.5, seed=4)
    counts = user_multiplicities(30, 1, np.random.default_rng(9))[0]
    rows = np.concatenate([np.flatnonzero(users == u).repeat(1) for u in range(30) for _ in range(counts[u])])
    w = counts[users]
    assert auc(y, better, w) == pytest.approx(auc(y[rows], better[rows]))
    assert gauc(users, y, better, w) == pytest.approx(
        gauc(np.concatenate([np.full(6, k) for k in range(len(rows) // 6)]), y[rows], better[rows])
    )


def test_bootstrap_with_seeds_averages_values_and_deltas():
    users, y, better, base = _toy(lift=0.8, seed=6)
    rng = np.random.default_rng(0)
    noise = [better + 0.01 * rng.normal(size=len(y)) for _ in range(3)]
    ci = paired_bootstrap(METRICS["auc"], users, y, np.stack(noise), np.stack([base] * 3), n_boot=200, rng=np.random.default_rng(1))
    assert ci.treatment == pytest.approx(np.mean([auc(y, s) for s in noise]))
    assert ci.control == pytest.approx(auc(y, base))
    assert ci.ci_low > 0
    with pytest.raises(ValueError):
        paired_bootstrap(METRICS["auc"], users, y, np.stack(noise), np.stack([base] * 2), n_boot=200, rng=rng)


def _predictions(**over):
    import polars as pl

    cols = {
        "user_id": [1, 1, 2, 2], "item_id": [10, 11, 10, 12], "timestamp": [0, 0, 5, 5],
        "label": [1, 0, 0, 1], "score": [0.9, 0.2, 0.6, 0.4], "lt_score": [0.8, 0.1, 0.7, 0.3],
        "returned_1d": [1, 0, 1, 0], "active_days_7": [5, 0, 3, 9], "lt_observed": [True, True, True, False],
        "hist_len": [0, 0, 12, 12],
    }
    return pl.DataFrame({**cols, **over})


def test_evaluate_predictions_golden_from_the_registry():
    from recsys.eval.metrics import evaluate_predictions

    out = evaluate_predictions(_predictions())
    # user 1: AUC 1 (2 rows); user 2: AUC 0 (2 rows)
    assert out["gauc"] == pytest.approx(0.5)
    # click AUC pairs: 0.9 > 0.2, 0.9 > 0.6, 0.4 > 0.2, 0.4 < 0.6 -> 3/4
    assert out["auc"] == pytest.approx(0.75)
    # LT metrics only over lt_observed rows: (lt 0.8 y 1), (0.1, 0), (0.7, 1) -> AUC 1
    assert out["lt_auc"] == 1.0
    # ranks of lt (0.8, 0.1, 0.7) = (3, 1, 2) vs active (5, 0, 3) = (3, 1, 2)
    assert out["lt_spearman"] == pytest.approx(1.0)
    assert out["n"] == 4 and out["reasons"] == {}
    assert list(out) == [*METRICS, "n", "reasons", "auc_by_activity"]
    assert set(out["auc_by_activity"]) == {"0", "10-49"}


def test_evaluate_predictions_says_why_a_metric_is_nan():
    from recsys.eval.metrics import evaluate_predictions

    out = evaluate_predictions(_predictions(lt_observed=[False] * 4, label=[1, 1, 1, 1]))
    for name in ("lt_auc", "lt_spearman"):
        assert math.isnan(out[name])
        assert out["reasons"][name] == "no observed LT rows (lt_observed is false on all 4 rows)"
    assert math.isnan(out["auc"]) and "one class only" in out["reasons"]["auc"]
    assert "logloss" not in out["reasons"]


def test_evaluate_predictions_names_the_column_of_a_label_not_0_or_1():
    from recsys.eval.metrics import evaluate_predictions

    with pytest.raises(ValueError, match="predictions column label: row 2 is 2 .*auc needs labels 0 or 1"):
        evaluate_predictions(_predictions(label=[1, 0, 2, 0]))


def test_constant_scores_are_named():
    from recsys.eval.metrics import constant_scores_warning

    assert "every test score is 0.25" in constant_scores_warning(np.full(5, 0.25), "m")
    assert constant_scores_warning(np.array([0.25, 0.26]), "m") is None
    assert constant_scores_warning(np.array([0.25]), "m") is None  # one row: nothing to tell apart
