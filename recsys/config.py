"""The pipeline config: one YAML file, one section per stage.

Each section is a frozen dataclass that lives beside its component; this
module only knows where each one lives (SECTIONS) and fills them strictly:
an unknown section or key, or a wrong type, is a ConfigError (exit 2) that
names the dotted key. Sections missing from the file take their defaults.

    features:  features.jobs.config.FeaturesConfig
    match:     features.match.config.MatchConfig
    teachers:  distill.teachers.TeachersConfig
    distill:   distill.train.DistillConfig
    ranker:    recsys.models.ranker.RankerConfig
    train:     recsys.train.config.TrainConfig
    lightgbm:  recsys.models.lightgbm_ranker.LightGBMConfig
    tracking:  recsys.tracking.config.TrackingConfig
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

from features.core.config import config_hash, from_dict, load_mapping
from features.core.errors import ConfigError


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
    "features": "features.jobs.config:FeaturesConfig",
    "match": "features.match.config:MatchConfig",
    "teachers": "distill.config:TeachersConfig",
    "distill": "distill.config:DistillConfig",
    "ranker": "recsys.models.ranker:RankerConfig",
    "train": "recsys.train.config:TrainConfig",
    "lightgbm": "recsys.models.lightgbm_ranker:LightGBMConfig",
    "tracking": "recsys.tracking.config:TrackingConfig",
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
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @cached_property
    def hash(self) -> str:
        return config_hash(self.to_dict())


def load_pipeline_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML/JSON (or defaults when path is None), apply overrides."""
    from features.core.config import deep_merge

    data = load_mapping(path) if path else {}
    if overrides:
        data = deep_merge(data, overrides)
    return PipelineConfig(data, where=str(path) if path else "config")


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
    lines = [
        f"name: {cfg.name}  # str: run name shown in MLflow",
        f"seed: {cfg.seed}  # int: the one global seed (the CLI seeds once and logs it)",
    ]
    for name in SECTIONS:
        section = getattr(cfg, name)
        doc = (type(section).__doc__ or "").strip().splitlines()[0]
        lines += ["", f"{name}:  # {doc}"]
        lines += annotated_yaml(section, 1)
    return "\n".join(lines) + "\n"
