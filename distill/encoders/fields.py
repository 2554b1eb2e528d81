"""Item fields (categorical, multi-valued, numeric) as tokens of one shared
vocabulary plus standardised numerics.

Shape legend:
    I  items
    F  field tokens of one field per item (padded with 0)
    N  numeric fields (2 columns each: standardised value, null flag)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from features.core.errors import DataError
from features.core.numeric import Z_CLIP, finite_mean_std


def _quantiles(values: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """np.quantile's interpolated edges; where interpolating between values
    near the float limits overflows (+-1e308 gave edges of +-inf), the value
    below instead (a probe, 2026-12-01)."""
    with np.errstate(over="ignore", invalid="ignore"):
        edges = np.quantile(values, probs)
    bad = ~np.isfinite(edges)
    if bad.any():
        edges[bad] = np.quantile(values, probs[bad], method="lower")
    return edges


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




@dataclass
class FieldEncoder:
    """Item-field encodings fitted on a catalog (`fit`) and applied to any items
    (`transform`): vocabularies, numeric bucket edges and standardisation stay
    those of the fitted catalog, so a token means the same thing for a new
    item; a value the catalog never had becomes the field's null token.
    Plain data (JSON-serialisable with dataclasses.asdict), so a serving
    bundle can freeze it."""

    kinds: dict[str, list[str]]
    values: dict[str, list[str]] = field(default_factory=dict)  # categorical / multi field -> sorted values
    numeric: dict[str, list[Any]] = field(default_factory=dict)  # numeric field -> [edges, mean, std]

    @classmethod
    def fit(cls, items: pl.DataFrame, kinds: dict[str, list[str]], n_buckets: int = 10) -> FieldEncoder:
        out = cls({k: list(v) for k, v in kinds.items()})
        for name in kinds.get("categorical", []):
            out.values[name] = sorted(v for v in items[name].cast(pl.String).unique().to_list() if v is not None)
        for name in kinds.get("multi", []):
            out.values[name] = sorted({x for v in items[name].to_list() if v is not None for x in v if x is not None})
        for name in kinds.get("numeric", []):
            x = items[name].cast(pl.Float64).to_numpy()
            vals = x[np.isfinite(x)]
            if len(vals):
                edges = np.unique(_quantiles(vals, np.linspace(0, 1, n_buckets + 1)[1:-1]))
                mean, std = finite_mean_std(vals)
                out.numeric[name] = [edges.tolist(), mean, std or 1.0]
            else:
                out.numeric[name] = [[], 0.0, 1.0]
        return out

    def columns(self) -> list[str]:
        return [c for kind in ("categorical", "multi", "numeric", "image") for c in self.kinds.get(kind, [])]

    def transform(self, items: pl.DataFrame) -> Any:
        """`FieldFeatures` of `items` with the frozen encodings (ids as in training)."""
        names, tokens, vocab, numeric_cols = [], [], {}, []
        next_id, n = 1, items.height
        for name in self.kinds.get("categorical", []):
            values = self.values[name]
            ids = {v: next_id + 1 + i for i, v in enumerate(values)}
            col = items[name].cast(pl.String).to_list() if name in items.columns else [None] * n
            tokens.append(np.array([ids.get(v, next_id) for v in col], dtype=np.int64)[:, None])  # (I, 1)
            names.append(name)
            vocab[name] = ["<null>", *values]
            next_id += 1 + len(values)
        for name in self.kinds.get("multi", []):
            values = self.values[name]
            ids = {v: next_id + 1 + i for i, v in enumerate(values)}
            if name in items.columns and items[name].dtype == pl.String:
                # iterating a string would read its characters as values: every row the null token
                raise ValueError(
                    f"items column {name!r} is a multi-valued field (a list of strings per item), got one string "
                    f"per item: split it first, e.g. pl.col({name!r}).str.split('|') (the features build does so "
                    f"for files: features.multi_value_sep)"
                )
            raw = items[name].to_list() if name in items.columns else [None] * n
            lists = [[ids[x] for x in (v or []) if x in ids] for v in raw]
            width = max(1, max((len(v) for v in lists), default=1))
            tok = np.zeros((n, width), dtype=np.int64)  # (I, F)
            for r, row in enumerate(lists):
                row = row or [next_id]  # empty or unknown values only -> the null token
                tok[r, : len(row)] = row
            tokens.append(tok)
            names.append(name)
            vocab[name] = ["<null>", *values]
            next_id += 1 + len(values)
        for name in self.kinds.get("numeric", []):
            edges_l, mean, std = self.numeric[name]
            edges = np.asarray(edges_l, dtype=np.float64)
            x = items[name].cast(pl.Float64).to_numpy() if name in items.columns else np.full(n, np.nan)
            inf = np.isinf(x)
            if inf.any():  # the features build refuses them: a new item's inf is no missing value either
                raise DataError(f"an infinite value in numeric field {name!r} (a missing value is null or NaN)",
                                column=name, rows=np.flatnonzero(inf)[:5].tolist())
            null = ~np.isfinite(x)
            bucket = np.where(null, 0, 1 + np.searchsorted(edges, np.where(null, 0, x), side="right"))
            tokens.append((next_id + bucket).astype(np.int64)[:, None])
            names.append(name)
            vocab[name] = ["<null>", *[f"<= {e:g}" for e in edges], f"> {edges[-1]:g}" if len(edges) else "all"]
            next_id += 2 + len(edges)
            # |z| <= sqrt(n - 1) on the catalog the stats came from, so the clip
            # never touches a training value (under 10^8 items); it keeps a new
            # item's absurd value (1e25) from overflowing the MLP into NaN
            with np.errstate(over="ignore", invalid="ignore"):  # a huge value: +-inf, clipped below
                z = np.where(null, 0.0, (x - mean) / std)
            z = np.clip(np.nan_to_num(z, nan=0.0, posinf=Z_CLIP, neginf=-Z_CLIP), -Z_CLIP, Z_CLIP)
            numeric_cols += [z, null.astype(np.float64)]
        numeric = np.stack(numeric_cols, 1).astype(np.float32) if numeric_cols else np.zeros((n, 0), np.float32)
        return FieldFeatures(names, tokens, numeric, next_id, vocab)


def encode_fields(items: pl.DataFrame, kinds: dict[str, list[str]], n_buckets: int = 10) -> FieldFeatures:
    """Tokens and numerics of the item fields classified by `item_field_kinds`.

    Vocabularies and bucket edges come from the whole items table: field
    values are content, known for cold items too, so no interaction leaks in.
    """
    return FieldEncoder.fit(items, kinds, n_buckets).transform(items)


__all__ = ["FieldEncoder", "FieldFeatures", "encode_fields"]
