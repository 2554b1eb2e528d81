"""A/B experiment specs: a frozen baseline pipeline config plus arms as deltas.

    experiment: ab_match_features        # name; runs are tagged experiment=<name>
    baseline: configs/base.yaml          # frozen pipeline config (path relative to this file)
    control: control                     # the arm deltas are measured against
    seeds: [0]
    arms:
      - name: control
        model: ranker                    # ranker | lightgbm
        delta: {ranker: {use_match_features: false, history_encoder: mean}}

Everything is validated before any work starts: unknown keys, wrong types, a
missing baseline, duplicate arm names, an unknown control arm, and every
arm's merged pipeline config (so a typo inside a delta fails at once).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from features.core.config import deep_merge, from_dict, load_mapping
from features.core.errors import ConfigError
from recsys.config import PipelineConfig
from recsys.eval.metrics import METRICS

# An experiment name becomes a folder under paths.root and a filter value in
# the tracking store: no separators, no `..`.
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MIN_BOOT = 100  # fewer bootstrap replicates give no usable 95% interval


def check_experiment_name(name: str, what: str = "experiment") -> str:
    """ConfigError unless `name` is letters, digits, '_', '.', '-' (not dots only)."""
    if not isinstance(name, str) or not _NAME.match(name) or set(name) == {"."}:
        raise ConfigError(
            f"{what}: name {name!r} may only hold letters, digits, '_', '.' and '-' (and not dots only): "
            "it names a folder under paths.root"
        )
    return name


@dataclass(frozen=True)
class ArmSpec:
    name: str
    model: Literal["ranker", "lightgbm"] = "ranker"
    delta: dict[str, Any] = field(default_factory=dict)  # pipeline-config overrides
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"arm name {self.name!r} must be letters, digits, '_' or '-'")


@dataclass(frozen=True)
class ExperimentSpec:
    experiment: str
    baseline: str
    arms: tuple[ArmSpec, ...]
    control: str = "control"
    seeds: tuple[int, ...] = (0,)
    metrics: tuple[str, ...] = ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")
    n_boot: int = 1000  # bootstrap replicates for the intervals
    description: str = ""

    def __post_init__(self) -> None:
        try:  # ValueError: from_dict adds the file to the message
            check_experiment_name(self.experiment)
            check_seeds(self.seeds, "seeds")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        names = [a.name for a in self.arms]
        if not names:
            raise ValueError("arms: at least one arm is needed")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"arms: duplicate arm name(s) {dups}")
        if self.control not in names:
            raise ValueError(f"control: arm {self.control!r} is not among the arms {names}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics: unknown metric(s) {unknown}; known: {list(METRICS)}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if self.n_boot < MIN_BOOT:
            raise ValueError(f"n_boot must be >= {MIN_BOOT}")


def check_seeds(seeds: tuple[int, ...], what: str) -> tuple[int, ...]:
    """ConfigError on a negative or repeated seed (a repeated seed would be
    counted twice in the interval)."""
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ConfigError(f"{what}: seeds must be integers >= 0, got {bad}")
    dups = sorted({s for s in seeds if seeds.count(s) > 1})
    if dups:
        raise ConfigError(f"{what}: seed(s) {dups} repeated; each seed runs once")
    return tuple(seeds)


def parse_seeds(text: str, what: str = "--seeds") -> tuple[int, ...]:
    """`"0,1,2"` -> (0, 1, 2); ConfigError (exit 2) on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers, e.g. 0,1,2")
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise ConfigError(f"{what} {text!r}: {bad!r} is not an integer; expected e.g. 0,1,2") from None
    return check_seeds(seeds, what)


@dataclass
class LoadedExperiment:
    spec: ExperimentSpec
    path: Path
    baseline_path: Path
    baseline: dict[str, Any]
    arm_configs: dict[str, PipelineConfig]

    @property
    def name(self) -> str:
        return self.spec.experiment

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.spec.arms if a.name == name)


def load_experiment(path: str | Path, seeds: tuple[int, ...] | None = None) -> LoadedExperiment:
    """Read and fully validate an experiment file (ConfigError/UsageError)."""
    path = Path(path)
    data = load_mapping(path)
    if "baseline" not in data:
        raise ConfigError(f"{path}: missing required key 'baseline' (the frozen pipeline config the arms modify)")
    spec = from_dict(ExperimentSpec, data, where=str(path))
    if seeds:
        spec = dataclasses.replace(spec, seeds=check_seeds(tuple(seeds), "--seeds"))
    baseline_path = (path.parent / spec.baseline).resolve()
    if not baseline_path.is_file():
        raise ConfigError(f"{path}: baseline {spec.baseline!r} not found (looked for {baseline_path})")
    baseline = load_mapping(baseline_path)
    PipelineConfig.from_mapping(baseline, where=str(baseline_path))
    arm_configs = {}
    for arm in spec.arms:
        merged = deep_merge(baseline, arm.delta)
        if "name" not in arm.delta:
            merged["name"] = f"{spec.experiment}/{arm.name}"
        arm_configs[arm.name] = PipelineConfig.from_mapping(merged, where=f"{path}: arm {arm.name!r} (baseline + delta)")
    return LoadedExperiment(spec, path, baseline_path, baseline, arm_configs)
