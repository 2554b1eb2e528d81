"""A tiny planted world for protocol and generalisation tests: items with a
content vector and a collaborative factor, users drawing positives in time
order, turned into the features tables `prepare_cold_start` reads.

`content_share` sets how much of an item's collaborative factor its content
determines: 1 = a fixed linear map of the content, 0 = independent noise.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features import schemas as S


def planted_world(
    *, n_items: int = 300, n_users: int = 500, seq_len: int = 30, content_dim: int = 32, factor_dim: int = 8,
    content_share: float = 1.0, seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, np.ndarray]:
    """(interactions, sequences, items, content (I, T)): every event is a
    positive; events are split 80/10/10 in global time order."""
    rng = np.random.default_rng(seed)
    content = rng.standard_normal((n_items, content_dim)).astype(np.float32)  # (I, T)
    a = rng.standard_normal((content_dim, factor_dim)) / np.sqrt(content_dim)
    from_content = content @ a  # (I, F): what content determines
    noise = rng.standard_normal((n_items, factor_dim))
    factor = np.sqrt(content_share) * from_content / from_content.std() + np.sqrt(1 - content_share) * noise  # (I, F)
    rows = []
    for u in range(n_users):
        pref = rng.standard_normal(factor_dim)
        logits = 2.0 * factor @ pref / np.sqrt(factor_dim)
        p = np.exp(logits - logits.max())
        seq = rng.choice(n_items, seq_len, replace=False, p=p / p.sum())
        times = np.sort(rng.uniform(0, 1, seq_len))
        rows += [(u, int(i), float(t), k) for k, (i, t) in enumerate(zip(seq, times))]
    ev = pl.DataFrame(rows, schema=["u", "i", "t", "k"], orient="row").sort("t")
    n = ev.height
    split = np.where(np.arange(n) < 0.8 * n, "train", np.where(np.arange(n) < 0.9 * n, "valid", "test"))
    ev = ev.with_columns(pl.Series(S.SPLIT, split))
    inter = ev.select(
        pl.col("u").cast(pl.Int64).alias(S.USER_ID),
        pl.col("i").cast(pl.Int64).alias(S.ITEM_ID),
        pl.lit(1).cast(pl.Int8).alias(S.LABEL),
        pl.col(S.SPLIT),
        pl.col("k").cast(pl.Int64).alias(S.HIST_END),
        pl.col("k").cast(pl.Int64).alias(S.POS_HIST_END),
        pl.col("k").cast(pl.Int64).alias(S.POS_HIST_LEN),
    )
    seqs = ev.sort("u", "k").group_by("u", maintain_order=True).agg(pl.col("i").cast(pl.Int64))
    seqs = seqs.select(pl.col("u").cast(pl.Int64).alias(S.USER_ID), pl.col("i").alias(S.ITEM_IDS), pl.col("i").alias(S.POS_ITEM_IDS))
    n_train = np.bincount(ev.filter(pl.col(S.SPLIT) == "train")["i"].to_numpy(), minlength=n_items)
    items = pl.DataFrame({S.ITEM_ID: np.arange(n_items, dtype=np.int64), S.N_TRAIN: n_train.astype(np.int64)})
    return inter, seqs, items, content
