"""Feature jobs: the only part of `features` that reads and writes files.

- `config`: `FeaturesConfig` (section `features`), light;
- `build`: `build_features`, a source -> the features folder, on either
  engine (`features.engine`: polars here, spark in `features.spark`);
- `steps`: the build's steps, the one implementation both engines run;
- `uri`: input/output locations as paths or file:// URIs;
- `stats`: `summarize`, `describe`, `format_stats` (`recsys data describe`);
- `match`: `build_match_features`, features + embeddings -> match features,
  in resumable shards, or on Spark (`match.engine`); the per-user step both
  engines run is `match_rows` (the computation is `features.match`).
"""

from features.jobs.build import BuildResult, build_features, load_source
from features.jobs.config import DEFAULT_DAY_OFFSET_S, JOB, JOB_VERSION, FeaturesConfig
from features.jobs.match import (
    MATCH_JOB,
    MatchResult,
    build_match_features,
    concat_match_shards,
    match_shard_dir,
    parse_shard,
)
from features.jobs.stats import describe, format_stats, summarize

__all__ = [
    "DEFAULT_DAY_OFFSET_S",
    "JOB",
    "JOB_VERSION",
    "MATCH_JOB",
    "FeaturesConfig",
    "BuildResult",
    "build_features",
    "load_source",
    "describe",
    "format_stats",
    "summarize",
    "MatchResult",
    "build_match_features",
    "concat_match_shards",
    "match_shard_dir",
    "parse_shard",
]
