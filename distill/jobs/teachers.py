"""The teachers job: both teachers fitted on the train split minus the
held-out items (or reused when up to date) into OUT/teachers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill import evaluate as E
from distill.early_stopping import best_score
from distill.jobs.artifacts import (
    JOB_TEACHERS,
    VERSION,
    JobResult,
    embedding_frame,
    foreign_checkpoint,
    load_pt,
    log_default,
    to_torch,
)
from distill.jobs.inputs import DistillInputs, load_inputs, with_seed
from distill.teachers import ID2ItemTeacher, Seq2ItemTeacher, TeachersConfig
from distill.config import DistillConfig
from features.core.config import config_hash, flatten, to_dict
from features.core.fingerprint import file_fingerprint
from features.core.manifest import atomic_outputs, is_up_to_date, read_manifest, write_manifest, write_parquet
from features.core.numeric import torch_threads
from features.core.provenance import stage_key
from features.core.tracker import NullTracker, Tracker


def _seq2item_valid(data: E.ColdStartData, k: int) -> Callable[[Seq2ItemTeacher], float]:
    def score(t: Seq2ItemTeacher) -> float:
        r = E.Retriever(t.item_embeddings_, lambda imps: t.encode(imps.hist), t.known_items_, ("warm",))
        return E.evaluate_retrievers({"m": r}, data.valid, [k])[f"recall@{k}_warm_m"]

    return score


def ensure_teachers(
    ctx: DistillInputs, folder: Path, cfg: TeachersConfig, tracker: Tracker, force: bool, log: Callable[[str], None]
) -> tuple[JobResult, dict[str, Any]]:
    """(result, {"id2item": teacher, "seq2item": teacher}), fitted into `folder`,
    or read back from it when its manifest key matches (and not `force`)."""
    t0 = time.perf_counter()
    key = stage_key(JOB_TEACHERS, {"version": VERSION, "config_hash": config_hash(cfg), "protocol": ctx.protocol}, ctx.upstream)
    if not force and is_up_to_date(folder, key) and (folder / "teachers.pt").is_file():
        state = load_pt(folder / "teachers.pt")
        with foreign_checkpoint(folder / "teachers.pt"):
            teachers = {"id2item": ID2ItemTeacher.from_state(state["id2item"]), "seq2item": Seq2ItemTeacher.from_state(state["seq2item"])}
        log(f"teachers: {folder} is up to date; reusing")
        return JobResult(folder, True, read_manifest(folder) or {}, time.perf_counter() - t0), teachers
    data, d = ctx.data, ctx.distill
    tracker.log_params({f"teachers.{k}": v for k, v in flatten(to_dict(cfg)).items()})
    with torch_threads(d.threads):
        idt = ID2ItemTeacher(cfg.id2item, seed=cfg.seed).fit(
            data.train_users,
            data.train_items,
            n_users=data.n_users,
            n_items=data.n_items,
            valid_fn=lambda t: E.selection_score(t.item_embeddings_, data.valid, d.query_len, d.select_k, t.known_items_),
            tracker=tracker,
            progress=d.progress,
        )
        t_id = time.perf_counter() - t0
        sqt = Seq2ItemTeacher(cfg.seq2item, seed=cfg.seed).fit(
            data.train_sequences, n_items=data.n_items, valid_fn=_seq2item_valid(data, d.select_k), tracker=tracker, progress=d.progress
        )
    import torch

    with atomic_outputs(folder) as tmp:
        write_parquet(embedding_frame(data.item_ids, idt.item_embeddings_, idt.known_items_), tmp / "id2item.parquet")
        write_parquet(embedding_frame(data.item_ids, sqt.item_embeddings_, sqt.known_items_), tmp / "seq2item.parquet")
        torch.save(to_torch({"id2item": idt.to_state(), "seq2item": sqt.to_state()}), tmp / "teachers.pt")
        secs = time.perf_counter() - t0
        manifest = write_manifest(
            tmp,
            job=JOB_TEACHERS,
            key=key,
            outputs=["id2item.parquet", "seq2item.parquet"],
            extra={
                "config": to_dict(cfg),
                "features": str(ctx.folder),
                "files": {"teachers.pt": file_fingerprint(tmp / "teachers.pt")},
                "id2item": {"best_epoch": idt.best_epoch_, "valid": idt.valid_curve_, "loss": idt.loss_curve_, "seconds": t_id},
                "seq2item": {"best_epoch": sqt.best_epoch_, "valid": sqt.valid_curve_, "loss": sqt.loss_curve_, "seconds": secs - t_id},
                "counts": data.counts,
                "seconds": secs,
            },
        )
    def best(curve: list[float]) -> str:  # n/a: a valid split with nothing to score (every epoch ran)
        score = best_score(curve)
        return "n/a" if score is None else f"{score:.4f}"

    log(
        f"teachers: fitted in {secs:.1f}s (id2item valid R@{d.select_k} {best(idt.valid_curve_)} at epoch {idt.best_epoch_}, "
        f"seq2item {best(sqt.valid_curve_)} at epoch {sqt.best_epoch_}) -> {folder}"
    )
    return JobResult(folder, False, manifest, secs), {"id2item": idt, "seq2item": sqt}


def fit_teachers(
    features_dir: str | Path,
    out_dir: str | Path,
    cfg: TeachersConfig = TeachersConfig(),
    tracker: Tracker | None = None,
    *,
    distill: DistillConfig = DistillConfig(),
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = log_default,
) -> JobResult:
    """Fit both teachers on the train split minus held-out items into `out_dir`.

    The protocol (held-out share and seed, query length, valid metric) comes
    from `distill`, so the teachers match the student trained with it. Seeds
    left at None take `seed`.
    """
    ctx = load_inputs(features_dir, distill, seed, log, out_dir)
    res, _ = ensure_teachers(ctx, Path(out_dir), with_seed(cfg, seed), tracker or NullTracker(), force, log)
    return res


__all__ = ["ensure_teachers", "fit_teachers"]
