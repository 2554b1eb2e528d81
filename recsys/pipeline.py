"""The chain of one A/B arm, tracked in MLflow:

    features -> distill (teachers, student) -> match -> rank | lightgbm

`Pipeline.arm` plans every stage the arm's config asks for (`recsys.plan`),
runs each through its entry point (`recsys.stages`) inside a nested MLflow
run, and feeds each stage's output to the next. Reuse is the jobs' own: a
stage whose output folder holds a manifest with the same key (params,
upstream fingerprints, plugin code) is skipped, and its run is tagged
`reused` with the run that computed it (`PipelineRun.record_key`). Arms that
agree on a shared stage's job share its folder; arms that disagree get
`<folder>-<hash>`, so they never overwrite each other. The experiment runner
(`recsys.experiment_run`) calls `arm` for every arm and seed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import config_hash
from features.core.errors import UsageError
from features.core.fingerprint import file_fingerprint
from features.core.tracker import Tracker
from recsys.config import PipelineConfig
from recsys.plan import DistillJob, FeaturesJob, MatchJob, plan_distill, plan_features, plan_lightgbm, plan_match, plan_rank
from recsys.stages import StageResult, run_distill, run_features, run_lightgbm, run_match, run_rank

if TYPE_CHECKING:
    from recsys.tracking import NullPipelineRun, PipelineRun

Log = Callable[[str], None]
J = TypeVar("J")


def _log_default(msg: str) -> None:
    print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class ArmOutput:
    """An arm's output folder, the fingerprint of its outputs, its features folder."""

    out: Path
    fingerprint: str
    features: Path


def user_embeddings(cfg: PipelineConfig) -> Path:
    """The user's own item embeddings file (`paths.embeddings`), checked to exist (UsageError)."""
    emb = Path(cfg.paths.embeddings)
    if not emb.is_file():
        raise UsageError(f"paths.embeddings: {emb} does not exist")
    return emb


class Pipeline:
    """Runs the stages of arms inside one parent run."""

    def __init__(self, run: PipelineRun | NullPipelineRun, log: Log = _log_default, *, progress: bool = True,
                 force: bool = False) -> None:
        self.run = run
        self.log = log
        self.progress = progress
        self.force = force  # tracking.reuse: false -> recompute every stage
        self._ran: dict[tuple[str, Any, str], StageResult] = {}  # a job runs once per invocation
        self._owners: dict[str, Any] = {}  # default output folder -> the job that owns it

    def _folder(self, job: Any, default: Path) -> Path:
        """`default` for the first job that wants it, `<default>-<hash>` for a
        different job, so two arms that disagree never share a folder."""
        owner = self._owners.setdefault(str(default), job)
        return default if owner == job else default.with_name(f"{default.name}-{config_hash(dataclasses.asdict(job))[:8]}")

    def stage(self, name: str, job: J, out: Path, entry: Callable[[J, Tracker, Path], StageResult], *,
              upstream: dict[str, str], tags: dict[str, Any] | None = None) -> StageResult:
        """Run `entry(job, tracker, out)` in a nested run named `name`."""
        memo = (name, job, str(out))
        if memo in self._ran:
            return self._ran[memo]
        with self.run.stage(name, dataclasses.asdict(job), upstream, outputs=out, tags=tags) as st:
            t0 = time.perf_counter()
            result = entry(job, st, out)
            self.run.record_key(st, result.key, reused=result.reused)
            if not result.reused:
                st.log_metrics({"stage_seconds": time.perf_counter() - t0})
        self._ran[memo] = result
        return result

    # -- shared stages ----------------------------------------------------------------

    def features(self, cfg: PipelineConfig) -> StageResult:
        job = plan_features(cfg)
        out = self._folder(job, cfg.paths.resolve("features"))

        def entry(j: FeaturesJob, st: Tracker, o: Path) -> StageResult:
            return run_features(j, st, o, force=self.force, log=self.log)

        return self.stage("features", job, out, entry, upstream={})

    def distill(self, cfg: PipelineConfig, features: StageResult, seed: int | None = None) -> StageResult:
        job = plan_distill(cfg, features=features.out, seed=seed)
        out = self._folder(job, cfg.paths.resolve("embeddings").parent)

        def entry(j: DistillJob, st: Tracker, o: Path) -> StageResult:
            return run_distill(j, st, o, force=self.force, log=self.log)

        return self.stage("distill", job, out, entry, upstream={"features": features.fingerprint})

    def embeddings(self, cfg: PipelineConfig, features: StageResult, seed: int | None = None) -> tuple[Path, str]:
        """The item embeddings an arm reads: the user's own file
        (`paths.embeddings`), or the distill stage's."""
        if cfg.paths.embeddings:
            emb = user_embeddings(cfg)
            return emb, file_fingerprint(emb)
        res = self.distill(cfg, features, seed)
        return res.out / "item_embeddings.parquet", file_fingerprint(res.out / "item_embeddings.parquet")

    def match(self, cfg: PipelineConfig, features: StageResult, embeddings: Path, emb_fp: str,
              seed: int | None = None) -> StageResult:
        job = plan_match(cfg, features=features.out, embeddings=embeddings, seed=seed)
        out = self._folder(job, cfg.paths.resolve("match_features"))

        def entry(j: MatchJob, st: Tracker, o: Path) -> StageResult:
            return run_match(j, st, o, force=self.force, log=self.log, progress=self.progress)

        return self.stage("match", job, out, entry, upstream={"features": features.fingerprint, "embeddings": emb_fp})

    # -- arms ---------------------------------------------------------------------------

    @staticmethod
    def check_inputs(cfg: PipelineConfig, model: str) -> None:
        """UsageError when arm `model` would read the user's own embeddings
        (paths.embeddings) and the file is missing: an experiment checks every
        arm before any work (found late, earlier arms had run and overwritten a
        finished run's predictions)."""
        planned = plan_lightgbm(cfg) if model == "lightgbm" else plan_rank(cfg)
        if cfg.paths.embeddings and (planned.match is not None or getattr(planned, "embeddings", None) is not None):
            user_embeddings(cfg)

    def arm(self, cfg: PipelineConfig, model: str, seed: int, out: Path, tags: dict[str, Any]) -> ArmOutput:
        """Every stage arm `model` ("ranker" or "lightgbm") needs, then the model
        itself; `seed` reruns every seeded stage (distill, match, the model), while
        the features, which no seed changes, are shared."""
        planned = plan_lightgbm(cfg, seed=seed) if model == "lightgbm" else plan_rank(cfg, seed=seed)
        features = self.features(cfg)
        upstream = {"features": features.fingerprint}
        emb: Path | None = None
        match: Path | None = None
        wants_emb = planned.match is not None or getattr(planned, "embeddings", None) is not None
        if wants_emb:
            emb, upstream["embeddings"] = self.embeddings(cfg, features, seed)
        if planned.match is not None:
            m = self.match(cfg, features, emb, upstream["embeddings"], seed)
            match, upstream["match"] = m.out, m.fingerprint
        config_json = cfg.to_dict()
        if model == "lightgbm":
            lgb_job = plan_lightgbm(cfg, seed=seed, features=features.out, match=match)

            def lgb_entry(j: Any, st: Tracker, o: Path) -> StageResult:
                st.log_dict(config_json, "config.json")
                return run_lightgbm(j, st, o, force=self.force, log=self.log)

            result = self.stage("rank", lgb_job, out, lgb_entry, upstream=upstream, tags=tags)
        else:
            rank_job = plan_rank(cfg, seed=seed, features=features.out, match=match, embeddings=emb)
            # --quiet turns the bars off; it never turns on what the config (train.progress: false) turned off
            rank_job = dataclasses.replace(rank_job, train=dataclasses.replace(rank_job.train, progress=self.progress and rank_job.train.progress))

            def rank_entry(j: Any, st: Tracker, o: Path) -> StageResult:
                st.log_dict(config_json, "config.json")
                res = run_rank(j, st, o, force=self.force, log=self.log)
                if not res.reused or _plots_stale(o, j):
                    _rank_plots(o, j, st)
                return res

            result = self.stage("rank", rank_job, out, rank_entry, upstream=upstream, tags=tags)
        return ArmOutput(result.out, result.fingerprint, features.out)


def _plots_stale(out: Path, job: Any) -> bool:
    """Whether a reused rank folder's figures are missing or older than what
    they show (a run killed after its manifest, before its plots, left an
    earlier run's curves beside the new metrics: a probe, 2026-12-01)."""
    def behind(png: Path, source: Path) -> bool:
        return source.is_file() and (not png.is_file() or png.stat().st_mtime < source.stat().st_mtime)

    svd = job.model.history_encoder.startswith("svd")
    return behind(out / "training_curves.png", out / S.METRICS_FILE) or (
        svd and behind(out / "history_spectrum.png", job.train.checkpoints(out) / "best.pt"))


def _rank_plots(out: Path, job: Any, tracker: Tracker) -> None:
    """Training curves, and for SVD encoders the singular-value spectrum of
    user histories in the trained item table (how much energy rank R keeps)."""
    import json

    from recsys import plots

    metrics = json.loads((out / S.METRICS_FILE).read_text())
    hist = metrics.get("history") or []
    if hist:
        curves = {k: [h.get(k) for h in hist] for k in ("train_loss", "valid_auc", "valid_gauc", "valid_lt_auc")}
        png = plots.training_curves(curves, out / "training_curves.png", best_epoch=metrics.get("best_epoch"))
        tracker.log_artifact(png, "figures")
    if job.model.history_encoder.startswith("svd"):
        spectrum = history_spectrum(job.features, job.train.checkpoints(out) / "best.pt")
        if spectrum is not None:
            png = plots.singular_spectrum(
                spectrum, out / "history_spectrum.png", rank=job.model.svd_rank,
                title="User-history spectrum (trained item table)",
            )
            tracker.log_artifact(png, "figures")


def history_spectrum(features: Path, checkpoint: Path, max_users: int = 300) -> np.ndarray | None:
    """Mean normalised singular values of users' history embedding matrices."""
    import torch

    if not checkpoint.is_file() or not (features / S.FILES["sequences"]).is_file():
        return None
    state = torch.load(checkpoint, weights_only=True)
    state = state.get("model", state)
    table = next((v for k, v in state.items() if k.endswith("item_embeddings.embeddings.item.weight")), None)
    if table is None:
        return None
    table = table.double().numpy()  # (I, D)
    item_ids = np.sort(pl.read_parquet(features / S.FILES["items"], columns=[S.ITEM_ID])[S.ITEM_ID].to_numpy())
    seqs = pl.read_parquet(features / S.FILES["sequences"], columns=[S.ITEM_IDS])[S.ITEM_IDS].to_list()
    spectra = []
    for seq in seqs[:max_users]:
        if len(seq) < 2:
            continue
        x = table[np.searchsorted(item_ids, np.asarray(seq))]  # (L, D)
        s = np.linalg.svd(x, compute_uv=False)
        spectra.append(s / max(s.sum(), 1e-12))
    if not spectra:
        return None
    width = max(len(s) for s in spectra)
    return np.mean([np.pad(s, (0, width - len(s))) for s in spectra], axis=0)


