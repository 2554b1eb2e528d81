"""Item fields (categorical, multi-valued, numeric) as tokens of one shared
vocabulary plus standardised numerics.

Shape legend:
    I  items
    F  field tokens of one field per item (padded with 0)
    N  numeric fields (2 columns each: standardised value, null flag)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl


@dataclass
class FieldFeatures:
    """Item fields as tokens of one shared vocabulary (id 0 = padding).

    Every field has its own id range and a null token, so "no genre" or
    "unknown year" is a value the student can learn. Numeric fields give a
    quantile-bucket token and a standardised value (plus a null flag).
    """

    names: list[str]  # token fields: categorical, multi-valued, numeric buckets
    tokens: list[np.ndarray]  # per field (I, F) int64, 0 = padding
    numeric: np.ndarray  # (I, 2N) float32: standardised value, null flag
    vocab_size: int  # including the padding id 0
    vocab: dict[str, list[str]] = field(default_factory=dict)  # field -> value names by id offset

    def multi_hot(self) -> np.ndarray:
        """(I, vocab_size) float32; each field's tokens sum to unit norm, so a
        field with many values (genres) weighs as much as a single-valued one."""
        n = self.tokens[0].shape[0] if self.tokens else self.numeric.shape[0]
        out = np.zeros((n, self.vocab_size), dtype=np.float32)
        rows = np.arange(n)
        for tok in self.tokens:
            count = np.maximum((tok > 0).sum(1, keepdims=True), 1).astype(np.float32)  # (I, 1)
            for j in range(tok.shape[1]):
                nz = tok[:, j] > 0
                out[rows[nz], tok[nz, j]] += 1.0 / np.sqrt(count[nz, 0])
        out[:, 0] = 0.0
        return out


def encode_fields(items: pl.DataFrame, kinds: dict[str, list[str]], n_buckets: int = 10) -> FieldFeatures:
    """Tokens and numerics of the item fields classified by `item_field_kinds`.

    Vocabularies and bucket edges come from the whole items table: field
    values are content, known for cold items too, so no interaction leaks in.
    """
    names: list[str] = []
    tokens: list[np.ndarray] = []
    vocab: dict[str, list[str]] = {}
    next_id = 1
    n = items.height
    for name in kinds.get("categorical", []):
        col = items[name].cast(pl.String)
        values = sorted(v for v in col.unique().to_list() if v is not None)
        ids = {v: next_id + 1 + i for i, v in enumerate(values)}  # next_id itself = null token
        tok = np.array([ids.get(v, next_id) for v in col.to_list()], dtype=np.int64)[:, None]  # (I, 1)
        names.append(name)
        tokens.append(tok)
        vocab[name] = ["<null>", *values]
        next_id += 1 + len(values)
    for name in kinds.get("multi", []):
        lists = [[] if v is None else [x for x in v if x is not None] for v in items[name].to_list()]
        values = sorted({x for v in lists for x in v})
        ids = {v: next_id + 1 + i for i, v in enumerate(values)}
        width = max(1, max((len(v) for v in lists), default=1))
        tok = np.zeros((n, width), dtype=np.int64)  # (I, F)
        for r, v in enumerate(lists):
            row = [ids[x] for x in v] or [next_id]  # empty list -> the null token
            tok[r, : len(row)] = row
        names.append(name)
        tokens.append(tok)
        vocab[name] = ["<null>", *values]
        next_id += 1 + len(values)
    numeric_cols = []
    for name in kinds.get("numeric", []):
        x = items[name].cast(pl.Float64).to_numpy()
        null = ~np.isfinite(x)
        vals = x[~null]
        if len(vals):
            edges = np.unique(np.quantile(vals, np.linspace(0, 1, n_buckets + 1)[1:-1]))
            mean, std = float(vals.mean()), float(vals.std()) or 1.0
        else:
            edges, mean, std = np.zeros(0), 0.0, 1.0
        bucket = np.where(null, 0, 1 + np.searchsorted(edges, np.where(null, 0, x), side="right"))
        tok = (next_id + bucket).astype(np.int64)[:, None]  # (I, 1); next_id = null bucket
        names.append(name)
        tokens.append(tok)
        vocab[name] = ["<null>", *[f"<= {e:g}" for e in edges], f"> {edges[-1]:g}" if len(edges) else "all"]
        next_id += 2 + len(edges)
        numeric_cols += [np.where(null, 0.0, (x - mean) / std), null.astype(np.float64)]
    numeric = np.stack(numeric_cols, 1).astype(np.float32) if numeric_cols else np.zeros((n, 0), np.float32)
    return FieldFeatures(names, tokens, numeric, next_id, vocab)


__all__ = ["FieldFeatures", "encode_fields"]
