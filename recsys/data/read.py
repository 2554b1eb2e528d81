"""The ranker's optional inputs: where the match features are, and the
distilled item embeddings as a table aligned with the item vocabulary.
Tables are read and checked by `features.reader` (a DataError/SchemaError
names the file and column)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from features import schemas as S
from features.core.errors import DataError, SchemaError
from features.reader import check_columns, check_manifest, parquet_schema, read_parquet


def load_item_embeddings(path: Path, item_ids: np.ndarray) -> tuple[Tensor, float]:
    """Distilled item vectors as a table aligned with `item_ids` (sorted raw
    ids) -> ((n_items, De) float32, coverage = share of `item_ids` that have
    a vector, 1.0: every item must have one).

    The table is checked as the match job checks it (`validate_embeddings`:
    one finite, non-zero vector per item, one dimension), and an item of the
    features folder without a vector is a DataError naming the file and the
    first ids: it would otherwise train and score on a zero vector."""
    from features.match.validation import check_missing_items, validate_embeddings

    file = str(path)
    if not path.exists():
        raise DataError("item embeddings file does not exist", file=file)
    check_manifest(path)  # a distill output edited after its job is refused, as every job's output is
    schema = parquet_schema(path)
    check_columns(schema, {S.ITEM_ID: "int"}, file)
    if "embedding" not in schema:
        raise SchemaError("missing column", file=file, column="embedding")
    raw, mat = validate_embeddings(read_parquet(path, [S.ITEM_ID, "embedding"]), file)
    check_missing_items(raw, item_ids, file, "error", what="of the features folder",
                        hint="the ranker reads a vector for every item: `recsys distill train` writes them all")
    pos = np.searchsorted(item_ids, raw).clip(0, len(item_ids) - 1)
    known = item_ids[pos] == raw
    table = np.zeros((len(item_ids), mat.shape[1]), dtype=np.float32)  # (n_items, De)
    table[pos[known]] = mat[known]
    return torch.from_numpy(table), float(np.isin(item_ids, raw).mean())
