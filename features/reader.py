"""One reader for the files of a features folder (and of a match-features
folder), checked against `features.schemas`: a missing file, an unreadable
one, a missing column or a column of the wrong kind of dtype is a typed error
naming the file and the column, before any work.

Kinds, not exact dtypes, are compared (an Int32 column where Int64 is
declared is fine): "int", "float", "str", "bool", "list_int".

>>> kind_of(pl.List(pl.Int64)), kind_of(pl.Int8), kind_of(pl.Float32)
('list_int', 'int', 'float')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from features import schemas as S
from features.core.errors import DataError, SchemaError, UsageError

# declared columns of each file a reader may ask for; match features are the
# keys plus any number of numeric `mf_` columns
DECLARED: dict[str, pl.Schema] = {
    "interactions": S.INTERACTIONS_SCHEMA,
    "sequences": S.SEQUENCES_SCHEMA,
    "items": S.ITEMS_BASE_SCHEMA,
    "users": S.USERS_BASE_SCHEMA,
    "match": pl.Schema({k: S.INTERACTIONS_SCHEMA[k] for k in S.MATCH_KEYS}),
}
FILE_NAMES = {**{k: S.FILES[k] for k in DECLARED if k in S.FILES}, "match": S.MATCH_FILE}


def kind_of(dtype: pl.DataType) -> str:
    """The kind a declared dtype asks for."""
    if dtype == pl.Boolean:
        return "bool"
    if dtype == pl.String:
        return "str"
    if isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_integer():
        return "list_int"
    if dtype.is_integer():
        return "int"
    if dtype.is_numeric():
        return "float"
    raise ValueError(f"no kind for dtype {dtype}")


def kind_ok(dtype: pl.DataType, kind: str) -> bool:
    """Whether a file's dtype holds values of `kind` ("float" takes any number, and all-null)."""
    if kind == "int":
        return dtype.is_integer()
    if kind == "str":
        return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    if kind == "bool":
        return dtype == pl.Boolean
    if kind == "list_int":
        return isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_integer()
    if kind == "float":
        return dtype.is_numeric() or dtype == pl.Null
    raise ValueError(kind)


def parquet_schema(path: str | Path) -> pl.Schema:
    """The schema of a parquet file; a DataError naming it when it is absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", file=str(path))
    try:
        return pl.Schema(pl.read_parquet_schema(path))
    except Exception as e:  # noqa: BLE001 - polars raises several types for a broken file
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from e


def check_columns(schema: pl.Schema, needed: dict[str, str], file: str) -> None:
    """Every `needed` column (name -> kind) is in `schema` with a dtype of its kind."""
    for col, kind in needed.items():
        if col not in schema:
            raise SchemaError(f"missing column (found: {', '.join(schema.names())})", file=file, column=col)
        if not kind_ok(schema[col], kind):
            raise SchemaError(f"dtype {schema[col]} is not {kind}", file=file, column=col)


def needed_kinds(name: str, columns: Sequence[str]) -> dict[str, str]:
    """Kinds of `columns` of file `name` from the declared schema; `mf_`
    columns of the match file are "float". A column the schema does not
    declare is a programming error (ValueError)."""
    declared = DECLARED[name]
    out = {}
    for col in columns:
        if col in declared:
            out[col] = kind_of(declared[col])
        elif name == "match" and col.startswith(S.MATCH_PREFIX):
            out[col] = "float"
        else:
            raise ValueError(f"{col!r} is not a declared column of {FILE_NAMES[name]} (features.schemas)")
    return out


def read_parquet(path: str | Path, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """`pl.read_parquet`, failing with a DataError naming the file."""
    try:
        return pl.read_parquet(path, columns=list(columns) if columns is not None else None)
    except Exception as e:  # noqa: BLE001 - a damaged data page after a readable footer
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from e


def read_table(path: str | Path, name: str, columns: Sequence[str]) -> pl.DataFrame:
    """The whole parquet file at `path` (a file of kind `name`), after
    checking that it holds `columns` with their declared kinds of dtype."""
    check_columns(parquet_schema(path), needed_kinds(name, columns), str(path))
    return read_parquet(path)


def read_features_table(folder: str | Path, name: str, columns: Sequence[str]) -> pl.DataFrame:
    """`folder`'s file `name` ("interactions", "sequences", "items", "users",
    or "match" for a match-features folder), checked for `columns`."""
    path = Path(folder) / FILE_NAMES[name]
    if not path.is_file():
        job = "recsys features match" if name == "match" else "recsys features build"
        raise DataError(f"missing from the folder (rebuild it with `{job}`)", file=str(path))
    return read_table(path, name, columns)


__all__ = [
    "check_columns",
    "kind_of",
    "kind_ok",
    "needed_kinds",
    "parquet_schema",
    "read_features_table",
    "read_parquet",
    "read_table",
]


def existing_match_file(location: str | Path, *, key: str = "match features", switch: str = "data.use_match_features") -> Path:
    """The match-features parquet of `location` (a .parquet path, or a folder
    written by `recsys features match`); UsageError (exit 2) naming `key`
    when it does not exist: a requested input that is absent is never a quiet
    run without it. `switch` names the config key that turns them off."""
    f = S.match_file(location)
    if not f.is_file():
        where = f"{location} does not exist" if not Path(location).exists() else f"{location} holds no {S.MATCH_FILE}"
        raise UsageError(f"{key}: {where}; run `recsys features match` to build it, or set {switch}: false")
    return f
