"""Request rows: what the ranker's pyfunc model scores, one row per candidate.

A request is one user at one time with its candidates: the rows that share
(user_id, timestamp). Columns (`REQUEST_SCHEMA`, plus the model's `mf_*`
match columns when it was trained with match features):

    user_id             Int64         the user (in the ranker's vocabulary)
    item_id             Int64         the candidate
    timestamp           Int64         request time (seconds)
    hist_len            Int64         the user's events strictly before it, at most the features' history_cap (as features.schemas.HIST_LEN)
    pos_hist_len        Int64         ... of them positive (as POS_HIST_LEN)
    item_pop            Int64         events on the candidate strictly before it, any user (as ITEM_POP)
    history             List(Int64)   item ids of the user's events strictly before it, oldest first
    history_timestamps  List(Int64)   their times (recent-activity features)
    mf_*                Float64       match features; null = missing

`requests_from_features` builds them from a features folder (and a match
file), so a batch job can score exactly what `recsys rank train` scored.

Shape legend: n request rows, E history events of all rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError
from features.reader import existing_match_file
from features.timeunits import MAX_TS_S
from recsys.data.dense import recent_activity

HISTORY = "history"
HISTORY_TS = "history_timestamps"
REQUEST_SCHEMA: dict[str, pl.DataType] = {
    S.USER_ID: pl.Int64,
    S.ITEM_ID: pl.Int64,
    S.TIMESTAMP: pl.Int64,
    S.HIST_LEN: pl.Int64,
    S.POS_HIST_LEN: pl.Int64,
    S.ITEM_POP: pl.Int64,
    HISTORY: pl.List(pl.Int64),
    HISTORY_TS: pl.List(pl.Int64),
}


def requests_from_features(
    features_dir: str | Path, split: str = "test", match: str | Path | None = None,
    match_columns: tuple[str, ...] = (), limit: int | None = None,
) -> pl.DataFrame:
    """Request rows of every impression of `split` (the first `limit` of them
    when given), in interactions.parquet order: the history is the user's
    events strictly before the impression (`hist_end` of them), exactly what
    the ranker saw in training. Each row carries its whole history: with long
    histories, use `limit` or score in slices.
    `match`: the match-features location; `match_columns` (empty: every mf_*)."""
    if split not in S.SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(S.SPLITS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit {limit}: a number of rows >= 0 (or None for all)")
    root = Path(features_dir)
    inter = pl.read_parquet(root / S.FILES["interactions"]).with_row_index("_row")
    inter = inter.filter(pl.col(S.SPLIT) == split)
    if limit is not None:
        inter = inter.head(limit)
    seqs = pl.read_parquet(root / S.FILES["sequences"], columns=[S.USER_ID, S.ITEM_IDS, S.TIMESTAMPS])
    out = inter.join(seqs, on=S.USER_ID, how="left", maintain_order="left").select(
        *(pl.col(c).cast(t) for c, t in REQUEST_SCHEMA.items() if c not in (HISTORY, HISTORY_TS)),
        pl.col(S.ITEM_IDS).list.head(pl.col(S.HIST_END)).cast(pl.List(pl.Int64)).alias(HISTORY),
        pl.col(S.TIMESTAMPS).list.head(pl.col(S.HIST_END)).cast(pl.List(pl.Int64)).alias(HISTORY_TS),
        "_row",
    )
    if match is not None:
        mf = pl.read_parquet(existing_match_file(match))
        cols = list(match_columns) or [c for c in mf.columns if c.startswith(S.MATCH_PREFIX)]
        mf = mf.select(*S.MATCH_KEYS, *(pl.col(c).cast(pl.Float64) for c in cols)).unique(S.MATCH_KEYS, keep="first")
        out = out.join(mf, on=list(S.MATCH_KEYS), how="left", maintain_order="left")
    return out.sort("_row").drop("_row")


def activity_raw(timestamps: np.ndarray, history_ts: list[np.ndarray]) -> np.ndarray:
    """`recsys.data.dense.recent_activity` of each request, unstandardised (NaN:
    no history). timestamps (n,), history_ts: n arrays of strictly earlier
    event times, each in time order -> (n, 3)."""
    n = len(timestamps)
    lengths = np.fromiter((len(h) for h in history_ts), dtype=np.int64, count=n)
    flat = np.concatenate(history_ts).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64)  # (E,)
    off = np.concatenate([[0], np.cumsum(lengths)])  # (n + 1,)
    return recent_activity(np.asarray(timestamps, dtype=np.int64), np.arange(n), off, flat, off[1:], f"request column {HISTORY_TS}")


def counts_raw(frame: pl.DataFrame) -> np.ndarray:
    """log1p(hist_len), log1p(item_pop), log1p(pos_hist_len): the raw COUNT_FEATURES, (n, 3)."""
    return frame.select(
        pl.col(S.HIST_LEN).cast(pl.Float64).log1p(),
        pl.col(S.ITEM_POP).cast(pl.Float64).log1p(),
        pl.col(S.POS_HIST_LEN).cast(pl.Float64).log1p(),
    ).to_numpy()


def check_requests(frame: pl.DataFrame, features_cap: int | None = None) -> None:
    """Request rows the ranker can score as `recsys rank train` would have:
    a DataError naming the column and the rows (0-based positions) of the
    first problem. Each of these gave a score before 2026-11-30, silently
    wrong or NaN:
      - a null id, time or count, or a negative count (log1p(-1) is NaN);
      - a float id, time or count that is NaN, inf or not whole (1.5 was
        read as item 1; a NaN count gave a NaN score);
      - pos_hist_len above hist_len;
      - `history` and `history_timestamps` of different lengths, a history
        out of time order, a time past 2200 read as seconds (milliseconds
        shifted the activity windows silently), an event not strictly before
        the request's time, or a hist_len other than the
        history's length capped at `features_cap` (the features build's
        `history_cap`, as features.schemas.HIST_LEN is; a shorter one
        silently cut the history to its last hist_len events until
        2026-12-01);
      - rows of one request (same user_id and timestamp) with different
        histories or counts: the request is scored once, so all but the first
        row would have been scored with another row's history."""
    def numbers(col: str, dtype: pl.DataType) -> bool:
        """DataError unless `dtype` holds numbers; True when they may be fractional (float, decimal: MLflow's
        schema refuses them, a direct caller may pass them, and 12.9 was read as item 12, True as item 1)."""
        if dtype == pl.Null:  # lists that are all empty (a first request from pandas): no element to check
            return False
        if not (dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal)):
            raise DataError(f"request rows: type {dtype}: ids, times and counts are integers", column=col)
        return not dtype.is_integer()

    fractional = {col: numbers(col, frame.schema[col])
                  for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.HIST_LEN, S.POS_HIST_LEN, S.ITEM_POP)}
    for col in (HISTORY, HISTORY_TS):  # the lists' elements: ids and times as the columns above
        if not isinstance(frame.schema[col], pl.List):
            raise DataError(f"request rows: type {frame.schema[col]}: a list of integers per row", column=col)
        fractional[col] = numbers(col, frame.schema[col].inner)
    f = frame.with_row_index("_pos").with_columns(
        pl.col(HISTORY).list.len().fill_null(0).alias("_h"),
        pl.col(HISTORY_TS).list.len().fill_null(0).alias("_ht"),
        pl.col(HISTORY_TS).list.max().alias("_last"),
    )

    def refuse(cond: pl.Expr, column: str, message: str) -> None:
        bad = f.filter(cond.fill_null(False))["_pos"]
        if bad.len():
            raise DataError(f"request rows: {message} ({bad.len()} row{'s' if bad.len() > 1 else ''}; rows are 0-based "
                            "positions)", column=column, rows=bad.head(5).to_list())

    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.HIST_LEN, S.POS_HIST_LEN, S.ITEM_POP):
        refuse(pl.col(col).is_null(), col, "null value")
        if fractional[col]:
            v = pl.col(col).cast(pl.Float64)
            refuse(~v.is_finite() | (v != v.floor()) | (v.abs() >= 2.0**63), col,
                   "not a whole number in the int64 range (ids, times and counts are integers; NaN and inf are no values)")
    for col in (HISTORY, HISTORY_TS):
        refuse(pl.col(col).list.eval(pl.element().is_null()).list.any(), col, "a null element")
        if fractional[col]:
            e = pl.element().cast(pl.Float64)
            refuse(~pl.col(col).list.eval(e.is_finite() & (e == e.floor()) & (e.abs() < 2.0**63)).list.all(), col,
                   "an element that is not a whole number in the int64 range (NaN and inf are no values)")
    for col in (S.HIST_LEN, S.POS_HIST_LEN, S.ITEM_POP):
        refuse(pl.col(col) < 0, col, "negative count")
    refuse(pl.col(S.POS_HIST_LEN) > pl.col(S.HIST_LEN), S.POS_HIST_LEN, "more positive events before the request than events")
    refuse(pl.col("_h") != pl.col("_ht"), HISTORY_TS, f"{HISTORY} and {HISTORY_TS} have different lengths")
    for col, last in ((S.TIMESTAMP, pl.col(S.TIMESTAMP)), (HISTORY_TS, pl.col("_last"))):
        refuse(last > MAX_TS_S, col, "a time after the year 2200 read as seconds: request times are seconds since "
                                     "1970, as in the features (milliseconds or microseconds? divide by 1000 or 10^6)")
    refuse(pl.col(HISTORY_TS).list.diff().list.min() < 0, HISTORY_TS,
           f"{HISTORY_TS} is not in time order (the history lists the user's events oldest first)")
    refuse(pl.col("_last") >= pl.col(S.TIMESTAMP), HISTORY_TS, "a history event is not strictly before the request's timestamp")
    if features_cap is None:
        refuse(pl.col(S.HIST_LEN) != pl.col("_h"), S.HIST_LEN,
               f"hist_len disagrees with {HISTORY} (it counts the events before the request: the history's length)")
    else:
        refuse(pl.col(S.HIST_LEN) != pl.min_horizontal(pl.col("_h"), pl.lit(features_cap)), S.HIST_LEN,
               f"hist_len disagrees with {HISTORY} (it counts the events before the request, capped as in the "
               f"features build: min(length of {HISTORY}, features.history_cap {features_cap}); pass the whole "
               "history: the recent-activity features count every event)")
    keys = [S.USER_ID, S.TIMESTAMP]
    same = [HISTORY, HISTORY_TS, S.HIST_LEN, S.POS_HIST_LEN]
    split = pl.any_horizontal([pl.col(c).n_unique().over(keys) > 1 for c in same])
    refuse(split, HISTORY, "rows of one request (same user_id and timestamp) disagree on the history or its counts: "
                           "one request has one history")


def match_raw(frame: pl.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """The match columns as float64 (n, M), non-finite -> NaN (missing)."""
    if not columns:
        return np.zeros((frame.height, 0))
    values = frame.select(pl.col(c).cast(pl.Float64) for c in columns).to_numpy()
    return np.where(np.isfinite(values), values, np.nan)


__all__ = ["HISTORY", "HISTORY_TS", "REQUEST_SCHEMA", "requests_from_features", "activity_raw", "check_requests", "counts_raw",
           "match_raw"]
