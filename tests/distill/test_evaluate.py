"""Metrics on hand-computed cases; the cold-start protocol's guarantees."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from distill.evaluate import (
    Impressions,
    bijective_accuracy,
    kendall_tau,
    last_items,
    mean_queries,
    nmi,
    prepare_cold_start,
    rank_items,
    recall_at_k,
    topk_overlap,
)


def test_recall_at_k_golden():
    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, -1, -1]])
    targets = np.array([2, 9, 7])
    assert recall_at_k(ranked, targets, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, targets, 2) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, targets, 3) == pytest.approx(2 / 3)
    assert math.isnan(recall_at_k(ranked[:0], targets[:0], 3))


def test_topk_overlap_golden():
    assert topk_overlap(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)
    assert topk_overlap(np.array([[1, 2], [5, 6]]), np.array([[1, 2], [7, 8]])) == pytest.approx(0.5)


def test_kendall_tau_golden():
    # pairs (0,1) concordant, (0,2) concordant, (1,2) discordant -> (2 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with a tie in x: (2 - 0) / sqrt((3 - 1) * (3 - 0))
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 30), rng.standard_normal(30)
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_nmi_golden():
    assert nmi([0, 0, 1, 1], [5, 5, 3, 3]) == pytest.approx(1.0)  # same partition, other labels
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent


def test_bijective_accuracy_golden():
    t = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert bijective_accuracy(t, t) == pytest.approx(1.0)
    # item 2's projection [1, 0.1] is nearest to teacher 0 (cos 0.995 > 0.774): a miss;
    # items 0 and 1 round-trip (teacher 0's nearest projection is p0: 1 > 0.995)
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    assert bijective_accuracy(p, t) == pytest.approx(2 / 3)
    assert bijective_accuracy(t[[1, 0, 2]], t) == pytest.approx(1 / 3)  # 0 and 1 swapped


def test_last_items_and_mean_queries():
    hist = np.array([[-1, 3, 1, 2], [-1, -1, -1, 0]])
    usable = np.array([True, True, False, True])
    np.testing.assert_array_equal(last_items(hist, 2), [[1, 2], [-1, 0]])
    np.testing.assert_array_equal(last_items(hist, 3, usable), [[-1, 3, 1], [-1, -1, 0]])  # item 2 dropped
    emb = np.array([[1.0, 0], [0, 1.0], [3.0, 0], [0, 2.0]], dtype=np.float32)
    q = mean_queries(emb, hist, 2)  # mean of normalised [1,0] and [0,1] -> normalised
    np.testing.assert_allclose(q, [[np.sqrt(0.5), np.sqrt(0.5)], [1, 0]], atol=1e-6)
    assert np.all(mean_queries(emb, np.full((1, 3), -1), 2) == 0)


def test_rank_items_excludes_history_and_restricts_candidates():
    emb = np.array([[1.0, 0], [0.9, 0.1], [0.5, 0.5], [0, 1.0]], dtype=np.float32)
    imps = Impressions(
        users=np.array([0, 1]),
        targets=np.array([1, 3]),
        hist=np.array([[0], [0]]),
        cold=np.array([False, True]),
        exclude_offsets=np.array([0, 1, 1]),
        exclude_values=np.array([0]),
    )
    q = np.array([[1.0, 0], [0, 0]], dtype=np.float32)  # the second impression has no query
    ranked = rank_items(emb, q, imps, 2)
    np.testing.assert_array_equal(ranked, [[1, 2], [-1, -1]])  # item 0 excluded; no query: a miss
    ranked = rank_items(emb, q, imps, 2, candidates=np.array([True, False, True, True]))
    np.testing.assert_array_equal(ranked[0], [2, 3])


def test_protocol_on_synthetic(syn_data, synthetic_features):
    d = syn_data
    items = pl.read_parquet(synthetic_features / "items.parquet")
    eligible = items["n_train_events"].to_numpy() > 0
    assert d.heldout.sum() == round(0.2 * eligible.sum()) and not d.heldout[~eligible].any()
    assert d.pseudo_cold.sum() == round(0.1 * eligible.sum()) and not d.pseudo_cold[~eligible].any()
    assert not (d.heldout & d.pseudo_cold).any()
    # held-out items (test-cold and pseudo-cold) appear nowhere in training
    hidden = d.hidden
    assert not hidden[d.train_items].any()
    assert not any(hidden[s].any() for s in d.train_sequences)
    assert not hidden[d.train.targets].any()
    assert not hidden[d.train.hist[d.train.hist >= 0]].any()
    # warm = has train events and in neither set; valid cold = pseudo-cold, test cold = the rest
    assert np.array_equal(d.warm, eligible & ~hidden)
    assert np.array_equal(d.valid.cold, d.pseudo_cold[d.valid.targets])
    assert np.array_equal(d.test.cold, (~d.warm & ~d.pseudo_cold)[d.test.targets])
    assert not d.pseudo_cold[d.test.targets].any() and not (~d.warm & ~d.pseudo_cold)[d.valid.targets].any()
    for imps in (d.valid, d.test):
        assert (imps.hist[:, -1] >= 0).all()  # every impression has a query
        for i, ex in enumerate(imps.excluded()):
            assert imps.targets[i] not in ex
    assert d.test.cold.any() and (~d.test.cold).any() and d.valid.cold.any()
    # seeded: same seed, same items; another seed, others
    f = synthetic_features
    frames = [pl.read_parquet(f / n) for n in ("interactions.parquet", "sequences.parquet", "items.parquet")]
    again = prepare_cold_start(*frames, holdout_frac=0.2, seed=0)
    other = prepare_cold_start(*frames, holdout_frac=0.2, seed=1)
    assert np.array_equal(again.heldout, d.heldout) and np.array_equal(again.pseudo_cold, d.pseudo_cold)
    assert not np.array_equal(other.heldout, d.heldout)


def test_histories_are_strictly_earlier(ml100k_features):
    f = ml100k_features
    inter = pl.read_parquet(f / "interactions.parquet")
    d = prepare_cold_start(inter, pl.read_parquet(f / "sequences.parquet"), pl.read_parquet(f / "items.parquet"), seed=0)
    assert d.counts["n_items_heldout"] == round(0.2 * 1616) or d.counts["n_items_heldout"] > 0
    # check a sample of test impressions against timestamps: every history item
    # was liked by the user strictly before the impression's time
    test = inter.filter((pl.col("split") == "test") & (pl.col("label") == 1))
    liked = {(u, i): t for u, i, t in inter.filter(pl.col("label") == 1).select("user_id", "item_id", "timestamp").iter_rows()}
    ts = {}
    for u, i, t in test.select("user_id", "item_id", "timestamp").iter_rows():
        ts.setdefault((u, i), t)
    rng = np.random.default_rng(0)
    for r in rng.choice(len(d.test), 200, replace=False):
        u, tgt = d.user_ids[d.test.users[r]], d.item_ids[d.test.targets[r]]
        t_imp = ts[(u, tgt)]
        for h in d.test.hist[r][d.test.hist[r] >= 0]:
            assert liked[(u, d.item_ids[h])] < t_imp
