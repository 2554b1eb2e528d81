"""features: interactions -> a features folder (parquet tables + manifest.json),
and match features from item embeddings. Imports neither `distill` nor `recsys`.

Public API (everything not listed here is private and may change):

    FeaturesConfig, SyntheticConfig   what to build, from which source
    build_features(config, out)       the features folder (reused when up to date)
    MatchConfig                       the match-feature job's settings
    match_features(features, embeddings, out, config)
                                      mf_* columns per impression from item embeddings

Names resolve lazily, so `import features` stays cheap.
"""

from __future__ import annotations

from features.core.lazy import lazy_exports


from collections.abc import Callable
from pathlib import Path
from typing import Any


# name -> module that defines it: resolved on first use, so `import features` stays cheap
_EXPORTS = {
    "FeaturesConfig": "features.jobs.config",
    "SyntheticConfig": "features.sources",
    "MatchConfig": "features.match.config",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


def _quiet(_msg: str) -> None:
    pass


def _as_config(config: Any, cls: type, what: str) -> Any:
    """`config` as a `cls`: one already, None (the defaults) or a mapping of
    its keys (checked as a config file's section is); else a TypeError."""
    from collections.abc import Mapping

    from features.core.config import from_dict

    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return from_dict(cls, dict(config), where=what)
    raise TypeError(f"{what}: a {cls.__name__} or a mapping of its keys, got {type(config).__name__}")


def build_features(config: Any, out: str | Path, *, force: bool = False, log: Callable[[str], None] = print) -> Any:
    """Build the features folder `out` from `config` (a `FeaturesConfig`, or a
    mapping of its keys such as {"source": "synthetic"}):
    interactions, sequences, items, users and manifest.json. Skipped when
    `out` is up to date (same config and inputs); `force` rebuilds.

    Example (a tiny synthetic catalog, a second or two):
        >>> import tempfile
        >>> from pathlib import Path
        >>> from features import FeaturesConfig, SyntheticConfig, build_features
        >>> out = tempfile.mkdtemp() + "/features"
        >>> cfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=30, items=40, max_events=20))
        >>> result = build_features(cfg, out, log=lambda m: None)
        >>> sorted(p.name for p in Path(out).glob("*.parquet"))[:4]
        ['interactions.parquet', 'items.parquet', 'planted_truth.parquet', 'sequences.parquet']
        >>> build_features(cfg, out, log=lambda m: None).skipped
        True
    """
    from features.jobs import FeaturesConfig as _Config
    from features.jobs import build_features as _build

    return _build(_as_config(config, _Config, "config"), out, force=force, log=log)


def match_features(features: str | Path, embeddings: str | Path, out: str | Path, config: Any = None, *,
                   force: bool = False, log: Callable[[str], None] = print) -> Any:
    """Match features of every impression of the features folder `features`
    against the item vectors in `embeddings` (parquet: item_id, embedding)
    into `out`/match_features.parquet: cosine statistics of the candidate vs
    the user's earlier positives, its faiss rank, semantic-ID overlaps.

    Example (random 8-d vectors stand in for the distilled embeddings):
        >>> import tempfile, numpy as np, polars as pl
        >>> from features import FeaturesConfig, MatchConfig, SyntheticConfig, build_features, match_features
        >>> root = tempfile.mkdtemp()
        >>> cfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=30, items=40, max_events=20))
        >>> _ = build_features(cfg, f"{root}/features", log=lambda m: None)
        >>> ids = pl.read_parquet(f"{root}/features/items.parquet")["item_id"]
        >>> vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
        >>> pl.DataFrame({"item_id": ids, "embedding": vectors.tolist()}).write_parquet(f"{root}/emb.parquet")
        >>> res = match_features(f"{root}/features", f"{root}/emb.parquet", f"{root}/match",
        ...                      MatchConfig(faiss_k=5, sid_codebook_size=4, shards=1, workers=1), log=lambda m: None)
        >>> mf = pl.read_parquet(f"{root}/match/match_features.parquet")
        >>> mf.height == pl.read_parquet(f"{root}/features/interactions.parquet").height, "mf_cos_max" in mf.columns
        (True, True)
    """
    from features.jobs import build_match_features
    from features.match import MatchConfig as _Config

    return build_match_features(features, embeddings, out, _as_config(config, _Config, "config"), force=force, log=log,
                                progress=False)


__all__ = ["FeaturesConfig", "SyntheticConfig", "MatchConfig", "build_features", "match_features"]
