"""Match-feature settings (pipeline config section `match`) and the output
columns they imply. Imports neither torch nor faiss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from features.core.config import to_dict
from features.schemas import MATCH_PREFIX as PREFIX
from features.spark.config import Engine, SparkConfig

DAY_S = 86_400
# negatives: the same kernel over the label-0 history; these of its columns, renamed
NEGATIVE_FROM = {f"{PREFIX}neg_cos_max": f"{PREFIX}cos_max", f"{PREFIX}neg_cos_mean": f"{PREFIX}cos_mean",
                 f"{PREFIX}neg_hist_len": f"{PREFIX}hist_len"}
NEGATIVE_COLUMNS = tuple(NEGATIVE_FROM)


@dataclass(frozen=True)
class MatchConfig:
    """Match-feature job settings (pipeline config section `match`)."""

    history_cap: int = 10_000  # L = min(positives strictly earlier, history_cap)
    top_k: tuple[int, ...] = (5, 20)  # one mf_cos_top{k} column per k
    threshold: float = 0.5  # mf_cos_count_gt counts cosines strictly above this
    half_life_days: float = 30.0  # recency weight halves every this many days of event age
    faiss_k: int = 100  # neighbourhood size of mf_faiss_rank (K+1 when outside)
    sid_levels: int = 3  # residual k-means levels -> mf_sid_l1 .. mf_sid_l{levels}
    sid_codebook_size: int = 64  # centroids per level (clamped to the number of items)
    sid_niter: int = 20  # k-means iterations per level
    seed: int = 0  # k-means seed
    # "error": items of the interactions without a vector fail the job (exit 1);
    # "null": their candidate rows get null features and they are dropped from
    # histories (counted in the manifest)
    missing_items: Literal["error", "null"] | None = "error"  # items without a vector: fail, or null match features for them ("null"; YAML's bare null means the same)
    dim: int = 0  # expected embedding dimension; 0 accepts any (checked for consistency)
    shards: int = 8  # work units of an unsharded run: a killed run resumes after the last finished one
    workers: int = 0  # threads over users (0: one per CPU core); never changes the output
    block_elems: int = 1 << 20  # similarities per tile (memory and cache budget; ~4 MB)
    negatives: bool = False  # also compare with the user's earlier NEGATIVE events (label 0: rated under the threshold, or shown and not clicked): mf_neg_cos_max, mf_neg_cos_mean, mf_neg_hist_len
    folds: int = 0  # out-of-fold features for train rows: K >= 2 refits the student K times, each without one fold of users (a train row's features then come from embeddings that never saw its label); 0: in-sample
    engine: Engine = "polars"  # polars (shards of users in this process) or spark (the same per-user kernel in Spark tasks); identical outputs
    spark: SparkConfig = field(default_factory=SparkConfig)  # engine spark: master URL, partitions, UI, log level

    def __post_init__(self) -> None:
        if self.missing_items is None:  # `missing_items: null` in YAML, as the docs write it
            object.__setattr__(self, "missing_items", "null")
        if self.folds < 0 or self.folds == 1:
            raise ValueError("folds must be 0 (in-sample) or >= 2 (out-of-fold)")
        if self.history_cap < 1:
            raise ValueError("history_cap must be >= 1")
        if not self.top_k or any(k < 1 for k in self.top_k) or len(set(self.top_k)) != len(self.top_k):
            raise ValueError("top_k must be a non-empty list of distinct integers >= 1")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be a cosine in [-1, 1]")
        if not (self.half_life_days > 0 and math.isfinite(self.half_life_days)):
            raise ValueError("half_life_days must be > 0")
        if self.faiss_k < 1:
            raise ValueError("faiss_k must be >= 1")
        if not 1 <= self.sid_levels <= 8:
            raise ValueError("sid_levels must be in 1..8")
        if self.sid_codebook_size < 2:
            raise ValueError("sid_codebook_size must be >= 2")
        if self.sid_niter < 1:
            raise ValueError("sid_niter must be >= 1")
        if self.dim < 0:
            raise ValueError("dim must be >= 0 (0: any)")
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0: one per CPU core)")
        if self.block_elems < 1024:
            raise ValueError("block_elems must be >= 1024")

    def columns(self) -> list[str]:
        """Output feature columns, in file order."""
        return [
            f"{PREFIX}cos_max",
            f"{PREFIX}cos_mean",
            *(f"{PREFIX}cos_top{k}" for k in self.top_k),
            f"{PREFIX}cos_count_gt",
            f"{PREFIX}cos_recency",
            f"{PREFIX}cos_last",
            f"{PREFIX}faiss_rank",
            *(f"{PREFIX}sid_l{level + 1}" for level in range(self.sid_levels)),
            f"{PREFIX}hist_len",
            *(NEGATIVE_COLUMNS if self.negatives else ()),
        ]

    def dtypes(self) -> dict[str, pl.DataType]:
        ints = {f"{PREFIX}cos_count_gt", f"{PREFIX}faiss_rank", f"{PREFIX}hist_len", f"{PREFIX}neg_hist_len"}
        return {c: (pl.Int32 if c in ints or c.startswith(f"{PREFIX}sid_") else pl.Float32) for c in self.columns()}

    def relevant(self) -> dict[str, Any]:
        """Keys that change the output (`shards`, `workers`, `engine` and
        `spark` only decide how and where the work runs)."""
        d = to_dict(self)
        for k in ("shards", "workers", "engine", "spark"):
            d.pop(k)
        return d

