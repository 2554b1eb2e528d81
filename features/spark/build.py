"""The feature build on Spark: the polars steps of `features.jobs.steps`, run
on files that hold whole users.

    validated events (driver, once)
      -> driver   the events as parquet files of whole users, in ranges of
                  user_id (`features.spark.staged.stage_by_user`)
      -> [users]  the rows of keys seen more than once (few), flagged by
                  order_and_flag, and a histogram of the kept events'
                  timestamps, summed on the driver -> check_duplicates (as
                  the polars engine does), check_known_items; the event
                  count and the bin holding each split cut point
      -> [users]  the kept rows of those bins -> `global_time_cuts`
      -> [users]  order_and_flag, drop duplicates, user_features
                  (split, histories, days, LT labels)
      -> driver   item_features (item popularity, cold items) on the
                  rows of every file, in file order (already the stable
                  order: checked), the same writer as the polars engine

`[users]` is one Spark task per staged file (`StagedUsers.run`, a
`mapInArrow` over the files): the same function the polars engine calls on
all users at once. No shuffle: the driver, which holds the events to
validate them, writes each user's rows into one file. The driver writes the
same single files as the polars engine (same bytes, same fingerprints).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import polars as pl

from features import schemas as S
from features import transforms as T
from features.jobs.config import FeaturesConfig
from features.jobs.steps import (
    DUP_FLAGS,
    check_duplicates,
    check_known_items,
    interactions_table,
    item_features,
    order_and_flag,
    plan_split,
    user_features,
)
from features.sources import RawSource
from features.jobs.uri import scratch
from features.spark.arrow import output_schema
from features.spark.hadoop import executor_copy
from features.spark.session import default_buckets, spark_session
from features.spark.staged import StagedUsers, stage_by_user
from features.validate import ROW

CUT_BINS = 4096  # timestamp histogram bins when locating a split cut
KEYS = [S.TIMESTAMP, S.USER_ID, S.ITEM_ID]


def time_bin(ts_range: tuple[int, int]) -> pl.Expr:
    """The histogram bin (of CUT_BINS) of each event's timestamp."""
    lo, hi = ts_range
    return ((pl.col(S.TIMESTAMP) - lo) * CUT_BINS // (hi - lo + 1)).alias("b")


class SparkOrder:
    """The Spark engine's `EventOrder` over the events less the dropped
    duplicates: `hist`, the histogram of their timestamps (`time_bin`;
    columns b, count, summed here over the files of users), locates the bin
    holding each position; that bin's rows alone come to the driver (one
    pass over the staged files: `run`, a `StagedUsers.run` with the step's
    schema), where `global_time_cuts` picks the key."""

    def __init__(self, run: Callable, ts_range: tuple[int, int], hist: pl.DataFrame, dropped: pl.DataFrame) -> None:
        self._run, self._range, self._dropped = run, ts_range, dropped[ROW]
        hist = hist.group_by("b").agg(pl.col("count").sum()).sort("b")
        self._bins, self._ends = hist["b"].to_numpy(), np.cumsum(hist["count"].to_numpy())
        self.n = int(self._ends[-1]) if len(self._ends) else 0

    def cuts(self, positions: list[int]) -> list[tuple[int, int, int]]:
        js = [int(np.searchsorted(self._ends, k, side="right")) for k in positions]
        wanted = pl.Series("b", sorted({int(self._bins[j]) for j in js}), dtype=pl.Int64)
        if not len(wanted):
            return []
        dropped, ts_range = self._dropped, self._range

        def in_bins(df: pl.DataFrame) -> pl.DataFrame:  # the kept rows of the bins holding a cut
            kept = df.filter(~pl.col(ROW).is_in(dropped.implode())) if len(dropped) else df
            return kept.select(time_bin(ts_range), *KEYS).filter(pl.col("b").is_in(wanted.implode()))

        fetched = self._run(in_bins)
        out = []
        for k, j in zip(positions, js):
            before = int(self._ends[j - 1]) if j else 0
            b = fetched.filter(pl.col("b") == int(self._bins[j]))
            out += T.global_time_cuts(*(b[c].to_numpy() for c in KEYS), [k - before])
        return out


def repeated_keys(events: pl.DataFrame) -> pl.DataFrame:
    """The rows whose (timestamp, user, item) key occurs more than once in `events`."""
    return events.filter(events.select(KEYS).is_duplicated())


def interactions_on_spark(
    inter: pl.LazyFrame, bounds: dict, items: pl.DataFrame | None, source: RawSource, cfg: FeaturesConfig,
    log: Callable[[str], None], staging: Path,
) -> pl.DataFrame:
    """The interactions table, computed on Spark (see the module docstring).
    `staging`: a fresh folder the Spark executors can read (removed by the caller)."""
    events = inter.collect().with_columns(pl.col(ROW).cast(pl.Int64))  # Spark has no unsigned ints
    example = events.head(0)  # zero rows: the steps' output schemas are found on it
    event_items, event_rows = events[S.ITEM_ID], events[ROW]  # checked after the duplicates, as on polars
    staging.mkdir(parents=True, exist_ok=True)
    ts_range = bounds[S.TIMESTAMP]

    def scan(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        # A duplicate key includes the user, so its rows share a file: the rows
        # of keys seen more than once (few), flagged by the same order_and_flag
        # as on the polars engine, and the histogram of the kept events' times
        flagged = order_and_flag(repeated_keys(df).lazy(), cfg).filter(pl.col("__dup")).collect()
        kept = df.filter(~pl.col(ROW).is_in(flagged[ROW].implode())) if flagged.height else df
        return flagged, kept.group_by(time_bin(ts_range)).agg(pl.len().cast(pl.Int64).alias("count"))

    with spark_session(cfg.spark, "recsys features build") as spark, ExitStack() as stack:
        # the events as files of whole users (ranges of user_id): the passes
        # over users need no shuffle, and a Python worker reads a file's bytes as they are
        stage_by_user(events, default_buckets(spark, cfg.spark, events.height), staging / "events")
        del events
        # executors read the staged files where they can: beside a remote output when there is one
        scratch_uri = scratch()
        uri = stack.enter_context(executor_copy(spark, staging / "events", scratch_uri))
        local = staging / "events" if scratch_uri is None else None  # executors read it where it is
        staged = StagedUsers(spark, uri, local)
        flagged, hist = staged.run(scan, *(f.schema for f in scan(example)))
        check_duplicates(flagged, cfg, source.interactions.file, log)
        # of the kept events, as on polars (a dropped duplicate's row is not named)
        kept = ~event_rows.is_in(flagged[ROW].implode())
        check_known_items(event_items.filter(kept), items, source.interactions.file, source.items and source.items.file,
                          event_rows.filter(kept))
        del event_items, event_rows, kept

        def run(step: Callable[[pl.DataFrame], pl.DataFrame]) -> pl.DataFrame:
            return staged.run(step, output_schema(step, example))[0]

        order = SparkOrder(run, ts_range, hist, flagged) if cfg.split == "global_time" else None
        plan = plan_split(cfg, ts_range[1], order)
        if (warning := plan.empty_splits_warning(cfg)) is not None:
            log(warning)

        def per_user(df: pl.DataFrame) -> pl.DataFrame:
            # A staged file keeps the input order, so the packed sort (ties in input order) may run, as
            # on the polars engine; checked, not assumed: rows in any other order sort on the input row
            in_order = df[ROW].is_sorted()
            ordered = order_and_flag(df.lazy(), cfg, bounds if in_order else None).filter(~pl.col("__dup")).drop(DUP_FLAGS)
            return user_features(ordered, plan, cfg).drop(ROW)

        frame = run(per_user)
    # The per-item step runs here, on the driver: it holds every row anyway
    # to write the one output file, and a second pass over files of whole
    # items would send every row to the workers and back again. The step
    # works on any set of whole items, so it could run on Spark unchanged,
    # should the output ever be written by the executors.
    frame = item_features(frame.lazy()).pipe(interactions_table).collect()
    # (user, time, item) is unique after deduplication: that order is the stable order. The files hold
    # ranges of users and come back in file order: the rows are in it already (checked, not assumed)
    stable = [S.USER_ID, S.TIMESTAMP, S.ITEM_ID]
    return frame if sorted_by(frame, stable) else frame.sort(stable)


def sorted_by(df: pl.DataFrame, keys: list[str]) -> bool:
    """Whether `df`'s rows are in ascending (lexicographic) order of `keys`:
    one pass, no sort."""
    ok = pl.col(keys[-1]) >= pl.col(keys[-1]).shift()
    for k in reversed(keys[:-1]):
        ok = (pl.col(k) > pl.col(k).shift()) | ((pl.col(k) == pl.col(k).shift()) & ok)
    return bool(df.select(ok.fill_null(True).all()).item())
