"""The quadratic-form replicates equal the metric on explicitly weighted rows."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.eval import rank_pairs as rp
from recsys.eval.bootstrap import _replicate_spearman, user_multiplicities
from recsys.eval.metrics import auc, spearman


def _data(seed: int, n: int, n_users: int, decimals: int | None):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n)
    s = rng.normal(size=n) + 0.3 * (u % 3)
    if decimals is not None:  # ties inside and across users
        s = np.round(s, decimals)
    if decimals == -1:  # a few giant tie groups, as tree ensembles score
        s = np.floor(s).clip(-2, 2)
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(np.float64)
    days = np.minimum(7, rng.poisson(2 + s.clip(-2, 2))).astype(np.float64)
    counts = user_multiplicities(n_users + 2, 40, rng)  # two users with no rows
    return u, s, y, days, counts


@pytest.mark.parametrize("seed,n,n_users,decimals", [(0, 400, 30, None), (1, 700, 50, 1), (2, 60, 4, 0), (3, 2000, 90, 2), (5, 5000, 40, -1)])
def test_replicates_equal_explicitly_weighted_metrics(seed, n, n_users, decimals):
    u, s, y, days, counts = _data(seed, n, n_users, decimals)
    got_auc = rp.replicate_auc(u, y, s, counts)
    got_sp = rp.replicate_spearman(s, days, u, counts)
    for b in range(counts.shape[0]):
        w = counts[b, u].astype(np.float64)
        np.testing.assert_allclose(got_auc[b], auc(y, s, w), rtol=0, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(got_sp[b], spearman(s, days, w), rtol=0, atol=1e-10, equal_nan=True)


def test_spearman_equals_the_row_version_and_is_symmetric():
    u, s, _, days, counts = _data(4, 900, 40, 1)
    want = _replicate_spearman(s, days, u, counts)
    np.testing.assert_allclose(rp.replicate_spearman(s, days, u, counts), want, atol=1e-12)
    x, y = rp.spearman_order(days, s, counts.shape[1])  # coarse variable given first: swapped
    assert np.array_equal(y, days)
    np.testing.assert_allclose(rp.replicate_spearman(x, y, u, counts), want, atol=1e-12)


def test_undefined_replicates_are_nan():
    u = np.array([0, 0, 1, 1])
    counts = np.array([[2, 0], [0, 2], [1, 1]])
    y = np.array([1.0, 0.0, 1.0, 1.0])  # user 1 has positives only
    s = np.array([0.3, 0.1, 0.5, 0.2])
    got = rp.replicate_auc(u, y, s, counts)
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == pytest.approx(auc(y, s, counts[2, u]))
    const = rp.replicate_spearman(np.ones(4), np.array([0.0, 1, 2, 3]), u, counts)
    assert np.isnan(const).all()


def test_pair_tensor_counts_pairs_by_users_and_class():
    x = np.array([1.0, 2.0, 2.0, 3.0])
    u = np.array([0, 1, 0, 1])
    t = rp.pair_tensor(x, u, 2, np.array([0, -1, 1, 0]), 2, np.ones(4, dtype=bool))
    # row 0 (user 0, class 0): below it nothing, itself 1/2 -> t[0,0,0] += .5
    # row 3 (user 1, class 0): rows 0, 1, 2 below (users 0, 1, 0), itself 1/2
    # row 2 (user 0, class 1): row 0 below (user 0), row 1 tied (user 1), itself 1/2
    want = np.zeros((2, 2, 2))
    want[0, 0, 0] = 0.5
    want[0, 1] = [2.0, 1.5]
    want[1, 0] = [1.5, 0.5]
    np.testing.assert_array_equal(t, want)


def test_large_user_sets_fall_back_to_rows():
    assert rp.worth_it(1_000, 100_000) and not rp.worth_it(20_000, 100_000)
    assert rp.spearman_order(np.arange(10.0), np.arange(10.0) * 2, 3) is not None
    assert rp.spearman_order(np.arange(500.0), np.arange(500.0), 3) is None  # no coarse variable
