"""The pipeline config: one YAML file, one section per stage.

Each section is a frozen dataclass that lives beside its component; this
module only knows where each one lives (SECTIONS) and fills them strictly:
an unknown section or key, or a wrong type, is a ConfigError (exit 2) that
names the dotted key. Sections missing from the file take their defaults.

    features:  features.jobs.FeaturesConfig
    match:     features.match.MatchConfig
    teachers:  distill.teachers.TeachersConfig
    distill:   distill.train.DistillConfig
    ranker:    recsys.models.ranker.RankerConfig
    train:     recsys.train.TrainConfig
    lightgbm:  recsys.models.lightgbm_ranker.LightGBMConfig
    tracking:  recsys.tracking.TrackingConfig
    paths:     recsys.config.PathsConfig
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from features.config import config_hash, from_dict, load_mapping
from features.errors import ConfigError


@dataclass(frozen=True)
class PathsConfig:
    """Where stages read and write (relative paths resolve against the working
    directory). Empty strings mean "derive from `root`"."""

    root: str = "artifacts/ml100k"  # working folder of a pipeline run
    features: str = ""  # default: {root}/features
    match_features: str = ""  # default: {root}/match ; "none" disables match features
    embeddings: str = ""  # item embeddings parquet; default: {root}/distill/item_embeddings.parquet

    def resolve(self, name: str) -> Path:
        value = getattr(self, name)
        defaults = {
            "features": "features",
            "match_features": "match",
            "embeddings": "distill/item_embeddings.parquet",
        }
        if value:
            return Path(value)
        return Path(self.root) / defaults[name]


SECTIONS: dict[str, str] = {
    "features": "features.jobs:FeaturesConfig",
    "match": "features.match:MatchConfig",
    "teachers": "distill.teachers:TeachersConfig",
    "distill": "distill.train:DistillConfig",
    "ranker": "recsys.models.ranker:RankerConfig",
    "train": "recsys.train:TrainConfig",
    "lightgbm": "recsys.models.lightgbm_ranker:LightGBMConfig",
    "tracking": "recsys.tracking:TrackingConfig",
    "paths": "recsys.config:PathsConfig",
}
SCALARS: dict[str, type] = {"seed": int, "name": str}


def section_class(name: str) -> type:
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class PipelineConfig:
    """Validated pipeline config. `cfg.ranker`, `cfg.train`, ... are the
    section dataclasses (defaults where the file had no such section)."""

    def __init__(self, data: Mapping[str, Any] | None = None, *, where: str = "config") -> None:
        data = dict(data or {})
        unknown = [k for k in data if k not in SECTIONS and k not in SCALARS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], [*SECTIONS, *SCALARS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown section {unknown[0]!r}{hint}; sections: {', '.join([*SECTIONS, *SCALARS])}"
            )
        for key, tp in SCALARS.items():
            if key in data and (not isinstance(data[key], tp) or isinstance(data[key], bool)):
                raise ConfigError(f"{where}.{key}: expected {tp.__name__}, got {data[key]!r}")
        self.raw = data
        self.where = where
        self.seed: int = data.get("seed", 0)
        self.name: str = data.get("name", "pipeline")
        # validate every section present in the file now, before any work
        for key in data:
            if key in SECTIONS:
                getattr(self, key)

    def _section(self, name: str) -> Any:
        return from_dict(section_class(name), self.raw.get(name) or {}, where=f"{self.where}.{name}")

    def __getattr__(self, name: str) -> Any:
        if name in SECTIONS:
            value = self._section(name)
            self.__dict__[name] = value
            return value
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """Resolved config: every section with defaults filled in."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed}
        for name in SECTIONS:
            try:
                section = getattr(self, name)
            except (ImportError, AttributeError):  # a stage not installed in this build
                continue
            out[name] = dataclasses.asdict(section)
        return out

    @cached_property
    def hash(self) -> str:
        return config_hash(self.to_dict())


def load_pipeline_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML/JSON (or defaults when path is None), apply overrides."""
    from features.config import deep_merge

    data = load_mapping(path) if path else {}
    if overrides:
        data = deep_merge(data, overrides)
    return PipelineConfig(data, where=str(path) if path else "config")
