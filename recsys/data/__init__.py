"""Ranker inputs: requests, batches, and the ONE place KeyedJaggedTensors are built.

    read     the match-features location and the item embeddings (tables: features.reader)
    dense    per-impression dense features (counts, activity, match) and standardisation
    content  item/user content fields: categorical id lists, numeric columns
    batch    `RankBatch`, `FeatureSpec` and `build_batch` (the only KJT constructor)
    dataset  `RankingData`: the request index that assembles batches
"""

from features.schemas import MATCH_FILE, MATCH_PREFIX
from recsys.data.batch import (
    CAND_KEY,
    HIST_KEY,
    USER_KEY,
    FeatureSpec,
    RankBatch,
    build_batch,
    concat_ranges,
    synthetic_batch,
)
from recsys.data.dataset import SPLIT_CODE, RankingData
from recsys.data.dense import ACTIVITY_FEATURES, COUNT_FEATURES


__all__ = [
    "ACTIVITY_FEATURES",
    "CAND_KEY",
    "COUNT_FEATURES",
    "HIST_KEY",
    "MATCH_FILE",
    "MATCH_PREFIX",
    "SPLIT_CODE",
    "USER_KEY",
    "FeatureSpec",
    "RankBatch",
    "RankingData",
    "build_batch",
    "concat_ranges",
    "synthetic_batch",
]
