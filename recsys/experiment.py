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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from features.core.config import deep_merge, from_dict, load_mapping
from features.core.errors import ConfigError, UsageError
from recsys.config import PipelineConfig
from recsys.eval.metrics import METRICS

# An experiment name becomes a folder under paths.root and a filter value in
# the tracking store: no separators, no `..`.
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MIN_BOOT = 100  # fewer bootstrap replicates give no usable 95% interval
MAX_BOOT = 10_000  # a replicate costs a row of (replicates x users) counts; 10k resolve p = 1e-4 (Holm over 500 tests)


def check_n_boot(n_boot: int, name: str = "--n-boot") -> None:
    """UsageError unless MIN_BOOT <= n_boot <= MAX_BOOT (`name`: how the caller spells it)."""
    if not MIN_BOOT <= n_boot <= MAX_BOOT:
        raise UsageError(f"{name} {n_boot}: need {MIN_BOOT} to {MAX_BOOT} bootstrap replicates "
                         "(fewer give no usable 95% interval; more only cost memory)")


def check_experiment_name(name: str, what: str = "experiment") -> str:
    """ConfigError unless `name` is letters, digits, '_', '.', '-' (not dots only)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or set(name) == {"."}:
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
        if len(names) < 2:
            raise ValueError(f"arms: an A/B needs a treatment arm beside the control (got only {names})")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics: unknown metric(s) {unknown}; known: {list(METRICS)}")
        if not self.metrics:
            raise ValueError(f"metrics: at least one metric is needed; known: {list(METRICS)}")
        repeated = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
        if repeated:  # each would count twice in the Holm family
            raise ValueError(f"metrics: metric(s) {repeated} repeated")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if not MIN_BOOT <= self.n_boot <= MAX_BOOT:
            raise ValueError(f"n_boot must be in [{MIN_BOOT}, {MAX_BOOT}], got {self.n_boot}")


def check_seeds(seeds: tuple[int, ...], what: str) -> tuple[int, ...]:
    """ConfigError on a negative or repeated seed (a repeated seed would be
    counted twice in the interval)."""
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32]
    if bad:  # numpy wraps 2**32 around to 0: the "two" seeds would be one run counted twice
        raise ConfigError(f"{what}: seeds must be integers in 0..2**32-1, got {bad}")
    dups = sorted({s for s in seeds if seeds.count(s) > 1})
    if dups:
        raise ConfigError(f"{what}: seed(s) {dups} repeated; each seed runs once")
    return tuple(seeds)


def parse_seeds(text: str, what: str = "--seeds") -> tuple[int, ...]:
    """`"0,1,2"` -> (0, 1, 2); ConfigError (exit 2) on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers, e.g. 0,1,2")
    bad = [p for p in parts if not re.fullmatch(r"[0-9]+", p)]  # int() would also take "1_0", "٣" and "-1"
    if bad:
        raise ConfigError(f"{what} {text!r}: {bad[0]!r} is not a seed (digits 0-9 only); expected e.g. 0,1,2")
    return check_seeds(tuple(int(p) for p in parts), what)


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
    baseline_path = (path.parent / Path(spec.baseline).expanduser()).resolve()  # `~/b.yaml` is the home folder's
    if not baseline_path.is_file():
        raise ConfigError(f"{path}: baseline {spec.baseline!r} not found (looked for {baseline_path})")
    baseline = load_mapping(baseline_path)
    PipelineConfig.from_mapping(baseline, where=str(baseline_path))
    arm_configs = {}
    for arm in spec.arms:
        merged = deep_merge(baseline, arm.delta)
        if "name" not in arm.delta:
            merged["name"] = f"{spec.experiment}/{arm.name}"
        where = f"{path}: arm {arm.name!r} (baseline + delta)"
        arm_configs[arm.name] = cfg = PipelineConfig.from_mapping(merged, where=where)
        for key, why in unread_delta_keys(arm, cfg).items():
            raise ConfigError(f"{path}: arm {arm.name!r}: delta key {key!r} cannot take effect: {why}")
        probability_metrics = [m for m in spec.metrics if METRICS[m].kind == "logloss"]
        if arm.model == "lightgbm" and cfg.lightgbm.objective == "lambdarank" and probability_metrics:
            raise ConfigError(
                f"{path}: arm {arm.name!r} (lightgbm.objective lambdarank) scores rank within a user, they are not "
                f"probabilities: {probability_metrics} would be computed on a squashed ranking score; drop it from "
                "`metrics` or use objective binary"
            )
    return LoadedExperiment(spec, path, baseline_path, baseline, arm_configs)


def identical_arms(exp: LoadedExperiment) -> list[tuple[str, str]]:
    """Pairs (earlier arm, later arm) of the same model whose configs differ
    in the run name only: a delta that changes nothing, so their difference
    is zero by construction (reported as a warning, not refused)."""
    import dataclasses

    seen: list[tuple[str, PipelineConfig, str]] = []  # (model, config without its name, arm); configs hold lists
    pairs = []
    for arm in exp.spec.arms:
        cfg = dataclasses.replace(exp.arm_configs[arm.name], name="")
        first = next((name for model, other, name in seen if model == arm.model and other == cfg), None)
        if first is not None:
            pairs.append((first, arm.name))
        else:
            seen.append((arm.model, cfg, arm.name))
    return pairs


def read_sections(model: str, cfg: PipelineConfig) -> set[str]:
    """The config sections an arm of `model` reads, given its merged config
    (`recsys.plan`: the model's job and the stages upstream of it)."""
    if model == "lightgbm":
        read, uses_match, uses_emb = {"features", "lightgbm"}, cfg.lightgbm.use_match_features, False
    else:
        read, uses_match = {"features", "data", "ranker", "train"}, cfg.data.use_match_features
        uses_emb = cfg.ranker.use_distilled_embeddings != "off"
    if uses_match:
        read.add("match")
    # the distill stage makes the embeddings (unless paths.embeddings names a file), and out-of-fold
    # match features (match.folds >= 2) train a student per fold whatever the embeddings
    if ((uses_match or uses_emb) and not cfg.paths.embeddings) or (uses_match and cfg.match.folds >= 2):
        read |= {"teachers", "distill"}
    return read | {"paths", "tracking", "name"}


def _svd(cfg: PipelineConfig) -> bool:
    return cfg.ranker.history_encoder.startswith("svd")


# keys read only under another setting of the same arm: {key: (unread when, why)}
CONDITIONAL_KEYS: dict[str, tuple[Callable[[PipelineConfig], bool], str]] = {
    "ranker.svd_rank": (lambda c: not _svd(c), "ranker.history_encoder is not an SVD encoder"),
    "ranker.svd_gram_dtype": (lambda c: not _svd(c), "ranker.history_encoder is not an SVD encoder"),
    "ranker.svd_normalize_tokens": (lambda c: c.ranker.history_encoder != "svd_compact",
                                    "ranker.history_encoder is not svd_compact"),
    "ranker.history_mean": (lambda c: c.ranker.history_encoder == "mean",
                            "ranker.history_encoder is mean (the mean block is already there)"),
    "ranker.dcn_layers": (lambda c: c.ranker.over_arch != "dcn", "ranker.over_arch is not dcn"),
    "data.match_columns": (lambda c: not c.data.use_match_features, "data.use_match_features is false"),
    "lightgbm.bagging_fraction": (lambda c: c.lightgbm.bagging_freq == 0, "lightgbm.bagging_freq is 0 (no bagging)"),
    "lightgbm.bagging_freq": (lambda c: c.lightgbm.bagging_fraction == 1.0, "lightgbm.bagging_fraction is 1 (no bagging)"),
    "distill.geo_temperature": (lambda c: c.distill.w_geo == 0, "distill.w_geo is 0"),
    "distill.w_i2i": (lambda c: not c.distill.use_i2i, "distill.use_i2i is false"),
    "distill.i2i_window": (lambda c: not c.distill.use_i2i, "distill.use_i2i is false"),
    "distill.matryoshka_losses": (lambda c: not c.distill.matryoshka_dims, "distill.matryoshka_dims is empty"),
    # the teachers reach the embeddings only through L_id2i
    "teachers.id2item.*": (lambda c: not c.distill.use_id2i, "distill.use_id2i is false (no teacher reaches the student)"),
    "teachers.seq2item.*": (lambda c: not c.distill.use_id2i, "distill.use_id2i is false (no teacher reaches the student)"),
    "teachers.seq2item.n_layers": (lambda c: c.teachers.seq2item.encoder == "mean", "teachers.seq2item.encoder is mean"),
    "teachers.seq2item.n_heads": (lambda c: c.teachers.seq2item.encoder == "mean", "teachers.seq2item.encoder is mean"),
}


def _unread_because(key: str, cfg: PipelineConfig) -> str | None:
    """Why `key` is not read under `cfg` (`CONDITIONAL_KEYS`, "section.*" entries by prefix), else None."""
    for pattern in (key, *(p for p in CONDITIONAL_KEYS if p.endswith(".*") and key.startswith(p[:-1]))):
        if pattern in CONDITIONAL_KEYS and CONDITIONAL_KEYS[pattern][0](cfg):
            return CONDITIONAL_KEYS[pattern][1]
    return None


def unread_delta_keys(arm: ArmSpec, cfg: PipelineConfig) -> dict[str, str]:
    """{dotted delta key: why it changes nothing} for an arm: a section its
    model never reads (a ranker setting on a LightGBM arm, the distill
    section of an arm without embeddings), a key read only under another
    setting the arm does not have (`CONDITIONAL_KEYS`: svd_rank on a mean
    encoder), or a seed, which the experiment's `seeds` set for every seeded
    stage of every arm. Such an arm would run, equal its comparison arm, and
    read as a finding of no effect."""
    from features.core.config import flatten

    read = read_sections(arm.model, cfg)
    out = {}
    for key in flatten(arm.delta):
        section = key.split(".")[0]
        if key == "seed" or (key.endswith(".seed") and section != "features"):
            out[key] = "the experiment's `seeds` set every seed of each arm (list the seeds there)"
        elif section not in read:
            out[key] = f"a {arm.model} arm with this config does not read the {section!r} section"
        elif (why := _unread_because(key, cfg)) is not None:
            out[key] = f"it is not read when {why}"
    return out
