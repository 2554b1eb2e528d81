"""The ranker's optional inputs: where the match features are, and the
distilled item embeddings as a table aligned with the item vocabulary.
Tables are read and checked by `features.reader` (a DataError/SchemaError
names the file and column)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from features import schemas as S
from features.core.errors import DataError, SchemaError
from features.reader import check_columns, parquet_schema, read_parquet


def load_item_embeddings(path: Path, item_ids: np.ndarray) -> tuple[Tensor, float]:
    """Distilled item vectors as a table aligned with `item_ids` (sorted raw
    ids; unknown items get zero rows) -> ((n_items, De) float32, coverage =
    share of `item_ids` that have a vector)."""
    file = str(path)
    if not path.exists():
        raise DataError("item embeddings file does not exist", file=file)
    schema = parquet_schema(path)
    check_columns(schema, {S.ITEM_ID: "int"}, file)
    if "embedding" not in schema:
        raise SchemaError("missing column", file=file, column="embedding")
    dtype = schema["embedding"]
    if not (isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_float()):
        raise SchemaError(f"dtype {dtype} is not a list of floats", file=file, column="embedding")
    frame = read_parquet(path, [S.ITEM_ID, "embedding"])
    dims = frame["embedding"].list.len().unique().to_list() if isinstance(dtype, pl.List) else [dtype.size]
    if len(dims) != 1 or dims[0] in (None, 0):
        raise DataError(f"embeddings must all have one positive length, found {sorted(map(str, dims))}",
                        file=file, column="embedding")
    mat = np.stack(frame["embedding"].to_numpy()).astype(np.float32) if isinstance(dtype, pl.List) \
        else frame["embedding"].to_numpy().astype(np.float32)
    raw = frame[S.ITEM_ID].to_numpy()
    pos = np.searchsorted(item_ids, raw).clip(0, len(item_ids) - 1)
    known = item_ids[pos] == raw
    table = np.zeros((len(item_ids), mat.shape[1]), dtype=np.float32)  # (n_items, De)
    table[pos[known]] = mat[known]
    return torch.from_numpy(table), float(np.isin(item_ids, raw).mean())
