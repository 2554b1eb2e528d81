"""The slow, obvious twin of `features.match.kernels.compute_match_features`:
one Python loop per (user, candidate) pair, each feature straight from its
definition (`features.match`). Tests compare the two on random inputs and on
hand-computed goldens."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.match.config import DAY_S, PREFIX, MatchConfig
from features.match.space import Histories, ItemSpace


def reference_match_features(
    space: ItemSpace,
    hist: Histories,
    row_user: np.ndarray,
    cand_rows: np.ndarray,
    hist_end: np.ndarray,
    timestamps: np.ndarray,  # (n,) impression times: the literal recency definition uses them
    cfg: MatchConfig,
) -> dict[str, np.ndarray]:
    """Slow, obvious twin of `compute_match_features`: one Python loop per
    (user, candidate) pair, each feature straight from its definition."""
    n = len(row_user)
    out: dict[str, np.ndarray] = {
        c: np.zeros(n, np.int32 if t == pl.Int32 else np.float32) for c, t in cfg.dtypes().items()
    }
    valid = np.zeros(n, bool)
    k_search = min(cfg.faiss_k, space.index.ntotal)
    for j in range(n):
        u, e = int(row_user[j]), int(hist_end[j])
        length = min(e, cfg.history_cap)
        out[f"{PREFIX}hist_len"][j] = length
        if length == 0 or cand_rows[j] < 0:
            continue
        valid[j] = True
        o = int(hist.offsets[u])
        items = hist.item_rows[o + e - length : o + e]
        item_ts = hist.timestamps[o + e - length : o + e]
        c = space.emb[cand_rows[j]].astype(np.float64)
        sims = np.array([float(np.dot(c, space.emb[i].astype(np.float64))) for i in items])
        desc = np.sort(sims)[::-1]
        out[f"{PREFIX}cos_max"][j] = desc[0]
        out[f"{PREFIX}cos_mean"][j] = sims.mean()
        for k in cfg.top_k:
            out[f"{PREFIX}cos_top{k}"][j] = desc[: min(k, length)].mean()
        out[f"{PREFIX}cos_count_gt"][j] = int((sims > cfg.threshold).sum())
        w = 0.5 ** ((float(timestamps[j]) - item_ts) / (cfg.half_life_days * DAY_S))
        out[f"{PREFIX}cos_recency"][j] = (w * sims).sum() / w.sum()
        out[f"{PREFIX}cos_last"][j] = sims[-1]
        query = space.emb[items].astype(np.float64).mean(axis=0).astype(np.float32)[None, :]
        _, nbr = space.index.search(query, k_search)
        hits = np.flatnonzero(nbr[0] == cand_rows[j])
        out[f"{PREFIX}faiss_rank"][j] = hits[0] + 1 if len(hits) else cfg.faiss_k + 1
        for level in range(cfg.sid_levels):
            same = [space.sid[level, i] == space.sid[level, cand_rows[j]] for i in items]
            out[f"{PREFIX}sid_l{level + 1}"][j] = sum(same)
    out["valid"] = valid
    return out
