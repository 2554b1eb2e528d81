"""Pure LazyFrame -> LazyFrame transforms of the feature build.

Each function takes and returns a LazyFrame (or plain values) and touches no
disk; `features.jobs` chains them. The frames they expect are sorted by
(user_id, timestamp, item_id) unless a docstring says otherwise: that stable
order breaks the many timestamp ties of real logs deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from features import schemas as S
from features.validate import ROW

DAY_S = 86_400
LT_HORIZON_DAYS = 7

_new_user = pl.col(S.USER_ID) != pl.col(S.USER_ID).shift(1)
_row = pl.int_range(pl.len(), dtype=pl.Int64)


def _first_in_group(value: pl.Expr, starts: pl.Expr) -> pl.Expr:
    """Value at the first row of the run that each row belongs to."""
    return pl.when(starts).then(value).forward_fill()


def add_label(lf: pl.LazyFrame, threshold: float) -> pl.LazyFrame:
    """label = the given label where present, else rating >= threshold."""
    from_rating = (pl.col(S.RATING) >= threshold).cast(pl.Int8)
    return lf.with_columns(pl.coalesce(pl.col(S.LABEL), from_rating).cast(pl.Int8).alias(S.LABEL))


def sort_events(lf: pl.LazyFrame, bounds: dict[str, tuple[int, int]] | None = None) -> pl.LazyFrame:
    """Stable order: user, then time, then item, then input row.

    With `bounds` ({column: (min, max)}) whose ranges multiply to less than
    2^62, the three keys are packed into one Int64 and sorted stably in one
    pass, about 1.7x faster than a three-key sort; otherwise a multi-key sort.
    """
    keys = [S.USER_ID, S.TIMESTAMP, S.ITEM_ID]
    if bounds is not None:
        spans = [bounds[k][1] - bounds[k][0] + 1 for k in keys]
        if spans[0] * spans[1] * spans[2] < 2**62:
            packed = pl.lit(0, pl.Int64)
            for k, span in zip(keys, spans):
                packed = packed * span + (pl.col(k) - bounds[k][0])
            return lf.sort(packed, maintain_order=True)
    return lf.sort(keys + [ROW])


def flag_duplicates(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Mark rows repeating an earlier (user, item, timestamp).

    `__dup`: same key as the previous row; `__conflict`: a duplicate whose
    rating or label differs from the first occurrence (cannot be dropped safely).
    """
    same = (
        (pl.col(S.USER_ID) == pl.col(S.USER_ID).shift(1))
        & (pl.col(S.TIMESTAMP) == pl.col(S.TIMESTAMP).shift(1))
        & (pl.col(S.ITEM_ID) == pl.col(S.ITEM_ID).shift(1))
    ).fill_null(False)
    differs = pl.lit(False)
    for col in (S.RATING, S.LABEL):
        prev = pl.col(col).shift(1)
        differs = differs | (pl.col(col).ne_missing(prev))
    return lf.with_columns(same.alias("__dup"), (same & differs).alias("__conflict"))


def global_time_cuts(
    timestamp: np.ndarray, user: np.ndarray, item: np.ndarray, positions: list[int]
) -> list[tuple[int, int, int]]:
    """Keys (timestamp, user, item) of the rows at `positions` of the global
    (timestamp, user, item) order, found without a full sort: one O(n)
    selection on the timestamp, then a small sort of the rows tied with it."""
    if not positions:
        return []
    part = np.partition(timestamp, positions)
    out = []
    for k in positions:
        t_k = int(part[k])
        below = int(np.count_nonzero(timestamp < t_k))
        tied = np.flatnonzero(timestamp == t_k)
        order = np.lexsort((item[tied], user[tied]))
        j = tied[order[k - below]]
        out.append((t_k, int(user[j]), int(item[j])))
    return out


def _key_before(cut: tuple[int, int, int]) -> pl.Expr:
    t, u, i = cut
    ts, us, it = pl.col(S.TIMESTAMP), pl.col(S.USER_ID), pl.col(S.ITEM_ID)
    return (ts < t) | ((ts == t) & ((us < u) | ((us == u) & (it < i))))


def add_split_global_time(lf: pl.LazyFrame, train_cut: tuple | None, valid_cut: tuple | None) -> pl.LazyFrame:
    """train: rows before `train_cut` in global (time, user, item) order; valid:
    before `valid_cut`; test: the rest. A cut of None is past the last row
    (every row is before it): `plan_split`'s cut when a split reaches the end."""
    before_train = _key_before(train_cut) if train_cut is not None else pl.lit(True)
    before_valid = _key_before(valid_cut) if valid_cut is not None else pl.lit(True)
    split = pl.when(before_train).then(pl.lit("train")).when(before_valid).then(pl.lit("valid")).otherwise(pl.lit("test"))
    return lf.with_columns(split.alias(S.SPLIT))


def add_split_leave_last_out(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Per user: last event -> test, the one before -> valid, the rest -> train."""
    from_end = pl.len().over(S.USER_ID) - 1 - _row.over(S.USER_ID)
    split = pl.when(from_end == 0).then(pl.lit("test")).when(from_end == 1).then(pl.lit("valid")).otherwise(pl.lit("train"))
    return lf.with_columns(split.alias(S.SPLIT))


def add_history_offsets(lf: pl.LazyFrame, history_cap: int) -> pl.LazyFrame:
    """hist_end / pos_hist_end: how many of the user's events (positive events)
    are strictly earlier than this one. Ties in time share one value, so events
    of the same second never see each other (no leakage inside a batch).

    Computed in Int32, the dtype of the outputs (half the memory traffic of
    Int64): a frame of 2^31 rows or more fails in `int_range`, never wraps."""
    new_user = _new_user.fill_null(True)
    new_group = (new_user | (pl.col(S.TIMESTAMP) != pl.col(S.TIMESTAMP).shift(1))).fill_null(True)
    row, label = pl.int_range(pl.len(), dtype=pl.Int32), pl.col(S.LABEL).cast(pl.Int32)
    pos_before = label.cum_sum() - label
    hist_end = _first_in_group(row, new_group) - _first_in_group(row, new_user)
    pos_end = _first_in_group(pos_before, new_group) - _first_in_group(pos_before, new_user)
    return lf.with_columns(
        hist_end.alias(S.HIST_END),
        pos_end.alias(S.POS_HIST_END),
    ).with_columns(
        pl.col(S.HIST_END).clip(upper_bound=history_cap).alias(S.HIST_LEN),
        pl.col(S.POS_HIST_END).clip(upper_bound=history_cap).alias(S.POS_HIST_LEN),
    )


def add_item_popularity(lf: pl.LazyFrame) -> pl.LazyFrame:
    """item_pop: events on the item (any user) strictly earlier in time."""
    pop = pl.col(S.TIMESTAMP).rank("min").over(S.ITEM_ID) - 1
    return lf.with_columns(pop.cast(pl.Int32).alias(S.ITEM_POP))


def add_day(lf: pl.LazyFrame, day_offset_s: int) -> pl.LazyFrame:
    """Calendar day of each event: floor((timestamp + offset) / 86400)."""
    return lf.with_columns(((pl.col(S.TIMESTAMP) + day_offset_s) // DAY_S).cast(pl.Int32).alias(S.DAY))


def add_lt_labels(df: pl.DataFrame, last_day: int | np.ndarray) -> pl.DataFrame:
    """Attach LT-proxy labels censored at `last_day`: the last fully observed
    day the label may use (one value, or one per row: a train row may not look
    past the train cutoff, a valid row past the valid cutoff). lt_observed is
    False where the 7-day window runs past it (the label would be censored,
    not negative); such rows count only the days up to `last_day`.

    Eager and in numpy on purpose: the activity days are the distinct (user,
    day) runs (the frame is sorted by user and time), and each row looks at
    the next 7 runs of its own run, which avoids a hash join of every event;
    the run arrays are small and numpy's shifted views copy nothing."""
    user = df[S.USER_ID].to_numpy()  # (n,)
    day = df[S.DAY].to_numpy()  # (n,)
    limit = np.asarray(last_day, dtype=np.int64)  # () or (n,)
    n = len(user)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (user[1:] != user[:-1]) | (day[1:] != day[:-1])
    run_start = np.flatnonzero(new_run)  # (runs,) first row of each activity run (user, day)
    run_user, run_day = user[run_start], day[run_start].astype(np.int64)  # (runs,)
    # a query is a run of rows sharing (user, day, limit): labels are computed
    # once per query, then repeated over its rows (no per-row gather)
    if limit.ndim:
        new_run[1:] |= limit[1:] != limit[:-1]
        q_start = np.flatnonzero(new_run)  # (queries,)
        q_limit = limit[q_start]
    else:
        q_start, q_limit = run_start, limit
    q_run = np.searchsorted(run_start, q_start, side="right") - 1  # (queries,) the run of each query
    q_day = run_day[q_run]
    horizon = np.minimum(q_day + LT_HORIZON_DAYS, q_limit)  # (queries,)
    n_runs = len(run_user)
    active = np.zeros(len(q_run), dtype=np.int8)
    returned = np.zeros(len(q_run), dtype=np.int8)
    for k in range(1, LT_HORIZON_DAYS + 1):
        nxt = q_run + k
        ok = nxt < n_runs
        j = np.minimum(nxt, n_runs - 1)
        hit = ok & (run_user[j] == run_user[q_run]) & (run_day[j] <= horizon)
        active += hit
        if k == 1:
            returned = (hit & (run_day[j] == q_day + 1)).astype(np.int8)
    rows = np.diff(q_start, append=n)  # (queries,) rows of each query
    return df.with_columns(
        pl.Series(S.RETURNED_1D, np.repeat(returned, rows)),
        pl.Series(S.ACTIVE_DAYS_7, np.repeat(active, rows)),
        pl.Series(S.LT_OBSERVED, np.repeat(q_day + LT_HORIZON_DAYS <= q_limit, rows)),
    )


def lt_limit_global_time(limits: dict[str, int]) -> pl.Expr:
    """Last day each row's LT label may use under a global time split: `limits`
    maps split -> the last day fully before that split's cutoff (test: the
    last full day of the data). A chain of comparisons, not `replace_strict`:
    a string lookup per row costs several times more."""
    split, (first, *rest) = pl.col(S.SPLIT), limits.items()
    expr = pl.when(split == first[0]).then(pl.lit(first[1], pl.Int64))
    for name, day in rest:
        expr = expr.when(split == name).then(pl.lit(day, pl.Int64))
    return expr


def lt_limit_leave_last_out() -> pl.Expr:
    """Last day each row's LT label may use under leave-last-out: a train row
    stops the day before its user's held-out events. Valid and test rows are
    chosen because they are the user's last events, so what follows them is
    decided by the split, not observed: their labels are never observed."""
    first_held_out = pl.col(S.DAY).filter(pl.col(S.SPLIT) != "train").min().over(S.USER_ID)
    return pl.when(pl.col(S.SPLIT) == "train").then(first_held_out - 1).otherwise(pl.col(S.DAY)).cast(pl.Int64)


def next_day_return_rate(user: np.ndarray, timestamp: np.ndarray, day_offset_s: int) -> float | None:
    """Share of events whose user has an event on the next calendar day (days
    start at local midnight, local time = UTC + `day_offset_s`), over events whose next day is
    fully in the data; None when there are none. Input sorted by user, time."""
    day = (timestamp + day_offset_s) // DAY_S
    if len(day) == 0:
        return None
    full = int(day.max()) - 1  # the last day is cut by the end of the data
    df = pl.DataFrame({S.USER_ID: user, S.DAY: day})
    out = add_lt_labels(df, full)
    returned = out[S.RETURNED_1D].to_numpy()[day + 1 <= full]
    return float(returned.mean()) if len(returned) else None


def add_cold_item(lf: pl.LazyFrame) -> pl.LazyFrame:
    """cold_item: the item has no event in the train split (its first event is
    after the train cutoff). A membership test against the train rows' items,
    not an `over(item_id)` window: no grouping of every row."""
    item = pl.col(S.ITEM_ID)
    in_train = item.is_in(item.filter(pl.col(S.SPLIT) == "train").implode())
    return lf.with_columns((~in_train).alias(S.COLD_ITEM))


def to_sequences(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per user: the whole event sequence and its positive subsequence."""
    cols = lf.collect_schema()
    schema = {S.USER_ID: cols[S.USER_ID]} | {out: pl.List(cols[col]) for out, col in _SEQUENCES.items()}
    return lf.select(S.USER_ID, *dict.fromkeys(_SEQUENCES.values())).map_batches(_sequences, schema=schema)


_SEQUENCES = {  # list column of sequences.parquet -> the event column it holds
    S.ITEM_IDS: S.ITEM_ID, S.TIMESTAMPS: S.TIMESTAMP, S.LABELS: S.LABEL,
    S.POS_ITEM_IDS: S.ITEM_ID, S.POS_TIMESTAMPS: S.TIMESTAMP,
}
_POSITIVES = (S.POS_ITEM_IDS, S.POS_TIMESTAMPS)  # over the events with label 1 only


def _sequences(df: pl.DataFrame) -> pl.DataFrame:
    """`to_sequences` of a frame. When the frame is sorted by user (every
    frame of the build is), each list column is its event column cut at the
    user boundaries: offsets over the same values, no grouping, about a third
    of the cost of the `group_by` that handles any other order."""
    pos = (pl.col(S.LABEL) == 1).fill_null(False)
    if not df[S.USER_ID].is_sorted():
        return df.group_by(S.USER_ID, maintain_order=True).agg(
            (pl.col(col).filter(pos) if out in _POSITIVES else pl.col(col)).alias(out) for out, col in _SEQUENCES.items()
        )
    import pyarrow as pa

    user, n = df[S.USER_ID].to_numpy(), df.height
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    starts = np.flatnonzero(new_user)  # (users,) first row of each user
    offsets = np.append(starts, n).astype(np.int64)  # (users + 1,)
    pos_before = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(df.select(pos).to_series().to_numpy(), out=pos_before[1:])
    positives = df.filter(pos)
    lists = [
        pl.Series(out, pa.LargeListArray.from_arrays(
            pa.array(pos_before[offsets] if out in _POSITIVES else offsets),
            (positives if out in _POSITIVES else df)[col].to_arrow(),
        ))
        for out, col in _SEQUENCES.items()
    ]
    return pl.DataFrame([df[S.USER_ID].gather(starts), *lists])


def item_stats(interactions: pl.LazyFrame) -> pl.LazyFrame:
    """Per item seen in the interactions: first timestamp, train events, cold flag."""
    return interactions.group_by(S.ITEM_ID).agg(
        pl.col(S.TIMESTAMP).min().alias(S.FIRST_TS),
        (pl.col(S.SPLIT) == "train").sum().cast(pl.Int32).alias(S.N_TRAIN),
    ).with_columns((pl.col(S.N_TRAIN) == 0).alias(S.COLD_ITEM))


_NOT_FIELDS = (S.ITEM_ID, S.TEXT, S.TITLE, S.IMAGE_PATH)  # item columns no field-typing step retypes


def _string_fields(items: pl.DataFrame) -> list[str]:
    """The String item columns a field-typing step may retype: never the
    item id, the text, the title or the image path."""
    return [name for name, dtype in items.schema.items() if dtype == pl.String and name not in _NOT_FIELDS]


def _as_field_dtype(dtype: pl.DataType) -> pl.DataType | None:
    """The content-field type a column of `dtype` is read as (itself when the
    encoders read it; None when no field type fits)."""
    if isinstance(dtype, pl.Decimal):
        return pl.Float64
    if dtype in (pl.String, pl.List(pl.String)) or dtype.is_numeric():
        return dtype
    if isinstance(dtype, (pl.Categorical, pl.Enum)) or dtype in (pl.Boolean, pl.Null):
        return pl.String  # a category per value ("true"/"false" for a flag; an all-null column: only the null token)
    if isinstance(dtype, pl.List) and (dtype.inner.is_integer() or _as_field_dtype(dtype.inner) == pl.String):
        return pl.List(pl.String)  # tag ids or categories: a multi-valued field
    return None


def numeric_categories(items: pl.DataFrame, categories: Sequence[str]) -> tuple[pl.DataFrame, list[str]]:
    """Items whose `categories` columns (declared categorical by their
    writer, e.g. a pandas `category` of zip codes) that arrived as numbers
    are cast to String: one category per value, where `field_dtypes` would
    keep a number column a numeric field. Returns the items and the columns
    cast. The id, text, title and image path are never retyped."""
    cast = [n for n in categories if n in items.columns and n not in _NOT_FIELDS and n not in S.ITEMS_COMPUTED
            and items.schema[n].is_numeric()]
    return (items.with_columns(pl.col(n).cast(pl.String) for n in cast) if cast else items), cast


def field_dtypes(items: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, str], dict[str, pl.DataType]]:
    """Items whose content fields all have a type the encoders read (String:
    categorical, List(String): multi-valued, numeric).

    Parquet columns arrive typed: a pandas `category` or a dictionary column
    is Categorical, a flag Boolean, a price Decimal, tag ids a list of
    integers. `item_field_kinds` knows none of these, so each would be left
    out of the model without a word: they are cast (Categorical, Enum and
    Boolean to String, Decimal to Float64, lists of integers or categories to
    List(String)). Returns the items, {column: "from -> to"} for the casts and
    {column: dtype} for the columns no field type fits (dates, structs...),
    which the caller refuses."""
    casts, unfit = {}, {}
    for name, dtype in items.schema.items():
        if name in _NOT_FIELDS or name in S.ITEMS_COMPUTED:
            continue
        to = _as_field_dtype(dtype)
        if to is None:
            unfit[name] = dtype
        elif to != dtype:
            casts[name] = to
    out = items.with_columns(pl.col(n).cast(t) for n, t in casts.items()) if casts else items
    return out, {n: f"{items.schema[n]} -> {t}" for n, t in casts.items()}, unfit


def non_finite_numbers(items: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int], dict[str, list[int]]]:
    """Float item fields with NaN read as missing (null, which the encoders
    give a null flag), and the positions of infinite values, which no
    missing-value convention writes. Returns the items, {column: NaNs made
    null} and {column: 0-based rows holding +-inf (up to 5)}."""
    nans, infs, cols = {}, {}, []
    for name, dtype in items.schema.items():
        if name in _NOT_FIELDS or not dtype.is_float():
            continue
        x = items[name]
        if (n := int(x.is_nan().sum())) > 0:
            nans[name] = n
            cols.append(pl.col(name).fill_nan(None))
        if x.is_infinite().any():
            infs[name] = x.is_infinite().arg_true().head(5).to_list()
    return (items.with_columns(cols) if cols else items), nans, infs


def split_multi_valued(items: pl.DataFrame, sep: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """Items with every String field whose values hold `sep` as List(String).

    A CSV cannot hold lists, so a multi-valued field (MovieLens genres
    "Action|Comedy") arrives as one string per row: as a categorical field
    each distinct combination would be its own category, unrelated to the
    others. Such a column becomes a list of its stripped, non-empty tokens
    (a multi-valued field); a null stays null. The item id, the text and the
    title are never split. Returns the items and {column: rows holding sep}.
    """
    found: dict[str, int] = {}
    for name in _string_fields(items):
        n = int(items[name].str.contains(sep, literal=True).sum())
        if n:
            found[name] = n
    if not found:
        return items, found
    tokens = pl.element().str.strip_chars()
    return items.with_columns(
        pl.col(name).str.split(sep, inclusive=False).list.eval(tokens.filter(tokens != "")) for name in found
    ), found


MISSING_TEXT = ("na", "n/a", "none", "null", "nan")  # spellings of a missing number (R, pandas, SQL), any case


def parse_numeric_strings(items: pl.DataFrame) -> tuple[pl.DataFrame, list[str], dict[str, str]]:
    """Items with every String field that holds numbers only as Int64/Float64.

    CSV columns arrive as String (`sources._scan`), so a year or price column
    would be a categorical field with one unrelated category per value; as
    a number it is a numeric field (quantile buckets plus the standardised
    value). A column converts when every non-empty value parses as a number
    and none is a code with a leading zero ("02134" stays a string); empty
    strings become null; integral values give Int64. The item id, text,
    title and image path are never converted. Returns the items, the
    converted columns, and the columns of numbers kept as text, with why.
    """
    converted, cols, kept = [], [], {}
    for name in _string_fields(items):
        raw = items[name].str.strip_chars()
        raw = raw.set(raw.str.to_lowercase().is_in(MISSING_TEXT).fill_null(False), None)  # "NA": a missing number
        present = raw.is_not_null() & (raw != "")
        if not present.any() or raw.filter(present).str.contains(r"^[+-]?0\d").any():
            if present.any() and raw.filter(present).cast(pl.Float64, strict=False).is_not_null().all():
                kept[name] = "codes with a leading zero, such as zip codes"
            continue
        whole = raw.cast(pl.Int64, strict=False)  # exact: 17-digit codes stay distinct (a float would merge them)
        if not (whole.is_null() & present).any():
            num = whole
        else:
            num = raw.cast(pl.Float64, strict=False)  # null where empty or not a number
            if (num.is_null() & present).any():
                continue
            finite = num.filter(num.is_finite())
            if (finite == finite.round(0)).all() and (finite.abs().max() or 0) >= 2**53:
                # whole numbers past 2^53 with decimals: no exact reading (a float merges them), so a category each
                kept[name] = "whole numbers beyond 2^53, which no number type here holds exactly"
                continue
            if finite.len() == num.drop_nulls().len() and (finite == finite.round(0)).all():  # "3.0": a whole number
                num = num.cast(pl.Int64)
        converted.append(name)
        cols.append(num)
    return (items.with_columns(cols) if cols else items), converted, kept


def build_items(items: pl.LazyFrame | None, stats: pl.LazyFrame) -> pl.LazyFrame:
    """Items table: the source's items (all of them, seen or not) with stats.

    Items never seen in the interactions are cold (no collaborative signal)."""
    if items is None:
        base = stats.with_columns(pl.lit(None, pl.String).alias(S.TEXT))
    else:
        base = items.join(stats, on=S.ITEM_ID, how="left")
    out = base.with_columns(
        pl.col(S.N_TRAIN).fill_null(0),
        pl.col(S.COLD_ITEM).fill_null(True),
    )
    first = [S.ITEM_ID, S.TEXT, S.FIRST_TS, S.N_TRAIN, S.COLD_ITEM]
    return out.select(first + [c for c in out.collect_schema().names() if c not in first]).sort(S.ITEM_ID)
