"""The inputs of the match op: normalised item vectors with their semantic
IDs and faiss index (`ItemSpace`), jagged positive histories (`Histories`),
and the stable user -> shard hash the job splits work by.

Shape legend: N items, D embedding dim, V semantic-ID levels, U users of a
block, M_total their positive events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.core.numeric import l2_normalise
from features.match.config import MatchConfig


def semantic_ids(emb: np.ndarray, levels: int, codebook_size: int, niter: int, seed: int) -> np.ndarray:
    """Residual k-means codes (V, N): level l clusters what levels < l left unexplained."""
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)  # (N, D)
    k = min(codebook_size, x.shape[0])
    codes = np.empty((levels, x.shape[0]), dtype=np.int64)
    for level in range(levels):
        # min_points_per_centroid=1: small catalogues are fine, silence faiss' warning
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + level, verbose=False, min_points_per_centroid=1)
        km.train(x)
        _, assign = km.index.search(x, 1)  # (N, 1)
        codes[level] = assign[:, 0]
        x = np.ascontiguousarray(x - km.centroids[assign[:, 0]])
    return codes


def prefix_ids(codes: np.ndarray) -> np.ndarray:
    """(V, N) codes -> (V, N) dense ids of the code prefix up to each level:
    two items share id at level l iff their first l+1 codes agree."""
    out = np.empty_like(codes)
    prev = np.zeros(codes.shape[1], dtype=np.int64)
    for level in range(codes.shape[0]):
        key = prev * (int(codes[level].max()) + 1) + codes[level]
        _, prev = np.unique(key, return_inverse=True)
        out[level] = prev
    return out


@dataclass(frozen=True)
class ItemSpace:
    """Normalised item embeddings, their semantic-ID prefixes and a faiss index."""

    item_ids: np.ndarray  # (N,) int64, sorted
    emb: np.ndarray  # (N, D) float32, unit rows
    sid: np.ndarray  # (V, N) int64 prefix ids per level
    index: Any = field(repr=False)  # faiss.IndexFlatIP over emb

    @classmethod
    def build(cls, item_ids: np.ndarray, emb: np.ndarray, cfg: MatchConfig) -> ItemSpace:
        """`emb` rows must be finite and non-zero (the job validates files)."""
        import faiss

        order = np.argsort(np.asarray(item_ids, dtype=np.int64), kind="stable")
        ids = np.asarray(item_ids, dtype=np.int64)[order]
        # eps 0: the job rejects zero rows, so every norm is a true divisor
        e = np.ascontiguousarray(l2_normalise(np.asarray(emb, dtype=np.float32)[order], eps=0.0))  # (N, D)
        codes = semantic_ids(e, cfg.sid_levels, cfg.sid_codebook_size, cfg.sid_niter, cfg.seed)
        index = faiss.IndexFlatIP(e.shape[1])
        index.add(e)
        return cls(ids, e, prefix_ids(codes), index)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in `emb` (-1 where absent) and the found mask."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, ids), len(self.item_ids) - 1)
        found = self.item_ids[pos] == ids
        return np.where(found, pos, -1), found


@dataclass(frozen=True)
class Histories:
    """Jagged positive histories of a block of users (time-sorted per user)."""

    offsets: np.ndarray  # (U+1,) int64: user u's positives are [offsets[u], offsets[u+1])
    item_rows: np.ndarray  # (M_total,) int64 rows into ItemSpace.emb
    timestamps: np.ndarray  # (M_total,) int64 unix seconds

    @classmethod
    def from_lists(cls, rows: Sequence[np.ndarray], timestamps: Sequence[np.ndarray]) -> Histories:
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat = np.concatenate([np.asarray(r, np.int64) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        ts = np.concatenate([np.asarray(t, np.int64) for t in timestamps]) if len(rows) else np.zeros(0, np.int64)
        return cls(offsets, flat, ts)

    def drop(self, keep: np.ndarray, hist_end: np.ndarray, row_user: np.ndarray) -> tuple[Histories, np.ndarray]:
        """Remove history events (keep[i] False) and remap each row's
        `hist_end` to the number of kept events before it."""
        kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])  # (M_total+1,)
        new_off = kept_before[self.offsets]
        start = self.offsets[row_user]
        new_end = kept_before[start + hist_end] - kept_before[start]
        return Histories(new_off, self.item_rows[keep], self.timestamps[keep]), new_end


def stable_shard(user_ids: np.ndarray, n: int) -> np.ndarray:
    """Shard of each user in 0..n-1 from a fixed integer hash (splitmix64),
    the same on every machine, run and library version."""
    z = np.asarray(user_ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n)).astype(np.int64)
