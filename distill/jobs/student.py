"""The student job: teachers (reused when up to date), then the student,
published as OUT/item_embeddings.parquet for every item."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from distill import evaluate as E
from distill.early_stopping import best_score, check_finite_table
from distill.encoders import IMAGE_MODEL, TEXT_MODEL
from distill.jobs.artifacts import (
    EMBEDDINGS,
    JOB_STUDENT,
    JOB_TRAIN,
    NESTED,
    VERSION,
    JobResult,
    embedding_frame,
    foreign_checkpoint,
    load_pt,
    log_default,
    publish,
)
from distill.jobs.inputs import DistillInputs, load_inputs, with_seed
from distill.jobs.teachers import ensure_teachers
from distill.teachers import TeachersConfig
from distill.train import DistillConfig, TeacherTarget, fit_student
from features.core.config import config_hash, flatten, to_dict
from features.core.fingerprint import file_fingerprint
from features.core.manifest import (
    atomic_outputs,
    is_up_to_date,
    nested_fingerprints,
    nested_intact,
    read_manifest,
    write_manifest,
    write_parquet,
)
from features.core.numeric import torch_threads
from features.core.provenance import stage_key
from features.core.tracker import NullTracker, Tracker


SELECT_GROUPS = {"mean": ("warm", "cold"), "cold": ("cold",)}  # distill.select_on -> valid target groups


def teacher_fingerprints(res: JobResult) -> dict[str, str]:
    return {k: v.get("fingerprint") for k, v in res.manifest.get("outputs", {}).items()}


def _build_student(state: dict[str, Any]):
    from distill.config import StudentConfig
    from distill.student import ContentSpec, Student

    cfg = StudentConfig(**state["config"])
    student = Student(cfg, ContentSpec(**state["spec"]), dict(state["teacher_dims"]), tuple(state["matryoshka_dims"]))
    student.load_state_dict(state["state_dict"])
    student.eval()
    return student


def ensure_student(
    ctx: DistillInputs,
    folder: Path,
    cfg: DistillConfig,
    teachers: Mapping[str, Any],
    teacher_fps: Mapping[str, str],
    tracker: Tracker,
    force: bool,
    log: Callable[[str], None],
) -> tuple[JobResult, Any, np.ndarray]:
    """(result, Student, L2-normalised embeddings (I, D)) trained or reused."""
    import torch

    from distill.student import ContentSpec, ContentTensors

    t0 = time.perf_counter()
    params = {"version": VERSION, "config_hash": config_hash(cfg.training_key()), "protocol": ctx.protocol,
              "teachers": dict(teacher_fps), "encoders": [TEXT_MODEL, IMAGE_MODEL]}
    key = stage_key(JOB_STUDENT, params, ctx.content_upstream)
    if not force and is_up_to_date(folder, key) and (folder / "student.pt").is_file():
        with foreign_checkpoint(folder / "student.pt"):
            student = _build_student(load_pt(folder / "student.pt"))
        emb = np.asarray(pl.read_parquet(folder / EMBEDDINGS)["embedding"].to_list(), dtype=np.float32)
        log(f"{folder.name}: {folder} is up to date; reusing")
        return JobResult(folder, True, read_manifest(folder) or {}, time.perf_counter() - t0), student, emb
    content = ctx.content()
    x = ContentTensors.from_features(content, cfg.student)
    spec = ContentSpec.of(x, content.fields.vocab_size)
    targets = {n: TeacherTarget(t.item_embeddings_, t.known_items_) for n, t in teachers.items()}
    data, q, k = ctx.data, cfg.query_len, cfg.select_k
    with torch_threads(cfg.threads):
        fit = fit_student(
            x,
            spec,
            data,
            targets,
            cfg,
            valid_fn=lambda s: E.selection_score(s.embed(x), data.valid, q, k, groups=SELECT_GROUPS[cfg.select_on]),
            tracker=tracker,
            seed=cfg.seed,
            geo_content=content.raw_embedding(True) if cfg.w_geo > 0 else None,  # L_geo: the content baseline's embedding
        )
        emb = fit.student.embed(x)
    check_finite_table(emb, f"distill {folder.name}", fit.best_epoch, "lower distill.lr (or the loss weights w_*)")
    state = {
        "config": dataclasses.asdict(cfg.student),
        "spec": dataclasses.asdict(spec),
        "teacher_dims": {key.split("@")[0]: int(head.out_features) for key, head in fit.student.heads.items()},
        "matryoshka_dims": list(cfg.matryoshka_dims),
        "state_dict": fit.student.state_dict(),
    }
    with atomic_outputs(folder) as tmp:
        write_parquet(embedding_frame(data.item_ids, emb), tmp / EMBEDDINGS)
        torch.save(state, tmp / "student.pt")
        secs = time.perf_counter() - t0
        manifest = write_manifest(
            tmp,
            job=JOB_STUDENT,
            key=key,
            outputs=[EMBEDDINGS],
            extra={
                "config": to_dict(cfg),
                "features": str(ctx.folder),
                "files": {"student.pt": file_fingerprint(tmp / "student.pt")},
                "best_epoch": fit.best_epoch,
                "valid": fit.valid_curve,
                "loss": fit.loss_curve,
                "loss_components": fit.components,
                "samples_per_s": fit.samples_per_s,
                "train_seconds": fit.seconds,
                "seconds": secs,
            },
        )
    best = best_score(fit.valid_curve)
    chosen = f"valid score {best:.4f} at epoch {fit.best_epoch}" if best is not None else \
        f"no valid impressions to choose on: the last epoch, {fit.best_epoch}"
    log(f"{folder.name}: trained in {secs:.1f}s ({chosen}, {fit.samples_per_s:,.0f} samples/s) -> {folder}")
    return JobResult(folder, False, manifest, secs), fit.student, emb


def train_student(
    features_dir: str | Path,
    out_dir: str | Path,
    cfg: DistillConfig = DistillConfig(),
    tracker: Tracker | None = None,
    *,
    teachers: TeachersConfig = TeachersConfig(),
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = log_default,
) -> JobResult:
    """Teachers (OUT/teachers, reused when up to date), then the student
    (OUT/student); publishes OUT/item_embeddings.parquet for every item."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    tracker = tracker or NullTracker()
    ctx = load_inputs(features_dir, cfg, seed, log, out_dir)
    tcfg = with_seed(teachers, seed)
    params = {"version": VERSION, "config_hash": config_hash(ctx.distill.training_key()),
              "teachers_hash": config_hash(tcfg), "protocol": ctx.protocol}
    key = stage_key(JOB_TRAIN, params, ctx.content_upstream)
    if not force and is_up_to_date(out, key) and nested_intact(out, NESTED):
        log(f"distill train: {out} is up to date; skipping")
        return JobResult(out, True, read_manifest(out) or {}, time.perf_counter() - t0)
    tracker.log_params({f"distill.{k}": v for k, v in flatten(to_dict(ctx.distill)).items()})
    tres, tobjs = ensure_teachers(ctx, out / "teachers", tcfg, tracker, force, log)
    sres, _, _ = ensure_student(ctx, out / "student", ctx.distill, tobjs, teacher_fingerprints(tres), tracker, force, log)
    manifest = publish(
        out, key, JOB_TRAIN, out / "student" / EMBEDDINGS, None, {"student": str(out / "student"), "seconds": time.perf_counter() - t0,
                                                                  "nested": nested_fingerprints(out, NESTED)}
    )
    return JobResult(out, False, manifest, time.perf_counter() - t0)


__all__ = ["ensure_student", "teacher_fingerprints", "train_student"]
