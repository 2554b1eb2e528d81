"""Validation of raw inputs: every problem names the file, the column and the rows.

Raw tables may arrive with String columns (CSV) or typed ones (parquet). Each
required column is parsed with `strict=False` and compared with the original,
so an unparseable value is reported with its row instead of a parser error.
All checks of a table run as one aggregation over a single scan.
"""

from __future__ import annotations

import polars as pl

from features import schemas as S
from features.errors import DataError, SchemaError
from features.sources import RawTable

ROW = "__row"  # 0-based position in the input file; reported 1-based
_SHOW = 5  # rows shown per problem


def _parse_int(col: str, dtype: pl.DataType) -> pl.Expr:
    c = pl.col(col)
    if dtype == pl.String:
        s = c.str.strip_chars()
        as_int = s.cast(pl.Int64, strict=False)
        as_float = s.cast(pl.Float64, strict=False)
        integral = pl.when(as_float.is_finite() & (as_float == as_float.floor())).then(as_float.cast(pl.Int64))
        return pl.coalesce(as_int, integral)
    if dtype.is_integer():
        return c.cast(pl.Int64)
    if dtype.is_float():
        return pl.when(c.is_finite() & (c == c.floor())).then(c.cast(pl.Int64))
    raise TypeError


def _parse_float(col: str, dtype: pl.DataType) -> pl.Expr:
    c = pl.col(col)
    if dtype == pl.String:
        return c.str.strip_chars().cast(pl.Float64, strict=False)
    return c.cast(pl.Float64)


def _check_dtype(table: RawTable, col: str, dtype: pl.DataType, kind: str) -> None:
    ok = dtype == pl.String or dtype.is_numeric() or (kind == "float" and dtype == pl.Null)
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


def validate_interactions(table: RawTable) -> tuple[pl.LazyFrame, dict[str, tuple[int, int]]]:
    """Check raw interactions; return them typed, with (min, max) of the id and
    timestamp columns.

    Output columns: user_id, item_id, timestamp (Int64), rating (Float64, null
    when the input has only labels), label (Int8, null when the input has only
    ratings) and `__row`.
    """
    lf = table.frame
    schema = lf.collect_schema()
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        if col not in schema:
            raise SchemaError(
                f"missing required column; found columns: {', '.join(schema.names()) or '(none)'}",
                file=table.file,
                column=col,
            )
    if S.RATING not in schema and S.LABEL not in schema:
        raise SchemaError(
            f"need a 'rating' or a 'label' column; found columns: {', '.join(schema.names())}",
            file=table.file,
            column="rating|label",
        )
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        _check_dtype(table, col, schema[col], "integer")
    for col in (S.RATING, S.LABEL):
        if col in schema:
            _check_dtype(table, col, schema[col], "float")

    parsed = {
        S.USER_ID: _parse_int(S.USER_ID, schema[S.USER_ID]),
        S.ITEM_ID: _parse_int(S.ITEM_ID, schema[S.ITEM_ID]),
        S.TIMESTAMP: _parse_int(S.TIMESTAMP, schema[S.TIMESTAMP]),
        S.RATING: _parse_float(S.RATING, schema[S.RATING]) if S.RATING in schema else pl.lit(None, pl.Float64),
        S.LABEL: _parse_float(S.LABEL, schema[S.LABEL]) if S.LABEL in schema else pl.lit(None, pl.Float64),
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
        kind = "an integer" if col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP) else "a number"
        aggs += _first_rows(unparsed, f"{col}_parse")
        checks.append((f"{col}_parse", col, f"value is not {kind}"))
        nulls = raw.is_null()
        if col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP) or (col == S.RATING and S.LABEL not in schema) or (
            col == S.LABEL and S.RATING not in schema
        ):
            aggs += _first_rows(nulls, f"{col}_null")
            checks.append((f"{col}_null", col, "null value"))
    for col in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        aggs += _first_rows(pl.col(col) < 0, f"{col}_neg")
        checks.append((f"{col}_neg", col, "negative value"))
    if S.RATING in schema:
        aggs += _first_rows(pl.col(S.RATING).is_nan(), "rating_nan")
        checks.append(("rating_nan", S.RATING, "NaN rating"))
    if S.LABEL in schema:
        bad = pl.col(S.LABEL).is_not_null() & ~pl.col(S.LABEL).is_in([0.0, 1.0])
        aggs += _first_rows(bad, "label_range")
        checks.append(("label_range", S.LABEL, "label must be 0 or 1"))

    stats = typed.select(aggs).collect().row(0, named=True)
    if stats["n_rows"] == 0:
        raise DataError("the file has no rows", file=table.file)
    _raise_first(table, stats, checks)
    bounds = {c: (stats[f"{c}__min"], stats[f"{c}__max"]) for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)}
    return typed.select(
        ROW,
        S.USER_ID,
        S.ITEM_ID,
        S.TIMESTAMP,
        pl.col(S.RATING),
        pl.col(S.LABEL).cast(pl.Int8),
    ), bounds


def validate_items(table: RawTable) -> pl.DataFrame:
    """Check an items table: unique non-negative integer item ids, a text column."""
    lf = table.frame
    schema = lf.collect_schema()
    if S.ITEM_ID not in schema:
        raise SchemaError(
            f"missing required column; found columns: {', '.join(schema.names()) or '(none)'}",
            file=table.file,
            column=S.ITEM_ID,
        )
    if S.TEXT not in schema:
        raise SchemaError(
            "missing the item text column (name it 'text' or pass --text-column)",
            file=table.file,
            column=S.TEXT,
        )
    _check_dtype(table, S.ITEM_ID, schema[S.ITEM_ID], "integer")
    df = lf.with_row_index(ROW).with_columns(_parse_int(S.ITEM_ID, schema[S.ITEM_ID]).alias("__id")).collect()
    if df.height == 0:
        raise DataError("the file has no rows", file=table.file)
    raw = df[S.ITEM_ID]
    for name, mask, msg in (
        ("parse", raw.is_not_null() & df["__id"].is_null(), "value is not an integer"),
        ("null", raw.is_null(), "null item id"),
        ("neg", df["__id"] < 0, "negative item id"),
        ("dup", df["__id"].is_duplicated() & df["__id"].is_not_null(), "duplicate item id"),
    ):
        bad = df.filter(mask)
        if bad.height:
            rows = (bad[ROW] + table.row_offset).head(_SHOW).to_list()
            more = f" ({bad.height} rows in all)" if bad.height > len(rows) else ""
            raise DataError(msg + more, file=table.file, column=S.ITEM_ID, rows=rows)
    out = df.drop(ROW, S.ITEM_ID).rename({"__id": S.ITEM_ID})
    out = out.with_columns(pl.col(S.TEXT).cast(pl.String))
    return out.select(S.ITEM_ID, pl.exclude(S.ITEM_ID))


def validate_users(table: RawTable) -> pl.DataFrame:
    df = table.frame.collect()
    if S.USER_ID not in df.columns:
        raise SchemaError("missing required column", file=table.file, column=S.USER_ID)
    dup = df.with_row_index(ROW).filter(pl.col(S.USER_ID).is_duplicated())
    if dup.height:
        raise DataError("duplicate user id", file=table.file, column=S.USER_ID, rows=(dup[ROW] + 1).head(_SHOW).to_list())
    return df.with_columns(pl.col(S.USER_ID).cast(pl.Int64))
