"""The pipeline config: one YAML file, one section per stage, read once.

`load_pipeline_config` (or `PipelineConfig.from_mapping`) builds a frozen
`PipelineConfig` strictly: an unknown section or key, a renamed key or a
wrong type is a ConfigError (exit 2) that names the dotted key. Sections
missing from the file take their defaults, and the defaults are the frozen
baseline (experiments/configs/base.yaml is `recsys config show` of them).
Every section class imports no torch:

    features:  features.jobs.config.FeaturesConfig
    match:     features.match.config.MatchConfig
    teachers:  distill.config.TeachersConfig
    distill:   distill.config.DistillConfig
    data:      recsys.config.sections.DataConfig
    ranker:    recsys.config.sections.RankerConfig
    train:     recsys.config.sections.TrainConfig
    lightgbm:  recsys.config.sections.LightGBMConfig
    tracking:  recsys.tracking.config.TrackingConfig
    paths:     recsys.config.sections.PathsConfig

What each stage does with them is decided once, in `recsys.plan`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, TeachersConfig
from features.core.config import config_hash, deep_merge, from_dict, load_mapping
from features.core.errors import ConfigError
from features.jobs.config import FeaturesConfig
from features.match.config import MatchConfig
from recsys.config.sections import (
    RENAMED_HISTORY_ENCODERS,
    DataConfig,
    LightGBMConfig,
    PathsConfig,
    RankerConfig,
    TrainConfig,
)
from recsys.tracking.config import TrackingConfig

# keys that moved: an old config gets a pointer to the new place, never a silent default
RENAMED: dict[str, str] = {
    "ranker.max_history": "data.history_cap",
    "ranker.use_match_features": "data.use_match_features",
    "ranker.match_columns": "data.match_columns",
    "train.negatives_per_request": "data.negatives_per_request",
    "features.max_history": "features.history_cap",
    "features.synthetic.max_history": "features.synthetic.max_events",
    "features.synthetic.min_history": "features.synthetic.min_events",
}


@dataclass(frozen=True)
class PipelineConfig:
    """Validated pipeline config: `cfg.ranker`, `cfg.train`, ... are the
    section dataclasses (defaults where the file had no such section)."""

    name: str = "pipeline"  # run name shown in MLflow
    seed: int = 0  # the one global seed (the CLI seeds once and logs it)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lightgbm: LightGBMConfig = field(default_factory=LightGBMConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None = None, *, where: str = "config") -> PipelineConfig:
        """Strictly build the config from a parsed YAML/JSON mapping."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if {"experiment", "arms"} <= set(data):
                hint = (f" (an A/B experiment file, not a pipeline config: run it with `recsys experiment run`, "
                        f"or pass its baseline, {data.get('baseline')!r}, relative to the experiment file)")
            raise ConfigError(f"{where}: unknown section {unknown[0]!r}{hint}; sections: {', '.join(names)}")
        for old, new in RENAMED.items():
            *parents, leaf = old.split(".")
            node: Any = data
            for p in parents:
                node = node.get(p) if isinstance(node, Mapping) else None
            if isinstance(node, Mapping) and leaf in node:
                raise ConfigError(f"{where}.{old}: this key was renamed {new}; move it there")
        encoder = (data.get("ranker") or {}).get("history_encoder") if isinstance(data.get("ranker"), Mapping) else None
        if isinstance(encoder, str) and encoder in RENAMED_HISTORY_ENCODERS:
            raise ConfigError(
                f"{where}.ranker.history_encoder: {encoder!r} was renamed {RENAMED_HISTORY_ENCODERS[encoder]!r} "
                "(target attention on the rank-svd_rank truncation of the history: exact only when the history's "
                "rank is <= svd_rank)"
            )
        # an empty section in YAML (`ranker:` with nothing under it) parses as null
        data = {k: ({} if v is None and k in SECTIONS else v) for k, v in data.items()}
        cfg = from_dict(cls, data, where=where)
        for key, seed in _seeds(cfg):
            if seed is not None and not 0 <= seed <= MAX_SEED:
                raise ConfigError(f"{where}.{key}: a seed must be an integer in 0..2**32-1 (numpy's range), got {seed}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Resolved config: every section with defaults filled in."""
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        return config_hash(self.to_dict())


MAX_SEED = 2**32 - 1  # numpy and torch seeds: larger ones fail late, or wrap around


def _seeds(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every `seed` field of a config, nested sections included."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _seeds(value, f"{prefix}{f.name}.")
        elif f.name == "seed" and (value is None or isinstance(value, int)):
            out.append((f"{prefix}{f.name}", value))
    return out


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PipelineConfig) if f.name not in ("name", "seed"))


def load_pipeline_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML/JSON (or defaults when path is None), apply overrides."""
    data = load_mapping(path) if path is not None else {}
    if overrides:
        data = deep_merge(data, overrides)
    return PipelineConfig.from_mapping(data, where=str(path) if path else "config")


# --- annotated YAML (experiments/configs/base.yaml is generated from this) ------------


def field_docs(cls: type) -> dict[str, str]:
    """Inline `# comment`s of a dataclass's fields, read from its source: the
    one place each key is documented."""
    import inspect
    import re

    docs: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^\s{4}(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def type_label(tp: Any) -> str:
    """A short human name of a config annotation: int, float, list[int], one of [a, b], ..."""
    import types
    import typing

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "one of [" + ", ".join(map(str, args)) + "]"
    if origin in (typing.Union, types.UnionType):
        names = [type_label(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return f"list[{type_label(inner[0]) if inner else 'any'}]"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _yaml_scalar(v: Any) -> str:
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith("...") else text


def annotated_yaml(obj: Any, indent: int = 0) -> list[str]:
    """YAML lines of a config dataclass, every key followed by `# type: meaning`."""
    import typing

    pad = "  " * indent
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    lines: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        doc = docs.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:  # section: {doc or (type(value).__doc__ or '').strip().splitlines()[0]}")
            lines += annotated_yaml(value, indent + 1)
            continue
        if isinstance(value, tuple):
            value = list(value)
        lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}  # {type_label(hints[f.name])}: {doc}".rstrip())
    return lines


def annotated_pipeline_yaml(cfg: PipelineConfig) -> str:
    """The whole resolved pipeline config as annotated YAML."""
    docs = field_docs(PipelineConfig)
    lines = [f"name: {_yaml_scalar(cfg.name)}  # str: {docs['name']}", f"seed: {cfg.seed}  # int: {docs['seed']}"]
    for name in SECTIONS:
        section = getattr(cfg, name)
        doc = " ".join((type(section).__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph, whole
        lines += ["", f"{name}:  # {doc}"]
        lines += annotated_yaml(section, 1)
    return "\n".join(lines) + "\n"
