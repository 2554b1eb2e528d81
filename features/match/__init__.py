"""Match features: how well a candidate item fits the user's positive history.

For every impression (user, candidate item, time) the history is the user's
positive events strictly earlier in time, capped to the last `history_cap`:
`pos_item_ids[pos_hist_end - L : pos_hist_end]` with L = min(pos_hist_end, cap)
(features/schemas.py). Ties in time are already excluded by `pos_hist_end`.
Item embeddings are L2-normalised, so dot products are cosines.

Columns (all prefixed `mf_`; every one but `mf_hist_len` is null when the
history is empty or the candidate has no embedding, never a silent zero):

    mf_cos_max        max_k s_k                      s_k = cos(candidate, history item k)
    mf_cos_mean       mean_k s_k
    mf_cos_top{k}     mean of the min(k, L) largest s_k (one column per k in `top_k`)
    mf_cos_count_gt   #{k : s_k > threshold}
    mf_cos_recency    sum_k w_k s_k / sum_k w_k      w_k = 2^(-(t - t_k) / half_life)
    mf_cos_last       s of the newest history item (sequence order breaks time ties)
    mf_faiss_rank     rank (1..K) of the candidate among all items by inner product
                      with the mean history embedding (faiss IndexFlatIP); K+1 if not in the top K
    mf_sid_l{l}       #history items whose semantic-ID prefix of length l equals the candidate's
    mf_hist_len       L (history items used; 0 for an empty history)

Layout: `config` (MatchConfig, the output columns), `space` (item vectors,
semantic IDs, faiss index, jagged histories), `kernels` (the fast op,
`compute_match_features`, and `to_frame`), `reference` (its slow, obvious
twin, one loop per pair), `validation` (checks of an embeddings table). The
job that reads and writes files is `features.jobs.match`.

Cost (C candidate rows of a user, L its history length, D embedding dim, N
items): the products are 2*C*L*D flops per user; the faiss rank costs N*D per
distinct history window (one per ranking request, up to one per impression in
logs), which dominates for catalogues much larger than the histories.

>>> import numpy as np
>>> cfg = MatchConfig(top_k=(2,), sid_codebook_size=2, faiss_k=2)
>>> emb = np.eye(3, dtype=np.float32)
>>> space = ItemSpace.build(np.array([10, 11, 12]), emb, cfg)
>>> hist = Histories.from_lists([space.rows(np.array([10, 11]))[0]], [np.array([0, 86_400])])
>>> out = compute_match_features(space, hist, np.array([0]), space.rows(np.array([10]))[0], np.array([2]), cfg)
>>> float(out["mf_cos_max"][0]), float(out["mf_cos_mean"][0]), int(out["mf_hist_len"][0])
(1.0, 0.5, 2)
"""

from features.match.config import DAY_S, PREFIX, MatchConfig
from features.match.kernels import compute_match_features, to_frame
from features.match.reference import reference_match_features
from features.match.space import Histories, ItemSpace, prefix_ids, semantic_ids, stable_shard
from features.match.validation import EMBEDDING, check_missing_items, validate_embeddings

__all__ = [
    "DAY_S",
    "EMBEDDING",
    "PREFIX",
    "MatchConfig",
    "ItemSpace",
    "Histories",
    "compute_match_features",
    "reference_match_features",
    "to_frame",
    "stable_shard",
    "semantic_ids",
    "prefix_ids",
    "validate_embeddings",
    "check_missing_items",
]
