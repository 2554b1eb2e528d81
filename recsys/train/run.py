"""The ranker stage's entry point: read the inputs a pipeline config names, then `fit`.

    train_ranker(cfg, out_dir, tracker) -> metrics dict
        cfg: a PipelineConfig (or anything with .paths, .ranker, .train, .seed)
        writes out_dir/metrics.json and out_dir/predictions.parquet (rank 0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from features.core.errors import UsageError
from features.core.tracker import Tracker
from recsys.data import DataConfig, RankingData, resolve_match_path
from recsys.models.ranker import RankerConfig
from recsys.train.config import TrainConfig
from recsys.train.loop import fit


def data_config(ranker: RankerConfig, train: TrainConfig) -> DataConfig:
    return DataConfig(max_history=ranker.max_history, negatives=train.negatives_per_request,
                      use_match_features=ranker.use_match_features, match_columns=ranker.match_columns)


def ranker_inputs(cfg: Any) -> dict[str, Path | None]:
    """The files a ranker run reads, keyed by their config key (None: not
    used): paths.features, paths.match_features (the parquet file, when
    ranker.use_match_features and the path is not "none") and paths.embeddings
    (when ranker.use_distilled_embeddings != "off"). A requested match or
    embeddings file that is absent is a UsageError (exit 2), never a quiet run
    without it. The CLI checks --out against these before any work."""
    ranker: RankerConfig = cfg.ranker
    paths = cfg.paths
    match = None
    if ranker.use_match_features and paths.match_features.strip().lower() != "none":
        match = resolve_match_path(paths.resolve("match_features"), key="paths.match_features")
    embeddings = None
    if ranker.use_distilled_embeddings != "off":
        embeddings = paths.resolve("embeddings")
        if not embeddings.is_file():
            raise UsageError(f"paths.embeddings: {embeddings} does not exist (ranker.use_distilled_embeddings is "
                             f"{ranker.use_distilled_embeddings!r}); run `recsys distill train` or set it to off")
    return {"paths.features": paths.resolve("features"), "paths.match_features": match, "paths.embeddings": embeddings}


def train_ranker(cfg: Any, out_dir: str | Path, tracker: Tracker | None = None) -> dict[str, Any]:
    """Load the data named by cfg.paths and `fit` (see `recsys.train`).

    cfg: PipelineConfig-like (.paths: PathsConfig, .ranker, .train, .seed).
    Inputs as in `ranker_inputs`: paths.match_features "none" is the one way
    to run without match features while ranker.use_match_features is true.
    """
    ranker: RankerConfig = cfg.ranker
    train: TrainConfig = cfg.train
    seed = train.seed if train.seed is not None else int(getattr(cfg, "seed", 0))
    inputs = ranker_inputs(cfg)
    data = RankingData.load(inputs["paths.features"], data_config(ranker, train), inputs["paths.match_features"],
                            inputs["paths.embeddings"])
    return fit(data, ranker, train, out_dir, tracker, seed=seed)
