"""Ranker batches: the `RankBatch` dataclass and the ONE place KeyedJaggedTensors are built.

Shape legend:
    B  requests in a batch
    C  candidates of one request (C_b varies; N = sum_b C_b candidates in all)
    L  history length of one request (L_b varies, capped at max_history)
    F  dense features per candidate

Sparse inputs of a `RankBatch` (all int64 ids, 0-based table rows):
    sequence_features  KJT, stride B, keys ("hist_item", "cand_item"): the
                       jagged history (L_b per request) and the candidates
                       (C_b per request), looked up in ONE item table
                       (EmbeddingCollection): the shared item vocabulary.
    user_features      KJT, stride B: "user" (id) and one key per categorical
                       user field ("user_<field>"), pooled (EmbeddingBagCollection).
    item_features      KJT, stride N: one key per categorical item field
                       ("item_<field>", multi-valued for List(String) fields
                       such as ML-100K genres), pooled per candidate.
Dense input (N, F), candidate order = the jagged order of "cand_item"
(see `recsys.data.dense` for the columns).

Example:
    >>> spec = FeatureSpec(n_items=50, n_users=10)
    >>> batch = synthetic_batch(spec, n_requests=2, history_len=3, n_candidates=4, rng=np.random.default_rng(0))
    >>> batch.sequence_features.keys(), batch.dense.shape
    (['hist_item', 'cand_item'], torch.Size([8, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.dense import COUNT_FEATURES

HIST_KEY = "hist_item"
CAND_KEY = "cand_item"
USER_KEY = "user"


@dataclass(frozen=True)
class FeatureSpec:
    """What the model must know about the inputs: vocabularies and dense width.

    user_fields / item_fields: (KJT key, vocabulary size) per pooled feature;
    user_fields includes the user id key "user" when present.
    """

    n_items: int
    n_users: int
    user_fields: tuple[tuple[str, int], ...] = ()
    item_fields: tuple[tuple[str, int], ...] = ()
    dense_names: tuple[str, ...] = COUNT_FEATURES

    @property
    def n_dense(self) -> int:
        return len(self.dense_names)


@dataclass
class RankBatch:
    """One ranker batch of B requests / N candidates (see the module docstring).

    labels (N,) float32 click label; lt_labels (N,) float32 `returned_1d`;
    lt_mask (N,) bool: LT label usable (lt_observed and not sampled);
    sampled (N,) bool; row_ids (N,) int64 row of interactions.parquet (-1 for
    sampled negatives); cand_lengths (B,) int64 C_b; hist_lengths (B,) int64 L_b.
    """

    sequence_features: KeyedJaggedTensor
    user_features: KeyedJaggedTensor | None
    item_features: KeyedJaggedTensor | None
    dense: Tensor  # (N, F)
    cand_lengths: Tensor  # (B,)
    hist_lengths: Tensor  # (B,)
    labels: Tensor  # (N,)
    lt_labels: Tensor  # (N,)
    lt_mask: Tensor  # (N,)
    sampled: Tensor  # (N,)
    row_ids: Tensor  # (N,)

    @property
    def n_requests(self) -> int:
        return int(self.cand_lengths.shape[0])

    @property
    def n_candidates(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RankBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = None if v is None else v.to(device=torch.device(device), non_blocking=non_blocking)
        return RankBatch(**moved)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices [s_0, s_0+l_0) ++ [s_1, s_1+l_1) ++ ... without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.cumsum(lengths) - lengths  # (K,)
    return np.arange(total, dtype=np.int64) - np.repeat(seg_start - np.asarray(starts, dtype=np.int64), lengths)


# --- THE place KeyedJaggedTensors are built ----------------------------------------------


def _kjt(sparse: dict[str, tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor | None:
    if not sparse:
        return None
    keys = list(sparse)
    values = np.concatenate([sparse[k][0] for k in keys]).astype(np.int64)
    lengths = np.concatenate([sparse[k][1] for k in keys]).astype(np.int64)
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))


def build_batch(
    hist_items: np.ndarray,
    hist_lengths: np.ndarray,
    cand_items: np.ndarray,
    cand_lengths: np.ndarray,
    user_sparse: dict[str, tuple[np.ndarray, np.ndarray]],
    item_sparse: dict[str, tuple[np.ndarray, np.ndarray]],
    dense: np.ndarray,
    labels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    meta: tuple[np.ndarray, np.ndarray] | None = None,
) -> RankBatch:
    """numpy arrays -> RankBatch with its KeyedJaggedTensors (the only KJT constructor).

    hist_items (sum L,), hist_lengths (B,), cand_items (N,), cand_lengths (B,),
    *_sparse: key -> (values, lengths) with B (user) or N (item) lengths,
    dense (N, F); labels = (label, lt_label, lt_mask), meta = (sampled, row_ids).
    """
    n = len(cand_items)
    seq = KeyedJaggedTensor(
        keys=[HIST_KEY, CAND_KEY],
        values=torch.from_numpy(np.concatenate([hist_items, cand_items]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([hist_lengths, cand_lengths]).astype(np.int64)),
    )
    if labels is None:
        labels = (np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, bool))
    if meta is None:
        meta = (np.zeros(n, bool), np.full(n, -1, np.int64))
    return RankBatch(
        sequence_features=seq,
        user_features=_kjt(user_sparse),
        item_features=_kjt(item_sparse),
        dense=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        cand_lengths=torch.from_numpy(np.asarray(cand_lengths, dtype=np.int64)),
        hist_lengths=torch.from_numpy(np.asarray(hist_lengths, dtype=np.int64)),
        labels=torch.from_numpy(labels[0].astype(np.float32)),
        lt_labels=torch.from_numpy(labels[1].astype(np.float32)),
        lt_mask=torch.from_numpy(labels[2].astype(bool)),
        sampled=torch.from_numpy(meta[0].astype(bool)),
        row_ids=torch.from_numpy(meta[1].astype(np.int64)),
    )


def synthetic_batch(
    spec: FeatureSpec, n_requests: int, history_len: int, n_candidates: int, rng: np.random.Generator
) -> RankBatch:
    """A random RankBatch of the given shape for benchmarks and tests: every
    request has exactly `history_len` events and `n_candidates` candidates."""
    b, length, c = n_requests, history_len, n_candidates
    n = b * c
    user_sparse = {}
    for key, vocab in spec.user_fields:
        user_sparse[key] = (rng.integers(0, vocab, b), np.ones(b, np.int64))
    item_sparse = {}
    for key, vocab in spec.item_fields:
        lengths = rng.integers(0, 3, n)
        item_sparse[key] = (rng.integers(0, vocab, int(lengths.sum())), lengths)
    labels = (
        (rng.random(n) < 0.5).astype(np.float32),
        (rng.random(n) < 0.3).astype(np.float32),
        rng.random(n) < 0.8,
    )
    return build_batch(
        hist_items=rng.integers(0, spec.n_items, b * length),
        hist_lengths=np.full(b, length),
        cand_items=rng.integers(0, spec.n_items, n),
        cand_lengths=np.full(b, c),
        user_sparse=user_sparse,
        item_sparse=item_sparse,
        dense=rng.standard_normal((n, spec.n_dense)).astype(np.float32),
        labels=labels,
        meta=(np.zeros(n, bool), np.arange(n, dtype=np.int64)),
    )
