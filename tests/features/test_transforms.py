"""Frame tests of each transform on small hand-written inputs."""

from __future__ import annotations

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from features import schemas as S
from features import transforms as T
from features.validate import ROW

DAY = 86_400


def _events(rows):
    """rows: (user, item, timestamp, label)."""
    df = pl.DataFrame(
        rows,
        schema={S.USER_ID: pl.Int64, S.ITEM_ID: pl.Int64, S.TIMESTAMP: pl.Int64, S.LABEL: pl.Int8},
        orient="row",
    )
    return df.with_row_index(ROW).with_columns(pl.lit(None, pl.Float64).alias(S.RATING))


def test_add_label_prefers_label_then_rating_threshold():
    lf = pl.LazyFrame(
        {S.RATING: [5.0, 3.0, 4.0, None], S.LABEL: [None, None, None, 1]},
        schema={S.RATING: pl.Float64, S.LABEL: pl.Int8},
    )
    out = lf.pipe(T.add_label, 4.0).collect()
    assert out[S.LABEL].to_list() == [1, 0, 1, 1]


def test_sort_is_stable_and_packed_equals_multikey():
    rng = np.random.default_rng(0)
    n = 500
    df = pl.DataFrame(
        {
            ROW: np.arange(n, dtype=np.uint32),
            S.USER_ID: rng.integers(0, 7, n),
            S.TIMESTAMP: rng.integers(0, 20, n),
            S.ITEM_ID: rng.integers(0, 9, n),
        }
    )
    bounds = {c: (int(df[c].min()), int(df[c].max())) for c in (S.USER_ID, S.TIMESTAMP, S.ITEM_ID)}
    packed = df.lazy().pipe(T.sort_events, bounds).collect()
    multikey = df.lazy().pipe(T.sort_events).collect()
    assert_frame_equal(packed, multikey)


def test_history_offsets_exclude_same_second_ties():
    # user 1: t=10 (2 events, a batch), t=20, t=30 ; user 2: one event
    ev = _events([(1, 5, 10, 1), (1, 6, 10, 0), (1, 7, 20, 1), (1, 8, 30, 0), (2, 5, 15, 1)])
    out = ev.lazy().pipe(T.sort_events).pipe(T.add_history_offsets, 2).collect()
    assert out[S.HIST_END].to_list() == [0, 0, 2, 3, 0]
    assert out[S.HIST_LEN].to_list() == [0, 0, 2, 2, 0]  # capped at 2
    assert out[S.POS_HIST_END].to_list() == [0, 0, 1, 2, 0]
    # user 2's first event in the same second as user 1's last: a new user starts a new group
    # (a mutation audit: dropping `new_user |` passed; it gives user 2 a negative history)
    ev = _events([(1, 5, 10, 1), (1, 6, 30, 1), (2, 5, 30, 1), (2, 6, 30, 0), (2, 7, 40, 0)])
    out = ev.lazy().pipe(T.sort_events).pipe(T.add_history_offsets, 5).collect()
    assert out[S.HIST_END].to_list() == [0, 1, 0, 0, 2]
    assert out[S.POS_HIST_END].to_list() == [0, 1, 0, 0, 1]


def test_item_popularity_counts_strictly_earlier_events():
    ev = _events([(1, 5, 10, 1), (2, 5, 10, 1), (3, 5, 11, 1), (1, 6, 12, 1)])
    out = ev.lazy().pipe(T.sort_events).pipe(T.add_item_popularity).collect()
    pop = dict(zip(zip(out[S.USER_ID], out[S.ITEM_ID]), out[S.ITEM_POP]))
    assert pop == {(1, 5): 0, (2, 5): 0, (3, 5): 2, (1, 6): 0}


def test_lt_labels_golden():
    # user 1 active on days 0, 0, 1, 3, 8, 20 ; user 2 on day 1 only
    days = [0, 0, 1, 3, 8, 20]
    rows = [(1, i, d * DAY + 100 + i, 1) for i, d in enumerate(days)] + [(2, 0, 1 * DAY + 5, 1)]
    ev = _events(rows).lazy().pipe(T.sort_events).pipe(T.add_day, 0).collect()
    out = T.add_lt_labels(ev, last_day=20)
    got = out.select(S.USER_ID, S.DAY, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED).rows()
    assert got == [
        # day 0: next day 1 exists; days in 1..7 -> {1, 3}
        (1, 0, 1, 2, True),
        (1, 0, 1, 2, True),
        # day 1: day 2 absent; days in 2..8 -> {3, 8}
        (1, 1, 0, 2, True),
        # day 3: days in 4..10 -> {8}
        (1, 3, 0, 1, True),
        # day 8: days in 9..15 -> none ; day 20: window runs past the data end
        (1, 8, 0, 0, True),
        (1, 20, 0, 0, False),
        (2, 1, 0, 0, True),
    ]


def test_lt_labels_censored_at_a_per_row_limit():
    # user 1 active on days 0, 1, 3, 8; the first two rows may use days <= 2
    # (a split cutoff on day 3), the others the whole data (days <= 20)
    rows = [(1, i, d * DAY + 100 + i, 1) for i, d in enumerate([0, 1, 3, 8])]
    ev = _events(rows).lazy().pipe(T.sort_events).pipe(T.add_day, 0).collect()
    out = T.add_lt_labels(ev, np.array([2, 2, 20, 20]))
    got = out.select(S.DAY, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED).rows()
    assert got == [
        (0, 1, 1, False),  # day 1 counts, day 3 lies past the cutoff: censored
        (1, 0, 0, False),  # days 2..8 hold day 3 and 8, both past the cutoff
        (3, 0, 1, True),
        (8, 0, 0, True),
    ]


def test_day_offset_moves_day_boundary():
    ev = _events([(1, 1, DAY - 10, 1)])
    assert ev.lazy().pipe(T.add_day, 0).collect()[S.DAY].item() == 0
    assert ev.lazy().pipe(T.add_day, 20).collect()[S.DAY].item() == 1


def test_global_time_cuts_match_a_full_sort():
    rng = np.random.default_rng(1)
    n = 1000
    ts = rng.integers(0, 50, n)  # many ties
    us = rng.integers(0, 30, n)
    it = np.arange(n)
    order = np.lexsort((it, us, ts))
    for k in (0, 1, 499, 800, 999):
        j = order[k]
        assert T.global_time_cuts(ts, us, it, [k]) == [(ts[j], us[j], it[j])]


def test_split_global_time_by_count():
    rows = [(u, i, t, 1) for u, i, t in [(1, 1, 1), (2, 1, 2), (1, 2, 3), (3, 1, 4), (2, 2, 5), (1, 3, 5), (3, 3, 6), (2, 3, 7), (1, 4, 8), (3, 4, 9)]]
    ev = _events(rows)
    cuts = T.global_time_cuts(ev[S.TIMESTAMP].to_numpy(), ev[S.USER_ID].to_numpy(), ev[S.ITEM_ID].to_numpy(), [8, 9])
    out = ev.lazy().pipe(T.add_split_global_time, cuts[0], cuts[1]).collect().sort(S.TIMESTAMP, S.USER_ID)
    assert out[S.SPLIT].to_list() == ["train"] * 8 + ["valid", "test"]


def test_split_leave_last_out():
    ev = _events([(1, 1, 1, 1), (1, 2, 2, 1), (1, 3, 3, 1), (1, 4, 4, 1), (2, 1, 1, 1)])
    out = ev.lazy().pipe(T.sort_events).pipe(T.add_split_leave_last_out).collect()
    assert out[S.SPLIT].to_list() == ["train", "train", "valid", "test", "test"]


def test_cold_item_and_item_stats():
    ev = _events([(1, 1, 1, 1), (1, 2, 5, 1), (2, 1, 6, 0)]).with_columns(
        pl.Series(S.SPLIT, ["train", "test", "test"])
    )
    out = ev.lazy().pipe(T.add_cold_item).collect()
    assert out[S.COLD_ITEM].to_list() == [False, True, False]
    stats = T.item_stats(ev.lazy()).collect().sort(S.ITEM_ID)
    assert stats.rows() == [(1, 1, 1, False), (2, 5, 0, True)]


def test_flag_duplicates_exact_and_conflicting():
    ev = pl.DataFrame(
        {
            ROW: [0, 1, 2, 3],
            S.USER_ID: [1, 1, 1, 1],
            S.ITEM_ID: [1, 1, 2, 2],
            S.TIMESTAMP: [5, 5, 6, 6],
            S.RATING: [4.0, 4.0, 1.0, 5.0],
            S.LABEL: [1, 1, 0, 1],
        }
    )
    out = ev.lazy().pipe(T.sort_events).pipe(T.flag_duplicates).collect()
    assert out["__dup"].to_list() == [False, True, False, True]
    assert out["__conflict"].to_list() == [False, False, False, True]


def test_to_sequences_keeps_order_and_positives():
    ev = _events([(1, 9, 1, 1), (1, 8, 2, 0), (1, 7, 3, 1), (2, 5, 1, 0)])
    out = ev.lazy().pipe(T.sort_events).pipe(T.to_sequences).collect()
    assert out.rows() == [(1, [9, 8, 7], [1, 2, 3], [1, 0, 1], [9, 7], [1, 3]), (2, [5], [1], [0], [], [])]



def test_to_sequences_sorted_offsets_equal_the_group_by_of_any_order():
    # sorted by user: lists cut at the user boundaries; any other order: a group_by
    rng = np.random.default_rng(0)
    rows = zip(*(rng.integers(0, hi, 300).tolist() for hi in (9, 20, 50, 2)))
    ev = _events(list(rows)).with_columns(  # some null labels: neither positive nor negative
        pl.when(pl.col(S.ITEM_ID) == 3).then(None).otherwise(pl.col(S.LABEL)).alias(S.LABEL)
    )
    ordered = ev.lazy().pipe(T.sort_events).collect()
    pos = pl.col(S.LABEL) == 1
    expected = ordered.group_by(S.USER_ID, maintain_order=True).agg(
        pl.col(S.ITEM_ID).alias(S.ITEM_IDS), pl.col(S.TIMESTAMP).alias(S.TIMESTAMPS), pl.col(S.LABEL).alias(S.LABELS),
        pl.col(S.ITEM_ID).filter(pos).alias(S.POS_ITEM_IDS), pl.col(S.TIMESTAMP).filter(pos).alias(S.POS_TIMESTAMPS),
    )
    assert_frame_equal(ordered.lazy().pipe(T.to_sequences).collect(), expected)
    # users interleaved round-robin, each user's rows still in order
    interleaved = ordered.with_columns(pl.int_range(pl.len()).over(S.USER_ID).alias("k")).sort("k", maintain_order=True)
    assert not interleaved[S.USER_ID].is_sorted()
    assert_frame_equal(interleaved.drop("k").lazy().pipe(T.to_sequences).collect().sort(S.USER_ID), expected)


def test_next_day_return_rate_counts_events_whose_next_day_is_fully_observed():
    """User a active on days 0, 1, 3; user b on days 2, 3 (the last day, cut by
    the end of the data): only day 0 and day 1 events have a fully observed
    next day; a returns after day 0, not after day 1 (a mutation audit: the
    last day's events counted passed)."""
    user = np.array([1, 1, 1, 2, 2])
    ts = np.array([0, 1, 3, 2, 3]) * DAY + 50
    assert T.next_day_return_rate(user, ts, 0) == 0.5
    assert T.next_day_return_rate(np.array([1]), np.array([5]), 0) is None
