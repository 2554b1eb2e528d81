"""The steps of the feature build, shared by both engines.

The polars engine (`features.jobs.build`) runs each step once over all
events; the Spark engine (`features.spark.build`) runs the per-user steps on
one file of whole users at a time (a Spark task each) and computes the global
values the steps take as arguments (event count, time-split cut points) from
what those tasks return; its driver runs the per-item step. Each step is a function of its group's rows and those
arguments only, so both engines produce the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import polars as pl

from features import schemas as S
from features import transforms as T
from features.core.errors import DataError
from features.core.frames import collect
from features.jobs.config import FeaturesConfig
from features.validate import ROW

DUP_FLAGS = ("__dup", "__conflict")


# --- per user: stable order and duplicate flags ---------------------------------------


def order_and_flag(events: pl.LazyFrame, cfg: FeaturesConfig, bounds: dict | None = None) -> pl.LazyFrame:
    """Labels, the stable (user, time, item, input row) order, duplicate flags.

    `bounds` enables the packed one-key sort, which breaks ties by input
    order: pass it only for rows in input order (`ROW` ascending); rows in
    any other order sort on the input row."""
    return events.pipe(T.add_label, cfg.label_threshold).pipe(T.sort_events, bounds).pipe(T.flag_duplicates)


def check_duplicates(flagged: pl.DataFrame, cfg: FeaturesConfig, file: str, log: Callable[[str], None]) -> None:
    """Raise on conflicting duplicates (or on any, under on_duplicate: error);
    else warn. `flagged`: the rows with `__dup` set, in the stable order."""
    conflicts = flagged.filter(pl.col("__conflict"))
    if conflicts.height:
        rows = (conflicts[ROW] + 1).sort().head(5).to_list()
        raise DataError(
            f"{conflicts.height} duplicate (user_id, item_id, timestamp) rows disagree on rating/label "
            "(timestamps in whole seconds); fix the source (these cannot be dropped safely)",
            file=file,
            column="user_id,item_id,timestamp",
            rows=rows,
        )
    if flagged.height:
        rows = (flagged[ROW] + 1).sort().head(5).to_list()
        if cfg.on_duplicate == "error":
            raise DataError(
                f"{flagged.height} exact duplicate rows (set on_duplicate: drop to drop them)",
                file=file,
                column="user_id,item_id,timestamp",
                rows=rows,
            )
        log(f"warning: {file}: dropped {flagged.height} duplicate rows (same user_id, item_id, rating/label and "
            f"timestamp in whole seconds; first rows {rows})")


def check_known_items(event_items: pl.Series, items: pl.DataFrame | None, inter_file: str, items_file: str | None,
                      event_rows: pl.Series | None = None) -> None:
    """Every item id of the interactions must be in the items file (when given).
    event_rows: the events' 0-based input rows (`ROW`), when known, so the
    error names the first rows holding an unknown id."""
    if items is None:
        return
    # a membership test of every event (a small hash set: fast) rather than
    # `unique` of every event first (a hash table of all events)
    unknown = ~event_items.is_in(items[S.ITEM_ID].implode())
    if unknown.any():
        ids = sorted(event_items.filter(unknown).unique().to_list())
        rows = None if event_rows is None else (event_rows.filter(unknown).sort().head(5) + 1).to_list()
        raise DataError(
            f"{len(ids)} item ids of the interactions are missing from the items file "
            f"{items_file}: {ids[:10]}{' ...' if len(ids) > 10 else ''}: add them to the items file, or drop "
            "their events",
            file=inter_file,
            column=S.ITEM_ID,
            rows=rows,
        )


# --- global: the time split ------------------------------------------------------------


@dataclass(frozen=True)
class SplitPlan:
    """What the per-user step needs of the global split: the cut keys
    (timestamp, user, item) of a global time split and the last day each
    split's LT labels may use."""

    kind: str  # "global_time" | "leave_last_out"
    train_cut: tuple | None = None
    valid_cut: tuple | None = None
    limits: dict | None = None  # split -> last usable day (global_time)
    sizes: dict | None = None  # split -> events (global_time)

    def empty_splits_warning(self, cfg: FeaturesConfig) -> str | None:
        """A warning naming the global time split's empty splits (few events,
        small fractions: the shares round to 0), else None."""
        if not self.sizes:
            return None
        empty = [k for k, v in self.sizes.items() if v == 0]
        if not empty:
            return None
        n = sum(self.sizes.values())
        shares = f"valid_frac {cfg.valid_frac:g}, test_frac {cfg.test_frac:g}"
        return (f"warning: the global time split of {n:,} events ({shares}) leaves {' and '.join(empty)} empty "
                f"(train/valid/test: {self.sizes['train']:,}/{self.sizes['valid']:,}/{self.sizes['test']:,})")


class EventOrder(Protocol):
    """The global (timestamp, user, item) order of the deduplicated events, as
    far as the split needs it; each engine answers with its own data, both
    with `transforms.global_time_cuts`."""

    @property
    def n(self) -> int:
        """Number of events."""
        ...

    def cuts(self, positions: list[int]) -> list[tuple[int, int, int]]:
        """Keys of the rows at `positions` of the order."""
        ...


def plan_split(cfg: FeaturesConfig, ts_max: int, order: EventOrder) -> SplitPlan:
    """The split of the deduplicated events whose latest timestamp is `ts_max`."""
    if cfg.split == "leave_last_out":
        return SplitPlan("leave_last_out")
    offset = cfg.day_offset
    n = order.n
    last_full_day = int((ts_max + offset) // T.DAY_S) - 1
    n_train = round(n * (1 - cfg.valid_frac - cfg.test_frac))
    n_valid = round(n * cfg.valid_frac)
    positions = [p for p in (n_train, n_train + n_valid) if p < n]
    cuts = order.cuts(positions)
    # a cut is the key of the first row after the split; None: the split reaches the last row
    train_cut = cuts[0] if n_train < n else None
    valid_cut = cuts[-1] if n_train + n_valid < n else None

    def day_before(cut: tuple | None) -> int:
        # the cutoff instant lies inside its day: the day before is the last full one
        return last_full_day if cut is None else min(last_full_day, int((cut[0] + offset) // T.DAY_S) - 1)

    valid_limit = day_before(valid_cut)
    limits = {"train": min(day_before(train_cut), valid_limit), "valid": valid_limit, "test": last_full_day}
    sizes = {"train": min(n_train, n), "valid": max(0, min(n_valid, n - n_train)), "test": max(0, n - n_train - n_valid)}
    return SplitPlan("global_time", train_cut, valid_cut, limits, sizes)


class FrameOrder:
    """The polars engine's `EventOrder`: all events are in memory."""

    def __init__(self, events: pl.DataFrame) -> None:
        self.n = events.height
        self._cols = [events[c].to_numpy() for c in (S.TIMESTAMP, S.USER_ID, S.ITEM_ID)]

    def cuts(self, positions: list[int]) -> list[tuple[int, int, int]]:
        return T.global_time_cuts(*self._cols, positions)


# --- per user: split, histories, days, LT labels ------------------------------------------


def user_features(events: pl.LazyFrame, plan: SplitPlan, cfg: FeaturesConfig) -> pl.DataFrame:
    """Deduplicated events of whole users, in the stable order -> split,
    history offsets, day and LT labels (everything but the per-item columns)."""
    if plan.kind == "leave_last_out":
        split, lt_limit = events.pipe(T.add_split_leave_last_out), T.lt_limit_leave_last_out()
    else:
        split = events.pipe(T.add_split_global_time, plan.train_cut, plan.valid_cut)
        lt_limit = T.lt_limit_global_time(plan.limits)
    frame = collect(
        split.pipe(T.add_history_offsets, cfg.history_cap)
        .pipe(T.add_day, cfg.day_offset)
        .with_columns(lt_limit.alias("__lt_limit"))
    )
    return T.add_lt_labels(frame, frame["__lt_limit"].to_numpy()).drop("__lt_limit")


# --- per item ------------------------------------------------------------------------------


def item_features(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Rows of whole items -> item popularity and the cold-item flag."""
    return frame.pipe(T.add_item_popularity).pipe(T.add_cold_item)


def interactions_table(frame: pl.LazyFrame) -> pl.LazyFrame:
    """The output columns, in file order, with their dtypes."""
    return frame.select([pl.col(c).cast(t) for c, t in S.INTERACTIONS_SCHEMA.items() if c != S.EVENT_IDX])

