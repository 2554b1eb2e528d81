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

import io
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from features import schemas as S
from features.core.errors import DataError, SchemaError, UsageError
from features.core.fingerprint import bytes_fingerprint, file_fingerprint
from features.core.manifest import folder_fingerprint, output_info, read_manifest

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


def parquet_schema(path: str | Path, data: bytes | None = None) -> pl.Schema:
    """The schema of a parquet file; a DataError naming it when it is absent or
    unreadable. `data`: its bytes, already read (then parsed from them)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise DataError("file does not exist", file=str(path))
    try:
        return pl.Schema(pl.read_parquet_schema(path if data is None else io.BytesIO(data)))
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


def read_parquet(path: str | Path, columns: Sequence[str] | None = None, data: bytes | None = None) -> pl.DataFrame:
    """`pl.read_parquet`, failing with a DataError naming the file. `data`: its
    bytes, already read (then parsed from them)."""
    try:
        return pl.read_parquet(path if data is None else io.BytesIO(data), columns=list(columns) if columns is not None else None)
    except Exception as e:  # noqa: BLE001 - a damaged data page after a readable footer
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from e


def check_manifest(path: str | Path, fingerprint: str | None = None) -> None:
    """When `path` is an output listed in its folder's manifest.json (a
    features or match-features folder), check that it still holds the bytes
    the manifest fingerprinted. A file rewritten, swapped or truncated after
    its job would otherwise be read as if the job had written it (and a job
    keyed on the manifest's fingerprints would even skip). A DataError naming
    the file and the job to rerun. `fingerprint`: that of the bytes the caller
    already read (`read_table`), instead of reading the file again."""
    path = Path(path)
    manifest = read_manifest(path.parent) or {}
    info = (manifest.get("outputs") or {}).get(path.name)
    if info is None:
        return  # a file of the user's own, outside a job's folder: nothing to check against
    if fingerprint is None and path.is_file():
        fingerprint = file_fingerprint(path)
    if fingerprint is not None and fingerprint != info.get("fingerprint"):
        job = manifest.get("job", "the job that wrote it")
        # the jobs whose name is their command (spelt in parts: features never names a distill module)
        commands = {("features", "build"), ("features", "match"), ("distill", "train"), ("distill", "eval")}
        parts = tuple(job.split("."))
        command = f"recsys {' '.join(parts)}" if parts in commands else None
        rerun = f"`{command} ... --force`" if command else "that job"
        raise DataError(f"changed since `{job}` wrote it (its bytes differ from {path.parent / 'manifest.json'}): "
                        f"rerun {rerun} into this folder rather than editing its outputs", file=str(path))


def check_match_upstream(match_file: str | Path, features_dir: str | Path) -> None:
    """The match features were computed from this features folder's
    interactions (the fingerprint their manifest keyed on), when both
    folders have manifests: match features of another build (another label
    threshold, say) can line up row by row and still be wrong."""
    match_file, features_dir = Path(match_file), Path(features_dir)
    upstream = ((read_manifest(match_file.parent) or {}).get("key") or {}).get("upstream", {})
    used = upstream.get("interactions")
    have = output_info(features_dir, S.FILES["interactions"]).get("fingerprint")
    if used is None and upstream.get("features"):
        # an out-of-fold folder keys on the whole features folder's fingerprint (it was not checked before 2026-11-30)
        used, have = upstream["features"], folder_fingerprint(features_dir)
    if used is not None and have is not None and used != have:
        raise DataError(f"built from other features than {features_dir} (interactions fingerprint {used}, this "
                        f"folder's {have}): rerun `recsys features match --features {features_dir}`", file=str(match_file))


def other_items_note(features_dir: str | Path, embeddings: str | Path) -> str | None:
    """A warning when the job that wrote `embeddings` (its manifest beside
    them) read another items file than the features folder's: same ids, other
    content (edited texts or fields), so the vectors describe other items (a
    probe, 2026-12-01: used silently by match and the ranker). Embeddings of
    a build with other interactions but the same items pass silently."""
    items = S.FILES["items"]
    theirs = ((read_manifest(Path(embeddings).parent) or {}).get("key") or {}).get("upstream", {}).get(items)
    ours = ((read_manifest(features_dir) or {}).get("outputs") or {}).get(items, {}).get("fingerprint")
    if theirs is None or ours is None or theirs == ours:
        return None
    return (f"warning: {embeddings}: distilled from another {items} than {Path(features_dir) / items} (same ids, other "
            "content?): the vectors may not describe these items; rerun `recsys distill eval` on these features")


def read_table(path: str | Path, name: str, columns: Sequence[str]) -> pl.DataFrame:
    """The whole parquet file at `path` (a file of kind `name`), after
    checking that it holds `columns` with their declared kinds of dtype, and
    that it is the file its folder's manifest describes (`check_manifest`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", file=str(path))
    # the bytes are read once, and those are checked and parsed: a file replaced between a check and a
    # later read was read as the bytes the check had passed (a probe, 2026-12-01)
    data = path.read_bytes()
    check_manifest(path, bytes_fingerprint(data))  # first: a damaged output is named as such, with the job to rerun
    check_columns(parquet_schema(path, data), needed_kinds(name, columns), str(path))
    return read_parquet(path, data=data)


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
    "check_manifest",
    "check_match_upstream",
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
