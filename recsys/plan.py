"""One planning step per stage: a `PipelineConfig` in, a typed job out.

Every rule that decides what a stage does is applied here, once:

- seeds: a section's `seed: null` takes the pipeline's top-level `seed`; an
  experiment seed overrides every seed of the arm's chain (teachers, student,
  match k-means, ranker), so that each seed reruns the treatment itself;
- paths: `paths.*` or their defaults under `paths.root`, unless the caller
  (the pipeline) hands over the output of an upstream stage;
- match features: the ranker reads them iff `data.use_match_features`, the
  LightGBM baseline iff `lightgbm.use_match_features`; a requested file that
  does not exist is a UsageError (exit 2) when the job is checked, never a
  quiet run without it;
- distilled embeddings: read iff `ranker.use_distilled_embeddings != "off"`.

The CLI and `recsys.pipeline` both call these planners, then a stage entry
point of `recsys.stages` with (job, tracker, out). The module imports no torch.

>>> from recsys.config import PipelineConfig
>>> job = plan_rank(PipelineConfig.from_mapping({"seed": 3, "data": {"use_match_features": True}}))
>>> job.seed, job.train.seed, str(job.match), job.embeddings
(3, 3, 'artifacts/ml100k/match', None)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, TeachersConfig
from features.core.errors import UsageError
from features.reader import existing_match_file
from features.jobs.config import FeaturesConfig
from features.match.config import MatchConfig
from recsys.config import PipelineConfig
from recsys.config.sections import DataConfig, LightGBMConfig, RankerConfig, TrainConfig


def _seed(section_seed: int | None, cfg: PipelineConfig) -> int:
    return cfg.seed if section_seed is None else section_seed


@dataclass(frozen=True)
class FeaturesJob:
    """`recsys features build`: a source -> a features folder."""

    config: FeaturesConfig


@dataclass(frozen=True)
class DistillJob:
    """Teachers, the student and its cold-start evaluation (into OUT/teachers/,
    OUT/student/, OUT/item_embeddings.parquet, OUT/metrics.json)."""

    features: Path
    teachers: TeachersConfig  # seed resolved
    distill: DistillConfig  # seed resolved
    ablations: bool

    @property
    def teacher_protocol(self) -> dict[str, Any]:
        """The distill keys that shape the teachers' training data."""
        d = self.distill
        return {"holdout_frac": d.holdout_frac, "query_len": d.query_len, "history_len": d.history_len,
                "select_k": d.select_k}


@dataclass(frozen=True)
class MatchJob:
    """`recsys features match`: features + item embeddings -> match features."""

    features: Path
    embeddings: Path
    config: MatchConfig
    oof: DistillJob | None = None  # match.folds >= 2: the distillation refitted per fold (recsys.oof)


@dataclass(frozen=True)
class RankJob:
    """`recsys rank train`: the TorchRec ranker on a features folder."""

    features: Path
    match: Path | None  # None: no match features
    embeddings: Path | None  # None: no distilled item embeddings
    data: DataConfig
    model: RankerConfig
    train: TrainConfig  # seed resolved
    seed: int


@dataclass(frozen=True)
class LightGBMJob:
    """`recsys baseline lightgbm`: the LightGBM baseline on the same features."""

    features: Path
    match: Path | None  # None: no match features
    config: LightGBMConfig  # seed resolved
    seed: int


def plan_features(cfg: PipelineConfig) -> FeaturesJob:
    return FeaturesJob(cfg.features)


def plan_distill(cfg: PipelineConfig, *, features: str | Path | None = None, ablations: bool | None = None,
                 seed: int | None = None) -> DistillJob:
    """`seed`: the experiment runner's per-seed override: it reruns the
    teachers and the student with that seed (the treatment's own randomness)."""
    teachers = dataclasses.replace(cfg.teachers, seed=seed if seed is not None else _seed(cfg.teachers.seed, cfg))
    distill = dataclasses.replace(cfg.distill, seed=seed if seed is not None else _seed(cfg.distill.seed, cfg))
    return DistillJob(
        features=Path(features) if features is not None else cfg.paths.resolve("features"),
        teachers=teachers,
        distill=distill,
        ablations=cfg.distill.ablations if ablations is None else ablations,
    )


def plan_match(cfg: PipelineConfig, *, features: str | Path | None = None,
               embeddings: str | Path | None = None, seed: int | None = None) -> MatchJob:
    """`seed`: the experiment runner's per-seed override of the k-means seed."""
    return MatchJob(
        features=Path(features) if features is not None else cfg.paths.resolve("features"),
        embeddings=Path(embeddings) if embeddings is not None else cfg.paths.resolve("embeddings"),
        config=cfg.match if seed is None else dataclasses.replace(cfg.match, seed=seed),
        oof=plan_distill(cfg, features=features, ablations=False, seed=seed) if cfg.match.folds >= 2 else None,
    )


def plan_rank(cfg: PipelineConfig, *, seed: int | None = None, features: str | Path | None = None,
              match: str | Path | None = None, embeddings: str | Path | None = None) -> RankJob:
    """`seed`: the experiment runner's per-seed override of the resolved seed.
    `features` / `match` / `embeddings`: upstream outputs that replace the
    `paths.*` defaults (used only where the config asks for them)."""
    s = seed if seed is not None else _seed(cfg.train.seed, cfg)
    uses_match = cfg.data.use_match_features
    uses_emb = cfg.ranker.use_distilled_embeddings != "off"
    return RankJob(
        features=Path(features) if features is not None else cfg.paths.resolve("features"),
        match=(Path(match) if match is not None else cfg.paths.resolve("match_features")) if uses_match else None,
        embeddings=(Path(embeddings) if embeddings is not None else cfg.paths.resolve("embeddings")) if uses_emb else None,
        data=cfg.data,
        model=cfg.ranker,
        train=dataclasses.replace(cfg.train, seed=s),
        seed=s,
    )


def plan_lightgbm(cfg: PipelineConfig, *, seed: int | None = None, features: str | Path | None = None,
                  match: str | Path | None = None) -> LightGBMJob:
    s = seed if seed is not None else _seed(cfg.lightgbm.seed, cfg)
    uses_match = cfg.lightgbm.use_match_features
    return LightGBMJob(
        features=Path(features) if features is not None else cfg.paths.resolve("features"),
        match=(Path(match) if match is not None else cfg.paths.resolve("match_features")) if uses_match else None,
        config=dataclasses.replace(cfg.lightgbm, seed=s),
        seed=s,
    )


def check_inputs(job: RankJob | LightGBMJob) -> dict[str, Path | None]:
    """The files a ranker or LightGBM job reads, keyed by their config key,
    each checked to exist (UsageError, exit 2, naming the key otherwise).
    The CLI checks --out against these before any work."""
    from features import schemas as S

    if not (job.features / S.FILES["interactions"]).is_file():
        raise UsageError(f"paths.features: {job.features} is not a features folder (no {S.FILES['interactions']}); "
                         "run `recsys features build` first")
    if job.match is not None:
        switch = "lightgbm.use_match_features" if isinstance(job, LightGBMJob) else "data.use_match_features"
        existing_match_file(job.match, key="paths.match_features", switch=switch)
    embeddings = getattr(job, "embeddings", None)
    if embeddings is not None and not embeddings.is_file():
        raise UsageError(f"paths.embeddings: {embeddings} does not exist (ranker.use_distilled_embeddings is "
                         f"{job.model.use_distilled_embeddings!r}); run `recsys distill train` or set it to off")
    return {"paths.features": job.features, "paths.match_features": job.match, "paths.embeddings": embeddings}


__all__ = [
    "FeaturesJob", "DistillJob", "MatchJob", "RankJob", "LightGBMJob",
    "plan_features", "plan_distill", "plan_match", "plan_rank", "plan_lightgbm", "check_inputs",
]
