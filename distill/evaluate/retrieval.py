"""Retrieval task (`Impressions`), for each positive impression of a split:
- query history: the user's strictly earlier positives (features columns
  `pos_hist_end`/`pos_hist_len` into `sequences.pos_item_ids`), the most recent
  `history_len` kept, right-aligned. It includes valid/test-period events and
  held-out items: they are the user's real past; the student embeds any item
  from content, a teacher drops the items it does not know.
- candidates: ALL items of items.parquet (a teacher: the items it knows).
- excluded from the ranking: every item of the user's strictly earlier
  history, positive or not (`sequences.item_ids[:hist_end]`): re-recommending
  an item the user already rated is not what cold-start retrieval measures.
  Impressions whose target is in that history (repeat consumption) are
  dropped, as are impressions without any earlier positive (no query). Both
  counts are reported (`n_{split}_skipped_*`).
- hit: target in the top k; Recall@k is the share of hits, reported
  separately for warm and cold targets.

Queries: for embedding models (student, raw content, ID teacher), the mean of
the last `query_len` history items' L2-normalised embeddings (an ID teacher
uses its last `query_len` known items); for the sequence teacher, its own
history encoder. A model without a query for an impression (an ID teacher
when no history item is known) scores a miss there.

Shape legend:
    I  items, N impressions, H history kept per impression
    D  embedding dim, K results per query
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from distill.evaluate.cold_start import Impressions
from distill.evaluate.metrics import recall_at_k
from distill.config import IndexConfig
from distill.index import build_index, search_excluding
from features.core.numeric import l2_normalise

GROUPS = ("warm", "cold", "all")


def last_items(hist: np.ndarray, q: int, usable: np.ndarray | None = None) -> np.ndarray:
    """The last q entries of right-aligned histories (N, H) -> (N, q), keeping only
    items flagged in `usable` (I,) when given (order preserved, -1 padded)."""
    h = np.asarray(hist)
    if usable is not None:
        keep = (h >= 0) & usable[np.maximum(h, 0)]
        order = np.argsort(keep, axis=1, kind="stable")  # False first: kept entries move right
        h = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(h, order, 1), -1)
    h = h[:, -q:]
    if h.shape[1] < q:
        h = np.pad(h, ((0, 0), (q - h.shape[1], 0)), constant_values=-1)
    return h


def mean_queries(item_emb: np.ndarray, hist: np.ndarray, q: int, usable: np.ndarray | None = None, normalize: bool = True) -> np.ndarray:
    """Mean of the last q usable history items' embeddings (L2-normalised first
    when `normalize`), (N, D); rows without a usable item are zero."""
    e = l2_normalise(item_emb) if normalize else np.asarray(item_emb, dtype=np.float32)
    h = last_items(hist, q, usable)  # (N, q)
    m = (h >= 0).astype(np.float32)  # (N, q)
    x = e[np.maximum(h, 0)] * m[..., None]  # (N, q, D)
    out = x.sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
    return l2_normalise(out) if normalize else out.astype(np.float32)


def rank_items(
    item_emb: np.ndarray,
    queries: np.ndarray,
    imps: Impressions,
    k: int,
    *,
    candidates: np.ndarray | None = None,
    index_cfg: IndexConfig = IndexConfig(),
) -> np.ndarray:
    """Top-k dense item ids (N, k) per impression, -1 padded, the user's history
    excluded; only `candidates` (I,) bool items are indexed when given. A zero
    query (no usable history) returns an empty row (a miss)."""
    n_items = len(item_emb)
    cand = np.arange(n_items) if candidates is None else np.flatnonzero(candidates)
    out = np.full((len(imps), k), -1, dtype=np.int64)
    has_q = np.abs(queries).sum(1) > 0
    if len(cand) == 0 or not has_q.any():
        return out
    local_of = np.full(n_items, -1, dtype=np.int64)
    local_of[cand] = np.arange(len(cand))
    index = build_index(np.ascontiguousarray(item_emb[cand], dtype=np.float32), index_cfg)
    rows = np.flatnonzero(has_q)
    excl = imps.excluded()
    excl_local = [e[e >= 0] for e in (local_of[excl[r]] for r in rows)]
    ids = search_excluding(index, queries[rows], k, excl_local)  # (n, k) local ids
    out[rows] = np.where(ids >= 0, cand[np.maximum(ids, 0)], -1)
    return out


def recall_report(ranked: np.ndarray, imps: Impressions, ks: Sequence[int], name: str, groups: Sequence[str] = GROUPS) -> dict[str, float]:
    """{f"recall@{k}_{group}_{name}": value} for warm, cold and all targets."""
    out = {}
    masks = {"warm": ~imps.cold, "cold": imps.cold, "all": np.ones(len(imps), dtype=bool)}
    for g in groups:
        m = masks[g]
        for k in ks:
            out[f"recall@{k}_{g}_{name}"] = recall_at_k(ranked[m], imps.targets[m], k)
    return out


@dataclass
class Retriever:
    """One model under evaluation: item vectors, how it builds queries, and
    which items it can retrieve (None: all)."""

    item_emb: np.ndarray  # (I, D)
    query_fn: Callable[[Impressions], np.ndarray]  # -> (N, D)
    candidates: np.ndarray | None = None  # (I,) bool
    groups: tuple[str, ...] = GROUPS


def embedding_retriever(item_emb: np.ndarray, q: int, usable: np.ndarray | None = None, normalize: bool = True) -> Retriever:
    """Mean-of-last-q-items retrieval over `item_emb` (cosine when `normalize`)."""
    e = l2_normalise(item_emb) if normalize else np.asarray(item_emb, dtype=np.float32)
    groups = GROUPS if usable is None else ("warm",)
    return Retriever(e, lambda imps: mean_queries(e, imps.hist, q, usable, normalize), usable, groups)


def evaluate_retrievers(
    retrievers: Mapping[str, Retriever],
    imps: Impressions,
    ks: Sequence[int],
    index_cfg: IndexConfig = IndexConfig(),
    ranked_out: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Recall@k per model and target group on one split's impressions; each
    model's ranking (N, max k) also lands in `ranked_out` when given."""
    out: dict[str, float] = {}
    kmax = max(ks)
    for name, r in retrievers.items():
        ranked = rank_items(r.item_emb, r.query_fn(imps), imps, kmax, candidates=r.candidates, index_cfg=index_cfg)
        out.update(recall_report(ranked, imps, ks, name, r.groups))
        if ranked_out is not None:
            ranked_out[name] = ranked
    return out


def selection_score(
    item_emb: np.ndarray,
    imps: Impressions,
    q: int,
    k: int,
    usable: np.ndarray | None = None,
    groups: Sequence[str] = ("warm", "cold"),
) -> float:
    """The valid-split choice metric: Recall@k averaged over `groups` (warm
    and/or cold targets; warm only when the model can only retrieve `usable`
    items; an empty group is left out), exact search. NaN when no group has
    a target (no valid impressions): there is nothing to choose on, which
    `BestOnValid` reads as no score (a 0.0 would keep the first epoch)."""
    r = embedding_retriever(item_emb, q, usable)
    m = evaluate_retrievers({"m": r}, imps, [k])
    vals = [v for key, v in m.items() if not np.isnan(v) and key.split("_")[1] in groups]
    return float(np.mean(vals)) if vals else float("nan")


__all__ = [
    "GROUPS",
    "Retriever",
    "last_items",
    "mean_queries",
    "rank_items",
    "recall_report",
    "embedding_retriever",
    "evaluate_retrievers",
    "selection_score",
]
