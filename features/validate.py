"""Validation of raw inputs: every problem names the file, the column and the rows.

Raw tables may arrive with String columns (CSV) or typed ones (parquet). Each
required column is parsed with `strict=False` and compared with the original,
so an unparseable value is reported with its row instead of a parser error.
All checks of a table run as one aggregation over its rows, read once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from features import schemas as S
from features.core.errors import DataError, SchemaError
from features.csvshape import first_ragged_row, found_columns, near_names, quote_hint, text_candidates
from features.sources import RawTable
from features.timeunits import UNIT_PER_S, check_timestamp_unit

ROW = "__row"  # 0-based position in the input file; reported 1-based
_SHOW = 5  # rows shown per problem

_INT64_MAX = 2**63 - 1
_EXACT_FLOAT = 2**53  # a float id above this may not be the integer that was written


def _parse_int(col: str, dtype: pl.DataType) -> pl.Expr:
    c = pl.col(col)
    if dtype == pl.String:
        s = c.str.strip_chars()
        as_int = s.cast(pl.Int64, strict=False)
        as_float = s.cast(pl.Float64, strict=False)
        return pl.coalesce(as_int, _exact_integral(as_float))
    if dtype.is_integer():
        return c.cast(pl.Int64, strict=False)  # UInt64 beyond Int64: null, reported with its row
    if isinstance(dtype, pl.Decimal):  # Decimal(10, 0) ids from a database export (a cast to Int64 would truncate 1.5)
        return _exact_integral(c.cast(pl.Float64))
    if dtype.is_float():
        return _exact_integral(c)
    raise TypeError


def _exact_integral(x: pl.Expr) -> pl.Expr:
    """`x` (Float64) as Int64 where it is a whole number a float holds exactly
    (|x| <= 2^53); null elsewhere. "1000.0" is a pandas id; 1.2345678901234568e16
    stands for every integer around it, so it is no id at all."""
    return pl.when(x.is_finite() & (x == x.floor()) & (x.abs() <= _EXACT_FLOAT)).then(x.cast(pl.Int64))


def _parse_time(dtype: pl.DataType) -> pl.Expr:
    """Epoch times: integers, or numbers with a fraction (`time.time()`,
    pandas `.timestamp()`), floored to whole units like finer units are."""
    if dtype.is_integer():
        return _parse_int(S.TIMESTAMP, dtype)
    text = pl.col(S.TIMESTAMP).str.strip_chars() if dtype == pl.String else None
    x = pl.col(S.TIMESTAMP).cast(pl.Float64) if text is None else text.cast(pl.Float64, strict=False)
    floored = pl.when(x.is_finite() & (x.abs() <= _EXACT_FLOAT)).then(x.floor().cast(pl.Int64))
    return floored if text is None else pl.coalesce(text.cast(pl.Int64, strict=False), floored)  # integer text: exact


def _parse_label(dtype: pl.DataType) -> pl.Expr:
    """A label as 0.0/1.0 (checked later); text true/false (pandas, polars CSVs) in any case."""
    if dtype != pl.String:
        return _parse_float(S.LABEL, dtype)
    low = pl.col(S.LABEL).str.strip_chars().str.to_lowercase()
    return pl.when(low == "true").then(1.0).when(low == "false").then(0.0).otherwise(_parse_float(S.LABEL, dtype))


def _parse_float(col: str, dtype: pl.DataType) -> pl.Expr:
    c = pl.col(col)
    if dtype == pl.String:
        return c.str.strip_chars().cast(pl.Float64, strict=False)
    return c.cast(pl.Float64)


def _not_int_message(dtype: pl.DataType) -> str:
    if dtype.is_unsigned_integer():
        return f"value is larger than the largest id this project stores ({_INT64_MAX}, Int64)"
    if dtype.is_integer():
        return "value is not an integer"
    if dtype == pl.String:
        return ("value is not an integer id: ids are integers, so map text ids (such as 'A2SUAM1J3GNN3B' or an ISBN "
                f"ending in X) to integers first; a decimal id must be a whole number up to 2^53 = {_EXACT_FLOAT}")
    return f"value is not a whole number up to 2^53 = {_EXACT_FLOAT} (a float holds no exact integer id beyond it)"


def _not_time_message(dtype: pl.DataType) -> str:
    if dtype.is_unsigned_integer():
        return f"value is larger than the largest time this project stores ({_INT64_MAX}, Int64)"
    return ("value is not an epoch time (a number in --timestamp-unit): convert date-time text such as "
            "'2009-05-04T23:08:57Z' to epoch seconds, or write the column as a parquet datetime, which is read as is")


def _as_text(lf: pl.LazyFrame, columns: tuple[str, ...] | None = None) -> pl.LazyFrame:
    """Dictionary-encoded (pandas `category`) `columns` (default: all) as their text, which is then parsed."""
    schema = lf.collect_schema()
    cats = [c for c in (columns or schema.names()) if isinstance(schema.get(c), (pl.Categorical, pl.Enum))]
    return lf.with_columns(pl.col(c).cast(pl.String) for c in cats) if cats else lf


def _check_dtype(table: RawTable, col: str, dtype: pl.DataType, kind: str) -> None:
    ok = dtype == pl.String or dtype.is_numeric() or (kind == "float" and dtype == pl.Null)
    ok = ok or (col == S.TIMESTAMP and isinstance(dtype, (pl.Datetime, pl.Date))) or (col == S.LABEL and dtype == pl.Boolean)
    if not ok:
        raise SchemaError(f"wrong dtype {dtype}, expected {kind} (or text holding numbers)", file=table.file, column=col)


def _first_rows(cond: pl.Expr, name: str) -> list[pl.Expr]:
    return [
        cond.sum().alias(f"{name}__n"),
        pl.col(ROW).filter(cond).head(_SHOW).implode().alias(f"{name}__rows"),
    ]


def _raise_first(table: RawTable, stats: dict, checks: list[tuple[str, str, str]]) -> None:
    for name, column, message in checks:
        n = stats[f"{name}__n"]
        if n:
            rows = [r + table.row_offset for r in stats[f"{name}__rows"]]
            more = f" ({n} rows in all)" if n > len(rows) else ""
            raise DataError(message + more, file=table.file, column=column, rows=rows)


def validate_interactions(
    table: RawTable, timestamp_unit: str = "s", log: Callable[[str], None] = print,
) -> tuple[pl.LazyFrame, dict[str, tuple[int, int]]]:
    """Check raw interactions; return them typed, with (min, max) of the id and
    timestamp columns.

    Output columns: user_id, item_id, timestamp (Int64 seconds: input in
    `timestamp_unit`, floored to whole seconds), rating (Float64, null when the
    input has only labels), label (Int8, null when the input has only ratings)
    and `__row`. Timestamps implausible for the unit are refused, naming the
    unit they look like. Events of one user and item that only flooring to
    seconds makes share a timestamp are announced with `log` (the features
    keep whole seconds: the duplicate check then drops or refuses them).
    """
    lf = table.frame
    schema = lf.collect_schema()
    near_names(schema.names(), (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING, S.LABEL), table.file)
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        if col not in schema:
            raise SchemaError(f"missing required column; {found_columns(schema.names())}",
                              file=table.file, column=col)
    if S.RATING not in schema and S.LABEL not in schema:
        raise SchemaError(
            f"need a 'rating' or a 'label' column; found columns: {', '.join(schema.names())}",
            file=table.file,
            column="rating|label",
        )
    # only the columns read (an extra one is ignored, whatever its name: `__row` included), categories as text
    lf = _as_text(lf.select(c for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING, S.LABEL) if c in schema))
    schema = lf.collect_schema()
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        _check_dtype(table, col, schema[col], "integer")
    for col in (S.RATING, S.LABEL):
        if col in schema:
            _check_dtype(table, col, schema[col], "float")

    ts_dtype = schema[S.TIMESTAMP]
    parsed = {
        S.USER_ID: _parse_int(S.USER_ID, schema[S.USER_ID]),
        S.ITEM_ID: _parse_int(S.ITEM_ID, schema[S.ITEM_ID]),
        S.TIMESTAMP: (
            # a datetime says its own unit; a date is its midnight, UTC
            (pl.col(S.TIMESTAMP) if isinstance(ts_dtype, pl.Datetime) else pl.col(S.TIMESTAMP).cast(pl.Datetime("us"))).dt.epoch(timestamp_unit)
            if isinstance(ts_dtype, (pl.Datetime, pl.Date))
            else _parse_time(ts_dtype)
        ),
        S.RATING: _parse_float(S.RATING, schema[S.RATING]) if S.RATING in schema else pl.lit(None, pl.Float64),
        S.LABEL: _parse_label(schema[S.LABEL]) if S.LABEL in schema else pl.lit(None, pl.Float64),
    }
    typed = lf.with_row_index(ROW).select(pl.col(ROW), *(e.alias(k) for k, e in parsed.items()), *(
        pl.col(c).alias(f"__raw_{c}") for c in parsed if c in schema
    ))

    aggs: list[pl.Expr] = [pl.len().alias("n_rows")]
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        aggs += [pl.col(col).min().alias(f"{col}__min"), pl.col(col).max().alias(f"{col}__max")]
    checks: list[tuple[str, str, str]] = []
    for col in parsed:
        if col not in schema:
            continue
        raw = pl.col(f"__raw_{col}")
        unparsed = raw.is_not_null() & pl.col(col).is_null()
        if schema[col].is_float() and col == S.RATING:
            unparsed = pl.lit(False)  # NaN ratings get their own message
        if col == S.TIMESTAMP and (schema[col] == pl.String or schema[col].is_float()):
            # a number that no Int64 or exact float holds: too large, not "not a time"
            as_num = raw.str.strip_chars().cast(pl.Float64, strict=False) if schema[col] == pl.String else raw
            huge = unparsed & as_num.is_finite().fill_null(False)
            aggs += _first_rows(huge, f"{col}_huge")
            checks.append((f"{col}_huge", col, f"value is a number beyond 2^53 = {_EXACT_FLOAT}, larger than any "
                                               "epoch time in any unit this project reads: is the column a time?"))
            unparsed = unparsed & ~huge
        message = (_not_time_message(schema[col]) if col == S.TIMESTAMP else _not_int_message(schema[col])
                   if col in (S.USER_ID, S.ITEM_ID) else "value is not a number")
        aggs += _first_rows(unparsed, f"{col}_parse")
        checks.append((f"{col}_parse", col, message))
        nulls = raw.is_null()
        if col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP) or (col == S.RATING and S.LABEL not in schema) or (
            col == S.LABEL and S.RATING not in schema
        ):
            aggs += _first_rows(nulls, f"{col}_null")
            checks.append((f"{col}_null", col, "null value"))
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        aggs += _first_rows(pl.col(col) < 0, f"{col}_neg")
        checks.append((f"{col}_neg", col, "negative value"))
    if S.RATING in schema and S.LABEL in schema:
        neither = pl.col(f"__raw_{S.RATING}").is_null() & pl.col(f"__raw_{S.LABEL}").is_null()
        aggs += _first_rows(neither, "rating_label_null")
        checks.append(("rating_label_null", "rating|label", "no rating and no label (each row needs one of them)"))
    if S.RATING in schema:
        aggs += _first_rows(pl.col(S.RATING).is_nan(), "rating_nan")
        checks.append(("rating_nan", S.RATING, "NaN rating"))
        aggs += _first_rows(pl.col(S.RATING).is_infinite(), "rating_inf")
        checks.append(("rating_inf", S.RATING, "infinite rating"))
    merged_ids = [c for c in (S.USER_ID, S.ITEM_ID) if schema[c] == pl.String]
    for col in merged_ids:  # text ids: distinct strings that parse to one id ("007" and "7")
        parsed_ok = pl.col(col).is_not_null()
        aggs += [
            _id_text(col).filter(parsed_ok).n_unique().alias(f"{col}__n_text"),
            pl.col(col).filter(parsed_ok).n_unique().alias(f"{col}__n_ids"),
        ]
    if S.LABEL in schema:
        bad = pl.col(S.LABEL).is_not_null() & ~pl.col(S.LABEL).is_in([0.0, 1.0])
        aggs += _first_rows(bad, "label_range")
        checks.append(("label_range", S.LABEL, "label must be 0 or 1"))

    # the file is read once: the checks run on the rows both engines load next
    frame = collect_or_raise(typed, table)
    stats = frame.select(aggs).row(0, named=True)
    if stats["n_rows"] == 0:
        raise DataError("the file has no rows", file=table.file)
    _raise_first(table, stats, checks)
    for col in merged_ids:
        if stats[f"{col}__n_text"] > stats[f"{col}__n_ids"]:
            _raise_merged_ids(frame, table, col)
    bounds = {c: (stats[f"{c}__min"], stats[f"{c}__max"]) for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)}
    check_timestamp_unit(frame.lazy(), table, bounds[S.TIMESTAMP], timestamp_unit,
                         isinstance(ts_dtype, (pl.Datetime, pl.Date)), ROW)
    per_s = UNIT_PER_S[timestamp_unit]
    if per_s > 1:
        _warn_merged_by_flooring(frame, table, per_s, timestamp_unit, log)
    lo, hi = bounds[S.TIMESTAMP]
    bounds[S.TIMESTAMP] = (lo // per_s, hi // per_s)
    typed_rows = frame.select(  # selected now: the raw (text) columns are let go
        ROW, S.USER_ID, S.ITEM_ID, (pl.col(S.TIMESTAMP) // per_s) if per_s > 1 else pl.col(S.TIMESTAMP),
        pl.col(S.RATING), pl.col(S.LABEL).cast(pl.Int8))
    return typed_rows.lazy(), bounds


def _warn_merged_by_flooring(frame: pl.DataFrame, table: RawTable, per_s: int, unit: str, log: Callable[[str], None]) -> None:
    """Warn, naming rows, when events of one user and item at different times
    in `unit` fall in one second: in whole seconds they become duplicates."""
    second = pl.col(S.TIMESTAMP) // per_s
    merged = frame.filter(pl.col(S.TIMESTAMP).n_unique().over(S.USER_ID, S.ITEM_ID, second) > 1)
    if merged.height:
        rows = (merged[ROW].sort().head(_SHOW) + table.row_offset).to_list()
        log(f"warning: {table.file}: column {S.TIMESTAMP!r}: {merged.height:,} events of the same user and item lie "
            f"within one second of each other at different times in {unit} (rows {', '.join(map(str, rows))}"
            f"{' ...' if merged.height > len(rows) else ''}): the features keep whole seconds, so they become "
            "duplicates (one is kept; differing ratings or labels are refused)")


def _id_text(col: str) -> pl.Expr:
    """An id's text as written, less surrounding blanks and a ".0" (pandas
    writes the id 33 as "33.0" when the column also held a NaN): the form two
    ids must share to be one id."""
    return pl.col(f"__raw_{col}").str.strip_chars().str.replace(r"\.0+$", "")


def _raise_merged_ids(frame: pl.DataFrame, table: RawTable, col: str) -> None:
    """Error path: two different id strings that read as one integer id."""
    text = _id_text(col)
    clash = (
        frame.filter(pl.col(col).is_not_null())
        .group_by(col)
        .agg(text.unique(maintain_order=True).alias("texts"), pl.col(ROW).min().alias("row"))
        .filter(pl.col("texts").list.len() > 1)
        .sort("row")
    )
    first = clash.row(0, named=True)
    texts = first["texts"]
    rows = (
        frame.filter((pl.col(col) == first[col]) & text.is_in(texts[:2]).fill_null(False))
        .group_by(text.alias("t")).agg(pl.col(ROW).min())[ROW].sort().to_list()
    )
    raise DataError(
        f"different ids read as one: {texts[0]!r} and {texts[1]!r} are both id {first[col]}"
        f"{f' ({clash.height} ids in all)' if clash.height > 1 else ''}: write ids as plain integers (no leading zeros, exponents, signs or "
        "decimals), or map them to integers first",
        file=table.file, column=col, rows=[r + table.row_offset for r in rows],
    )


def collect_or_raise(lf: pl.LazyFrame, table: RawTable) -> pl.DataFrame:
    """Collect a scan of `table`; a reader failure (bad UTF-8 in a CSV, a
    truncated parquet page) becomes a DataError naming the file."""
    try:
        return lf.collect()
    except (pl.exceptions.ComputeError, pl.exceptions.InvalidOperationError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "utf-8" in msg.lower() or "utf8" in msg.lower():
            line = first_non_utf8_line(table.file)
            where = f" (line {line} of the file, the header being line 1)" if line else ""
            raise DataError(f"the file is not UTF-8 text{where}: save it as UTF-8", file=table.file) from e
        found = first_ragged_row(table.file, shorter=False) if "more fields" in msg.lower() else None
        line = found[1] if found else None
        where = f" (line {line} of the file has more fields than the header)" if line else quote_hint(e, table.file)
        raise DataError(f"cannot be read ({msg}){where}", file=table.file) from e


def first_non_utf8_line(path: str) -> int | None:
    """1-based number of the first line that is not valid UTF-8 (None when
    the file reads fine or cannot be opened). Only called on the error path."""
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return number
    except OSError:
        return None
    return None


def validate_items(table: RawTable) -> pl.DataFrame:
    """Check an items table: unique non-negative integer item ids, a text column."""
    lf = table.frame
    schema = lf.collect_schema()
    if S.ITEM_ID not in schema:
        raise SchemaError(f"missing required column; {found_columns(schema.names())}",
                          file=table.file, column=S.ITEM_ID)
    if S.TEXT not in schema:
        strings, spaced = text_candidates(lf), any(n != n.strip() for n in schema.names())
        hint = f"; its text columns: {', '.join(strings)} (e.g. --text-column {strings[0]})" if strings else ""
        hint = f"; {found_columns(schema.names())}" if spaced else hint  # ' text' is not 'text'
        raise SchemaError(
            f"missing the item text column (name it 'text' or pass --text-column){hint}",
            file=table.file,
            column=S.TEXT,
        )
    for i, name in enumerate(schema.names()):
        if not name.strip():
            raise SchemaError(f"column {i + 1} has no name (a pandas index written without index=False?): "
                              "name it or drop it", file=table.file, column=repr(name))
        if name.startswith("__index_level_"):
            raise SchemaError("a pandas index (written without index=False?): drop it", file=table.file, column=name)
        if name in S.ITEMS_COMPUTED or name.startswith("__"):
            raise SchemaError(f"reserved column name: the build computes {', '.join(S.ITEMS_COMPUTED)} itself "
                              "(and names starting with '__' are internal): rename the column", file=table.file, column=name)
    lf = _as_text(lf, (S.ITEM_ID,))
    schema = lf.collect_schema()
    _check_dtype(table, S.ITEM_ID, schema[S.ITEM_ID], "integer")
    for col, dtype in ((c, schema[c]) for c in (S.TEXT, S.TITLE, S.IMAGE_PATH) if c in schema):
        if not (dtype in (pl.String, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum)) or dtype.is_numeric()):
            what = "join the values into one string" if isinstance(dtype, (pl.List, pl.Array)) else "convert it to text"
            raise SchemaError(f"dtype {dtype} is not text: {what}"
                              + (", or pick another column with --text-column" if col == S.TEXT else ""),
                              file=table.file, column=col)
    df = collect_or_raise(lf.with_row_index(ROW).with_columns(_parse_int(S.ITEM_ID, schema[S.ITEM_ID]).alias("__id")), table)
    if df.height == 0:
        raise DataError("the file has no rows", file=table.file)
    raw = df[S.ITEM_ID]
    for name, mask, msg in (
        ("parse", raw.is_not_null() & df["__id"].is_null(), _not_int_message(schema[S.ITEM_ID])),
        ("null", raw.is_null(), "null item id"),
        ("neg", df["__id"] < 0, "negative item id"),
        ("dup", df["__id"].is_duplicated() & df["__id"].is_not_null(), "duplicate item id"),
    ):
        bad = df.filter(mask)
        if bad.height:
            rows = (bad[ROW] + table.row_offset).head(_SHOW).to_list()
            more = f" ({bad.height} rows in all)" if bad.height > len(rows) else ""
            raise DataError(msg + more, file=table.file, column=S.ITEM_ID, rows=rows)
    if S.IMAGE_PATH in df.columns:
        df = df.with_columns(_image_paths(df, table))
    out = df.drop(ROW, S.ITEM_ID).rename({"__id": S.ITEM_ID})
    out = out.with_columns(pl.col(S.TEXT).cast(pl.String))
    return out.select(S.ITEM_ID, pl.exclude(S.ITEM_ID))


def _image_paths(df: pl.DataFrame, table: RawTable) -> pl.Series:
    """`image_path` made absolute, a relative path read from the items file's
    folder (not from wherever `distill` later runs), blank as null (no image);
    every named file must exist: found here, not after the teachers trained."""
    base = Path(table.file).resolve().parent
    resolved: list[str | None] = []
    missing: list[int] = []
    for i, raw in enumerate(df[S.IMAGE_PATH].cast(pl.String).to_list()):
        if raw is None or not raw.strip():
            resolved.append(None)
            continue
        if "://" in raw:
            raise DataError(f"{raw.strip()!r} is a URL: images are read from files; download them and name the files",
                            file=table.file, column=S.IMAGE_PATH, rows=[int(df[ROW][i]) + table.row_offset])
        path = Path(raw.strip()).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            missing.append(i)
        resolved.append(str(path))
    if missing:
        first = Path(resolved[missing[0]] or "")
        what = "is a folder, not an image file" if first.is_dir() else "not found"
        more = f" ({len(missing)} rows in all)" if len(missing) > 1 else ""
        raise DataError(f"image file {what}: {first}{more} (a relative path is read from the items file's folder, "
                        f"{base}): fix the path or leave the cell empty for an item without an image",
                        file=table.file, column=S.IMAGE_PATH,
                        rows=[int(df[ROW][i]) + table.row_offset for i in missing[:_SHOW]])
    return pl.Series(S.IMAGE_PATH, resolved, pl.String)


def validate_users(table: RawTable) -> pl.DataFrame:
    df = table.frame.collect()
    if S.USER_ID not in df.columns:
        raise SchemaError("missing required column", file=table.file, column=S.USER_ID)
    dup = df.with_row_index(ROW).filter(pl.col(S.USER_ID).is_duplicated())
    if dup.height:
        raise DataError("duplicate user id", file=table.file, column=S.USER_ID, rows=(dup[ROW] + 1).head(_SHOW).to_list())
    return df.with_columns(pl.col(S.USER_ID).cast(pl.Int64))
