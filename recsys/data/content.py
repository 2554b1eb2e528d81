"""Item and user content fields: categorical columns -> per-entity id lists
(pooled sparse features of a batch), numeric columns -> standardised dense
columns.

Entity tables are re-indexed so that row e is table row e of the ranker
(entities without a row get nulls: no ids, dense 0)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from features import schemas as S
from recsys.data.batch import USER_KEY, concat_ranges
from recsys.data.dense import standardize


@dataclass
class Csr:
    """Per-entity id lists: entity e owns values[offsets[e]:offsets[e+1]]."""

    offsets: np.ndarray  # (E + 1,)
    values: np.ndarray  # (nnz,)

    def gather(self, entities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.offsets[entities + 1] - self.offsets[entities]
        return self.values[concat_ranges(self.offsets[entities], lengths)], lengths


def vocab_csr(frame: pl.DataFrame, column: str, multi: bool, n_rows: int) -> tuple[Csr, int]:
    """Categorical column of an entity table (row e = entity e) -> CSR of vocabulary ids."""
    col = frame[column]
    if multi:
        lists = col.list.drop_nulls()
        flat = lists.explode().drop_nulls()
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    else:
        flat = col.drop_nulls()
        lengths = col.is_not_null().to_numpy().astype(np.int64)
    vocab = np.sort(flat.cast(pl.String).unique().to_numpy().astype(str))
    ids = np.searchsorted(vocab, flat.cast(pl.String).to_numpy().astype(str)).astype(np.int64)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return Csr(offsets, ids), max(len(vocab), 1)


def entity_numeric(frame: pl.DataFrame, names: tuple[str, ...], n: int) -> np.ndarray:
    if not names:
        return np.zeros((n, 0), dtype=np.float32)
    values = frame.select(pl.col(c).cast(pl.Float64) for c in names).to_numpy()  # (n, k)
    return standardize(values, np.arange(n))  # static content: statistics over the entity table


@dataclass
class ContentFields:
    """Sparse (KJT key -> (CSR, vocabulary size)) and dense content of every
    item and user table row."""

    user_csr: dict[str, tuple[Csr, int]] = field(default_factory=dict)
    item_csr: dict[str, tuple[Csr, int]] = field(default_factory=dict)
    item_numeric_names: tuple[str, ...] = ()
    item_dense: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (n_items, k_i)
    user_numeric_names: tuple[str, ...] = ()
    user_dense: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (n_users, k_u)


def content_fields(
    items: pl.DataFrame, users: pl.DataFrame | None, item_ids: np.ndarray, user_ids: np.ndarray
) -> ContentFields:
    """Categorical fields -> pooled sparse features; numeric fields -> dense.
    item_ids / user_ids: the sorted raw ids of the table rows."""
    out = ContentFields()
    n_u, n_i = len(user_ids), len(item_ids)
    ident_u = Csr(np.arange(n_u + 1, dtype=np.int64), np.arange(n_u, dtype=np.int64))
    out.user_csr[USER_KEY] = (ident_u, n_u)
    items_full = pl.DataFrame({S.ITEM_ID: item_ids}).join(items, on=S.ITEM_ID, how="left", maintain_order="left")
    kinds = S.item_field_kinds(items.schema)
    for c in kinds["categorical"]:
        out.item_csr[f"item_{c}"] = vocab_csr(items_full, c, False, n_i)
    for c in kinds["multi"]:
        out.item_csr[f"item_{c}"] = vocab_csr(items_full, c, True, n_i)
    out.item_numeric_names = tuple(kinds["numeric"])
    out.item_dense = entity_numeric(items_full, out.item_numeric_names, n_i)
    out.user_dense = np.zeros((n_u, 0), dtype=np.float32)
    if users is not None:
        users_full = pl.DataFrame({S.USER_ID: user_ids}).join(users, on=S.USER_ID, how="left", maintain_order="left")
        cat = [c for c, t in users.schema.items() if c != S.USER_ID and t in (pl.String, pl.Categorical)]
        multi = [c for c, t in users.schema.items() if t == pl.List(pl.String)]
        for c in cat:
            out.user_csr[f"user_{c}"] = vocab_csr(users_full, c, False, n_u)
        for c in multi:
            out.user_csr[f"user_{c}"] = vocab_csr(users_full, c, True, n_u)
        out.user_numeric_names = tuple(c for c, t in users.schema.items() if c != S.USER_ID and t.is_numeric())
        out.user_dense = entity_numeric(users_full, out.user_numeric_names, n_u)
    return out
