"""The feature build on Spark: the polars steps of `features.jobs.steps`, run
on partitions that hold whole users.

    validated events (driver, once) -> a staged parquet file Spark reads
      -> repartition by user_id, kept for both passes (one shuffle)
      -> [users]  the rows of keys seen more than once (few) -> the driver:
                  order_and_flag, check_duplicates, as the polars engine does
      -> Spark    distinct item ids -> check_known_items; a histogram of
                  timestamps -> event count and the split cut points
                  (`global_time_cuts` on the one bin holding each cut)
      -> [users]  order_and_flag, drop duplicates, user_features
                  (split, histories, days, LT labels)
      -> driver   item_features (item popularity, cold items) on the
                  rows the executors wrote as parquet parts, the stable
                  order, the same writer as the polars engine

`[users]` is `mapInArrow` over a partition of whole users (see
`features.spark.arrow.partition_step`): the same function the polars engine
calls on all users at once. The driver reads the parts back to write the same
single files as the polars engine (same bytes, same fingerprints).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import polars as pl

from features import schemas as S
from features import transforms as T
from features.core.manifest import write_parquet
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
from features.spark.arrow import partition_step
from features.spark.hadoop import executor_copy, executor_output
from features.spark.session import default_buckets, spark_session
from features.validate import ROW

CUT_BINS = 4096  # timestamp histogram bins when locating a split cut
KEYS = [S.TIMESTAMP, S.USER_ID, S.ITEM_ID]


class SparkOrder:
    """The Spark engine's `EventOrder` over the raw events less the dropped
    duplicates (few, known to the driver): a histogram of timestamps
    (CUT_BINS bins, one Spark aggregation, which also gives the count)
    locates the bin holding each position; that bin's rows alone go to the
    driver, where `global_time_cuts` picks the key."""

    def __init__(self, df, ts_range: tuple[int, int], dropped: pl.DataFrame) -> None:
        from pyspark.sql import functions as F

        lo, hi = ts_range
        self._df, self._dropped = df, dropped[ROW]
        self._bin = F.expr(f"({S.TIMESTAMP} - {lo}) * {CUT_BINS} div {hi - lo + 1}")
        # the same bins for the dropped duplicates (on the driver), so the counts are of kept events
        dropped_bin = ((pl.col(S.TIMESTAMP) - lo) * CUT_BINS // (hi - lo + 1)).alias("b")
        spark_hist = pl.from_arrow(df.groupBy(self._bin.alias("b")).count().toArrow())
        less = dropped.group_by(dropped_bin).agg(pl.len().cast(pl.Int64).alias("less"))
        hist = spark_hist.join(less, on="b", how="left").with_columns(pl.col("count") - pl.col("less").fill_null(0))
        hist = hist.sort("b")
        self._bins, self._ends = hist["b"].to_numpy(), np.cumsum(hist["count"].to_numpy())
        self.n = int(self._ends[-1]) if len(self._ends) else 0

    def cuts(self, positions: list[int]) -> list[tuple[int, int, int]]:
        out = []
        for k in positions:
            j = int(np.searchsorted(self._ends, k, side="right"))
            before = int(self._ends[j - 1]) if j else 0
            rows = self._df.filter(self._bin == int(self._bins[j])).select(ROW, *KEYS)
            b = pl.from_arrow(rows.toArrow()).filter(~pl.col(ROW).is_in(self._dropped.implode()))
            out += T.global_time_cuts(*(b[c].to_numpy() for c in KEYS), [k - before])
        return out


def repeated_keys(events: pl.DataFrame) -> pl.DataFrame:
    """The rows whose (timestamp, user, item) key occurs more than once in `events`."""
    return events.filter(pl.len().over(KEYS) > 1)


def interactions_on_spark(
    inter: pl.LazyFrame, bounds: dict, items: pl.DataFrame | None, source: RawSource, cfg: FeaturesConfig,
    log: Callable[[str], None], staging: Path,
) -> pl.DataFrame:
    """The interactions table, computed on Spark (see the module docstring).
    `staging`: a fresh folder the Spark executors can read (removed by the caller)."""
    events = inter.collect().with_columns(pl.col(ROW).cast(pl.Int64))  # Spark has no unsigned ints
    example = events.head(0)  # zero rows: the steps' output schemas are found on it
    staging.mkdir(parents=True, exist_ok=True)
    write_parquet(events, staging / "events.parquet")
    n_rows = events.height
    del events
    from pyspark import StorageLevel

    with spark_session(cfg.spark, "recsys features build") as spark, ExitStack() as stack:
        n = default_buckets(spark, cfg.spark, n_rows)
        # executors read the staged file where they can: beside a remote output when there is one
        raw = spark.read.parquet(stack.enter_context(executor_copy(spark, staging / "events.parquet", scratch())))
        # One shuffle: the events, partitioned by user and kept (memory, then
        # disk), feed both passes over whole users below. A duplicate key
        # includes the user, so its rows share a partition: the rows of keys
        # seen more than once (few) are found there and flagged by the same
        # order_and_flag, on the driver. (A groupBy over the three keys, a
        # semi-join back and a second shuffle for the per-user pass took the
        # 10M-event bench build 39.7 s against 30.5 s this way.)
        users = raw.repartition(n, S.USER_ID).persist(StorageLevel.MEMORY_AND_DISK)
        dup_rows = pl.from_arrow(partition_step(users, repeated_keys, example).toArrow())
        flagged = order_and_flag(dup_rows.lazy(), cfg).filter(pl.col("__dup")).collect()
        check_duplicates(flagged, cfg, source.interactions.file, log)
        if items is not None:
            seen = pl.from_arrow(raw.select(S.ITEM_ID).distinct().toArrow())[S.ITEM_ID]
            if not seen.is_in(items[S.ITEM_ID].implode()).all():
                # an error: the staged events (on this machine) hold every event, so the check on them
                # raises, naming the input rows as the polars engine does
                staged = pl.read_parquet(staging / "events.parquet", columns=[S.ITEM_ID, ROW])
                check_known_items(staged[S.ITEM_ID], items, source.interactions.file,
                                  source.items and source.items.file, staged[ROW])
        order = SparkOrder(raw, bounds[S.TIMESTAMP], flagged) if cfg.split == "global_time" else None
        plan = plan_split(cfg, bounds[S.TIMESTAMP][1], order)
        if (warning := plan.empty_splits_warning(cfg)) is not None:
            log(warning)

        def per_user(df: pl.DataFrame) -> pl.DataFrame:
            # the rows arrive in any order: sorted on the input row to break ties (never the packed sort)
            ordered = order_and_flag(df.lazy(), cfg).filter(~pl.col("__dup")).drop(DUP_FLAGS)
            return user_features(ordered, plan, cfg).drop(ROW)

        # the executors write the per-user rows as parquet parts, which the
        # driver reads: a collect (toArrow) would hold every row in the JVM
        # and again in Python (52M events did not fit in 24 GiB that way)
        uri, fetch = stack.enter_context(executor_output(spark, staging / "per_user", scratch()))
        partition_step(users, per_user, example).write.parquet(uri)
        users.unpersist()
        parts = fetch() / "part-*.parquet"  # local files (under staging) from here on
    # The per-item step runs here, on the driver: it holds every row anyway
    # to write the one output file, and a second shuffle (by item) and Arrow
    # round trip of every row cost more than the step. The step works on any
    # set of whole items: `partition_step` over `repartition(n, item_id)` runs
    # it on Spark unchanged, should the output ever be written by the
    # executors instead.
    # (user, time, item) is unique after deduplication: the sort is the stable order
    frame = pl.scan_parquet(parts)
    return item_features(frame).pipe(interactions_table).sort([S.USER_ID, S.TIMESTAMP, S.ITEM_ID]).collect()
