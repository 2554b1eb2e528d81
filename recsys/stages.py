"""Stage entry points: (job, tracker, out) -> StageResult.

Each runs one planned job (`recsys.plan`) into `out`, logs to `tracker`, and
leaves a manifest in `out` whose key (`features.core.provenance.stage_key`:
stage, params, plugin code, upstream fingerprints) decides reuse: a job whose
folder already holds a manifest with the same key and intact outputs is
skipped (`force=True` recomputes). The CLI commands and `recsys.pipeline`
call these, and nothing else runs a stage.

    run_features(job, tracker, out)   features folder
    run_distill(job, tracker, out)    teachers, student, cold-start metrics, item embeddings
    run_match(job, tracker, out)      match_features.parquet
    run_rank(job, tracker, out)       the TorchRec ranker: metrics.json, predictions.parquet
    run_lightgbm(job, tracker, out)   the LightGBM baseline: the same files

When tracked, run_distill and run_rank also log and register their model
(`recsys-student`, `recsys-ranker`; see recsys.tracking.models), reused or not.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features import schemas as S
from features.core.config import to_dict
from features.core.errors import UsageError
from features.core.fingerprint import file_fingerprint
from features.core.manifest import (
    MANIFEST,
    atomic_write_text,
    describe_parquet,
    folder_fingerprint,
    is_up_to_date,
    outputs_fingerprint,
    read_manifest,
    run_lock,
)
from features.core.provenance import stage_key
from features.core.tracker import NullTracker, Tracker
from recsys.plan import DistillJob, FeaturesJob, LightGBMJob, MatchJob, RankJob

Log = Callable[[str], None]
RANK_JOB = "rank.train"
RANK_VERSION = 1
# train keys that never change what a ranker run computes
RANK_FREE = ("progress", "resume", "checkpoint_dir")


@dataclass(frozen=True)
class StageResult:
    """Where a stage's outputs are, whether they were reused, its manifest."""

    out: Path
    reused: bool
    manifest: dict[str, Any]

    @property
    def key(self) -> dict[str, Any]:
        return self.manifest.get("key", {})

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the outputs (from the manifest): what a
        downstream stage keys on."""
        return outputs_fingerprint(self.manifest)


def _print(msg: str) -> None:
    print(msg, flush=True)


def run_features(job: FeaturesJob, tracker: Tracker | None, out: str | Path, *, force: bool = False,
                 log: Log = _print, loaded: Any = None) -> StageResult:
    from features.jobs import build_features

    tracker = tracker or NullTracker()
    res = build_features(job.config, out, force=force, log=log, loaded=loaded)
    if not res.skipped:
        tracker.log_metrics({k: v for k, v in res.manifest.get("stats", {}).items() if isinstance(v, (int, float))})
        tracker.log_artifact(Path(out) / MANIFEST)
    return StageResult(Path(out), res.skipped, res.manifest)


def run_distill(job: DistillJob, tracker: Tracker | None, out: str | Path, *, force: bool = False,
                log: Log = _print, show_metrics: bool = True) -> StageResult:
    """`show_metrics`: log the metrics table (False where the caller prints it itself)."""
    from distill import jobs as D

    tracker = tracker or NullTracker()
    out = Path(out)
    res = D.evaluate(job.features, out, job.distill, tracker, teachers=job.teachers, ablations=job.ablations,
                     seed=job.distill.seed, force=force, log=log)
    if not res.skipped:
        if res.metrics and show_metrics:
            log(D.format_metrics(res.metrics, job.distill.eval_ks))
        tracker.log_artifact(out / "item_embeddings.parquet")
    result = StageResult(out, res.skipped, res.manifest)
    _register_student(job, tracker, result, log)
    return result


def _register_student(job: DistillJob, tracker: Tracker, result: StageResult, log: Log) -> None:
    """The student as the MLflow model `recsys-student` (recsys.tracking.models);
    a reused stage finds the version registered for the same outputs."""
    from recsys.tracking.models import log_student

    log_student(tracker, job.features, result.out, result.key, job.distill.seed, log)


def run_match(job: MatchJob, tracker: Tracker | None, out: str | Path, *, force: bool = False, log: Log = _print,
              progress: bool = True, shard: tuple[int, int] | None = None) -> StageResult:
    from features.jobs import build_match_features

    tracker = tracker or NullTracker()
    if job.oof is not None:  # match.folds >= 2: train rows from students that never saw them
        from recsys.oof import oof_match_features

        if shard is not None:
            raise UsageError("--shard and match.folds >= 2 cannot be combined: the out-of-fold job shards by fold itself")
        manifest, reused = oof_match_features(job, tracker, Path(out), force=force, log=log, progress=progress)
        return StageResult(Path(out), reused, manifest)
    res = build_match_features(job.features, job.embeddings, out, job.config, shard=shard, force=force, log=log,
                               progress=progress)
    if res.complete and not res.skipped:
        tracker.log_artifact(Path(out) / MANIFEST)
        tracker.log_metrics({"seconds": res.seconds})
    return StageResult(Path(out), res.skipped, res.manifest)


def rank_upstream(job: RankJob) -> dict[str, str]:
    up = {"features": folder_fingerprint(job.features)}
    if job.match is not None:
        up["match_features"] = file_fingerprint(S.match_file(job.match))
    if job.embeddings is not None:
        up["embeddings"] = file_fingerprint(job.embeddings)
    return up


def _world_size() -> int:
    """torchrun's WORLD_SIZE (1 without it; a bad value is refused before training by check_launch_env)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def rank_key(job: RankJob) -> dict[str, Any]:
    train = {k: v for k, v in to_dict(job.train).items() if k not in RANK_FREE}
    # the world size is part of it: a torchrun run shards batches (other numbers) and
    # writes per-rank checkpoints only, which a single-process run must not reuse
    params = {"version": RANK_VERSION, "data": to_dict(job.data), "model": to_dict(job.model), "train": train,
              "seed": job.seed, "world_size": _world_size()}
    return stage_key(RANK_JOB, params, rank_upstream(job))


def run_rank(job: RankJob, tracker: Tracker | None, out: str | Path, *, force: bool = False,
             log: Log = _print) -> StageResult:
    """Train the ranker (`recsys.train.train_ranker`) into `out`, then write
    its manifest (rank 0). Under torchrun every rank trains; rank 0 writes.
    The run holds `out` (and a checkpoint_dir outside it) locked: training
    writes its checkpoints in place, so a second run into the same folder
    waits for the first (a torchrun job's processes lock rank by rank)."""
    out = Path(out)
    ckpt = job.train.checkpoints(out)
    folders = [out] + ([] if ckpt.resolve().is_relative_to(out.resolve()) else [ckpt])
    with run_lock(folders, rank=int(os.environ.get("RANK", "0")) if _world_size() > 1 else 0, log=log):
        return _run_rank(job, tracker, out, force=force, log=log)


def _run_rank(job: RankJob, tracker: Tracker | None, out: Path, *, force: bool, log: Log) -> StageResult:
    import dataclasses

    from recsys.train import train_ranker

    if force:  # recompute means train afresh: resuming a finished last.pt trains 0 epochs (a probe, 2026-12-01)
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, resume=False))
    key = rank_key(job)
    current = not force and is_up_to_date(out, key)
    if current and _checkpoint_intact(job, out, log):
        log(f"rank: {out} is up to date (same config, inputs and code); skipping")
        result = StageResult(out, True, read_manifest(out) or {})
        if int(os.environ.get("RANK", "0")) == 0:
            _register_ranker(job, tracker, out, result.key, log)
        return result
    if current:  # the outputs are this config's but best.pt is not its model: train afresh, not resume from last.pt
        for name in ("best.pt", "last.pt"):  # (its last.pt is at train.epochs: a resume would train nothing and
            (job.train.checkpoints(out) / name).unlink(missing_ok=True)  # evaluate the foreign best.pt)
    t0 = time.perf_counter()
    metrics = train_ranker(job, out, tracker=tracker)
    manifest: dict[str, Any] = {}
    if int(os.environ.get("RANK", "0")) == 0:
        if _world_size() > 1 and _best(job, out).is_file():
            # a single-process run's model left in this folder is not this run's: registering (or serving) it
            # beside this run's metrics would be wrong (a probe, 2026-12-01)
            _best(job, out).unlink()
            log(f"rank: removed {_best(job, out)}: a single-process run's model, not this distributed run's")
        manifest = {
            "job": RANK_JOB,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "key": json.loads(json.dumps(key, sort_keys=True, default=str)),
            "outputs": {S.PREDICTIONS_FILE: describe_parquet(out / S.PREDICTIONS_FILE)},
            "files": {S.METRICS_FILE: file_fingerprint(out / S.METRICS_FILE)},
            # the model registered from this folder, and the one a scorer loads: another run into the same
            # --out can replace it while leaving these outputs, so a reuse checks it (`_checkpoint_intact`)
            BEST_KEY: file_fingerprint(_best(job, out)) if _best(job, out).is_file() else None,
            "seconds": time.perf_counter() - t0,
            "test": {k: metrics.get(k) for k in ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")},
        }
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        _register_ranker(job, tracker, out, manifest["key"], log)
    return StageResult(out, False, manifest)


BEST_KEY = "best_checkpoint"  # the manifest's fingerprint of checkpoints/best.pt


def _best(job: RankJob, out: Path) -> Path:
    """The run's best.pt: under train.checkpoint_dir when set, else OUT/checkpoints."""
    return job.train.checkpoints(out) / "best.pt"


def _checkpoint_intact(job: RankJob, out: Path, log: Log) -> bool:
    """Whether the run's best.pt is still the one this folder's run wrote
    (its manifest's fingerprint; a distributed run records none). A run of
    another config into the same folder (or checkpoint_dir), interrupted or
    failed, replaces or removes it and leaves the outputs: reusing them would
    register (and serve) the other run's model beside this run's metrics."""
    want = (read_manifest(out) or {}).get(BEST_KEY)
    if want is None:
        return True
    if _best(job, out).is_file() and file_fingerprint(_best(job, out)) == want:
        return True
    log(f"rank: {_best(job, out)} is no longer the model of {out}'s run (another run wrote there); retraining")
    return False


def _register_ranker(job: RankJob, tracker: Tracker | None, out: Path, key: dict[str, Any], log: Log) -> None:
    """The ranker as the MLflow model `recsys-ranker` (recsys.tracking.models);
    a reused stage finds the version registered for the same outputs. Only a
    single-process run has the full best.pt a scorer needs."""
    from recsys.tracking.models import log_ranker

    # the model the run recorded (a distributed run records none): a best.pt found beside a distributed run's
    # outputs (a single-process run's, copied or left there) is not its model (a probe, 2026-12-01)
    if (read_manifest(out) or {}).get(BEST_KEY) is None or not _best(job, out).is_file():
        log(f"rank: no best.pt recorded for {out} (distributed run?); recsys-ranker not registered")
        return
    log_ranker(tracker, job, out, key, log)


def run_lightgbm(job: LightGBMJob, tracker: Tracker | None, out: str | Path, *, force: bool = False,
                 log: Log = _print) -> StageResult:
    from recsys.baseline import lightgbm_key, run_lightgbm as fit_lightgbm

    out = Path(out)
    key = lightgbm_key(job.features, job.match, job.config)
    if not force and is_up_to_date(out, key):
        log(f"lightgbm: {out} is up to date (same config, inputs and code); skipping")
        return StageResult(out, True, read_manifest(out) or {})
    fit_lightgbm(job.features, job.match, out, job.config, tracker or NullTracker(), log=log, key=key)
    return StageResult(out, False, read_manifest(out) or {})


__all__ = ["StageResult", "run_features", "run_distill", "run_match", "run_rank", "run_lightgbm", "rank_key"]
