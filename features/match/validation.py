"""Checks of an item-embeddings table before the match job uses it: one
vector per item, finite, non-zero, one dimension; items without a vector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError, SchemaError

EMB_ITEM_ID = S.ITEM_ID
EMBEDDING = "embedding"  # List(Float32) column of an item-embeddings parquet


def _ids_text(ids: Sequence[int], limit: int = 10) -> str:
    ids = list(ids)
    return f"{ids[:limit]}{' ...' if len(ids) > limit else ''}"


def validate_embeddings(df: pl.DataFrame, file: str, dim: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Check an item-embeddings table and return (ids (N,), vectors (N, D) float32).

    Rejects, naming the file, the column and the first item ids: missing
    columns, null ids or vectors, duplicate ids, ragged lengths, a dimension
    other than `dim` (when > 0), NaN/inf/null values, all-zero vectors (no
    direction to normalise)."""
    for col in (EMB_ITEM_ID, EMBEDDING):
        if col not in df.columns:
            raise SchemaError(f"missing column {col!r} (found {df.columns})", file=file, column=col)
    if not df.schema[EMB_ITEM_ID].is_integer():
        raise SchemaError(f"expected an integer column, got {df.schema[EMB_ITEM_ID]}", file=file, column=EMB_ITEM_ID)
    if df.schema[EMB_ITEM_ID].is_unsigned_integer():  # UInt64 past Int64: the catalog's ids are Int64
        big = df.with_row_index("__row", offset=1).filter(pl.col(EMB_ITEM_ID) > 2**63 - 1)
        if big.height:
            raise DataError(f"{big.height} item ids larger than the largest Int64 id", file=file, column=EMB_ITEM_ID,
                            rows=big["__row"].head(5).to_list())
    etype = df.schema[EMBEDDING]
    if not (isinstance(etype, (pl.List, pl.Array)) and etype.inner.is_float()):
        raise SchemaError(f"expected List(Float32), got {etype}", file=file, column=EMBEDDING)
    df = df.with_row_index("__row", offset=1)
    for col in (EMB_ITEM_ID, EMBEDDING):
        bad = df.filter(pl.col(col).is_null())
        if bad.height:
            raise DataError(f"{bad.height} null values", file=file, column=col, rows=bad["__row"].to_list())
    dup = df.filter(pl.col(EMB_ITEM_ID).is_duplicated())
    if dup.height:
        ids = dup[EMB_ITEM_ID].unique(maintain_order=True).to_list()
        raise DataError(
            f"duplicate item ids {_ids_text(ids)}: one vector per item",
            file=file,
            column=EMB_ITEM_ID,
            rows=dup["__row"].to_list(),
        )
    lens = df[EMBEDDING].list.len() if isinstance(etype, pl.List) else pl.Series([etype.size] * df.height)
    if df.height == 0:
        raise DataError("no rows", file=file, column=EMBEDDING)
    common = int(lens.mode().sort()[-1])
    if lens.n_unique() > 1:
        bad = df.filter(lens != common)
        raise DataError(
            f"ragged vectors: most have {common} values, items {_ids_text(bad[EMB_ITEM_ID].to_list())} do not",
            file=file,
            column=EMBEDDING,
            rows=bad["__row"].to_list(),
        )
    if common == 0 or (dim and common != dim):
        raise DataError(
            f"vectors have dimension {common}, expected {dim or '>= 1'} (items {_ids_text(df[EMB_ITEM_ID].head(10).to_list())})",
            file=file,
            column=EMBEDDING,
        )
    flat = df[EMBEDDING].explode() if isinstance(etype, pl.List) else df[EMBEDDING].arr.explode()
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below with their rows
        vec = flat.cast(pl.Float64).to_numpy().reshape(df.height, common).astype(np.float32)  # (N, D)
    ids = df[EMB_ITEM_ID].cast(pl.Int64).to_numpy()
    for what, bad_mask in (
        ("NaN, inf or null values (or values beyond float32)", ~np.isfinite(vec).all(axis=1)),
        ("all-zero vectors (cannot be L2-normalised)", ~(np.abs(vec) > 0).any(axis=1)),
    ):
        if bad_mask.any():
            rows = (np.flatnonzero(bad_mask) + 1).tolist()
            raise DataError(
                f"{int(bad_mask.sum())} items with {what}: {_ids_text(ids[bad_mask].tolist())}",
                file=file,
                column=EMBEDDING,
                rows=rows,
            )
    return ids, vec


def check_missing_items(emb_ids: np.ndarray, needed: np.ndarray, file: str, policy: str, *,
                        what: str = "of the interactions",
                        hint: str = "set match.missing_items: null to give their rows null match features") -> np.ndarray:
    """Item ids of `needed` without a vector; under policy "error" a DataError."""
    missing = np.setdiff1d(np.asarray(needed, np.int64), np.asarray(emb_ids, np.int64))
    if len(missing) and policy == "error":
        raise DataError(
            f"{len(missing)} items {what} have no vector: {_ids_text(missing.tolist())} ({hint})",
            file=file,
            column=EMB_ITEM_ID,
        )
    return missing
