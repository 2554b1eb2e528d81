"""The evaluation job: teachers, the student, one ablation per loss switched
on, baselines and diagnostics, all on the same held-out items and test
impressions; writes OUT/metrics.json ({name: number or null} plus
"reasons": {name: why it is null})."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from distill import evaluate as E
from distill.jobs.artifacts import (EMBEDDINGS, JOB_EVAL, METRICS, NESTED, REASONS, TEST_HITS, VERSION, JobResult,
                                    log_default, publish)
from distill.jobs.inputs import DistillInputs, load_inputs, with_seed
from distill.jobs.student import ensure_student, teacher_fingerprints
from distill.jobs.teachers import ensure_teachers
from distill.teachers import TeachersConfig
from distill.config import LOSSES, DistillConfig
from features.core.config import config_hash, flatten, to_dict
from features.core.manifest import is_up_to_date, nested_fingerprints, nested_intact, read_manifest
from features.core.numeric import json_safe, torch_threads
from features.core.provenance import stage_key
from features.core.tracker import ForwardingTracker, NullTracker, Tracker


class PrefixedTracker(ForwardingTracker):
    """Tracker adapter renaming `student/x` -> `{prefix}/x`, so the ablations'
    curves do not overwrite the main student's in one tracking run."""

    def __init__(self, tracker: Tracker, prefix: str) -> None:
        super().__init__(tracker)
        self.prefix = prefix

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics({f"{self.prefix}/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}, step=step)


def _why_null(metrics: Mapping[str, Any], data: E.ColdStartData, known: Mapping[str, int],
              clusters: int) -> dict[str, str]:
    """{metric: reason} for every metric that could not be computed (None):
    an empty target group, a split without impressions, a teacher that knows
    too few items for neighbourhoods or for `clusters` k-means clusters
    (distill.diag_clusters). `known`: teacher name -> items it knows."""
    splits = {"test": data.test, "valid": data.valid}
    out = {}
    for key, v in metrics.items():
        if v is not None:
            continue
        split, name = ("valid", key[len("valid_"):]) if key.startswith("valid_") else ("test", key)
        if name.startswith("recall@"):
            imps, group = splits[split], name.split("_", 2)[1]
            skipped = ", ".join(f"{data.counts.get(f'n_{split}_skipped_{w}', 0)} {w.replace('_', ' ')}" for w in ("no_history", "repeat"))
            n_group = {"warm": int((~imps.cold).sum()), "cold": int(imps.cold.sum()), "all": len(imps)}[group]
            if len(imps) == 0:
                out[key] = f"no {split} impressions (positives with an earlier positive; skipped: {skipped})"
            elif n_group == 0:
                out[key] = f"no {group} target among the {len(imps)} {split} impression{'s' if len(imps) != 1 else ''}"
            else:
                out[key] = "could not be computed"
            continue
        teacher = next((t for t in known if key.endswith(f"_vs_{t}")), None)
        if teacher is not None and known[teacher] < 3:
            out[key] = f"{teacher} knows {known[teacher]} item(s): neighbourhoods need at least 3"
        elif teacher is not None and key.startswith("nmi_") and known[teacher] <= clusters:
            out[key] = (f"{teacher} knows {known[teacher]} items, not more than distill.diag_clusters={clusters}: "
                        "k-means would give each item its own cluster (NMI 1 by construction)")
        elif key.startswith("kendall_tau"):
            out[key] = "every neighbour score is tied (tau-b undefined)"
        else:
            out[key] = "could not be computed"
    return out


HITS_MODELS = ("student", "content", "two_tower")  # test_hits.parquet columns hit_{model}: what the seed report compares


def hits_k(cfg: DistillConfig) -> int:
    """The k of test_hits.parquet: 50 (the goal's Recall@50) when reported, else the largest k."""
    return 50 if 50 in cfg.eval_ks else max(cfg.eval_ks)


def _test_hits(data: E.ColdStartData, ranked: Mapping[str, np.ndarray], k: int) -> pl.DataFrame:
    """One row per test impression: user_id, target item_id, cold, hit_{model}
    at k for the models of HITS_MODELS that were ranked."""
    imps = data.test
    cols: dict[str, Any] = {
        "user_id": pl.Series(data.user_ids[imps.users], dtype=pl.Int64),
        "item_id": pl.Series(data.item_ids[imps.targets], dtype=pl.Int64),
        "cold": pl.Series(imps.cold, dtype=pl.Boolean),
    }
    for name in HITS_MODELS:
        if name in ranked:
            cols[f"hit_{name}"] = pl.Series(E.hits_at_k(ranked[name], imps.targets, k), dtype=pl.Boolean)
    return pl.DataFrame(cols)


def _compare(
    ctx: DistillInputs, teachers: Mapping[str, Any], students: Mapping[str, tuple[Any, np.ndarray]], cfg: DistillConfig
) -> tuple[dict[str, float], pl.DataFrame]:
    """Every model on the same test impressions (plus valid at select_k), and
    the diagnostics against both teachers.

    Models: `content` (untrained [MiniLM text, field multi-hot] concatenation,
    see ContentFeatures.raw_embedding), `content_text` (MiniLM only),
    `popularity` (train positives per item), `id_teacher` (cosine, mean of the
    last query_len known items; warm only), `seq_teacher` (its own history
    encoder, dot product; warm only), each student (cosine), the full
    student's matryoshka prefixes `student_d{d}`, `two_tower` (the content-only
    two-tower baseline, when trained), and `student_known_items`
    (the full student ranking only the items the ID teacher knows; warm only).
    """
    import torch

    from distill.student import ContentTensors

    data, q, ks = ctx.data, cfg.query_len, list(cfg.eval_ks)
    content = ctx.content()
    idt, sqt = teachers["id2item"], teachers["seq2item"]
    pop = np.bincount(data.train_items, minlength=data.n_items).astype(np.float32)[:, None]  # (I, 1)
    retrievers: dict[str, E.Retriever] = {"content": E.embedding_retriever(content.raw_embedding(True), q)}
    if content.text is not None:
        retrievers["content_text"] = E.embedding_retriever(content.raw_embedding(False), q)
    retrievers["popularity"] = E.Retriever(pop, lambda imps: np.ones((len(imps), 1), np.float32))
    retrievers["id_teacher"] = E.embedding_retriever(idt.item_embeddings_, q, idt.known_items_)
    retrievers["seq_teacher"] = E.Retriever(sqt.item_embeddings_, lambda imps: sqt.encode(imps.hist), sqt.known_items_, ("warm",))
    for name, (_, emb) in students.items():
        retrievers[name] = E.embedding_retriever(emb, q)
    main_emb = students["student"][1]
    for d in students["student"][0].prefixes[:-1]:
        retrievers[f"student_d{d}"] = E.embedding_retriever(main_emb[:, :d], q)
    # the student ranked among the items the ID teacher knows, i.e. on the
    # teacher's own candidate set: the like-for-like warm comparison (on ALL
    # items the student must also rank the cold items, which the teacher
    # cannot retrieve at all)
    retrievers["student_known_items"] = E.Retriever(
        E.embedding_retriever(main_emb, q).item_emb,
        lambda imps: E.mean_queries(main_emb, imps.hist, q),
        idt.known_items_,
        ("warm",),
    )

    metrics: dict[str, float] = {}
    ranked: dict[str, np.ndarray] = {}
    metrics.update(E.evaluate_retrievers(retrievers, data.test, ks, cfg.index, ranked_out=ranked))
    hits = _test_hits(data, ranked, hits_k(cfg))
    # valid at select_k for the models whose choices were made on it
    chosen = {n: r for n, r in retrievers.items() if n in students or n in ("id_teacher", "seq_teacher", "content")}
    valid = E.evaluate_retrievers(chosen, data.valid, [cfg.select_k], cfg.index)
    metrics.update({f"valid_{k}": v for k, v in valid.items()})

    # diagnostics on the items each teacher knows (warm items with a train positive)
    x = ContentTensors.from_features(content, cfg.student)
    refs = {"id_teacher": (idt, "id2item"), "seq_teacher": (sqt, "seq2item")}
    models = {"content": (None, content.raw_embedding(True))} | {n: v for n, v in students.items() if n != "two_tower"}
    for ref_name, (teacher, head) in refs.items():
        known = np.flatnonzero(teacher.known_items_)
        n_known = len(known)
        metrics[f"topk_overlap_chance_vs_{ref_name}"] = min(cfg.diag_k, n_known - 1) / (n_known - 1) if n_known >= 2 else math.nan
        if n_known < 2:  # no item has a neighbour: every diagnostic is undefined (null, with the reason)
            metrics.update({f"{d}_{name}_vs_{ref_name}": math.nan for name in models for d in ("nmi", "topk_overlap", "kendall_tau")})
            metrics[f"nmi_chance_vs_{ref_name}"] = math.nan
            continue
        ref_labels = E.kmeans_labels(teacher.item_embeddings_[known], cfg.diag_clusters, cfg.seed)
        # k-means gives every item its own cluster when there are no more items than clusters: NMI 1 by construction
        nmi_defined = n_known > cfg.diag_clusters
        # NMI of two partitions that share nothing but their cluster sizes: its chance level
        perm = np.random.default_rng(cfg.seed)
        metrics[f"nmi_chance_vs_{ref_name}"] = (
            float(np.mean([E.nmi(ref_labels, perm.permutation(ref_labels)) for _ in range(5)])) if nmi_defined else math.nan
        )
        for name, (student, emb) in models.items():
            projected = None
            if student is not None and any(k.startswith(f"{head}@") for k in student.heads):
                with torch.no_grad():
                    projected = student.project(student(x), head).numpy()  # (I, K)
            metrics.update(
                E.diagnostics(
                    emb, teacher.item_embeddings_, known, name, ref_name,
                    k=cfg.diag_k, n_clusters=cfg.diag_clusters, seed=cfg.seed, projected=projected, ref_labels=ref_labels,
                )
            )  # fmt: skip
        if not nmi_defined:
            metrics.update({f"nmi_{name}_vs_{ref_name}": math.nan for name in models})
    metrics.update({k: float(v) for k, v in data.counts.items()})
    return metrics, hits


def evaluate(
    features_dir: str | Path,
    out_dir: str | Path,
    cfg: DistillConfig = DistillConfig(),
    tracker: Tracker | None = None,
    *,
    teachers: TeachersConfig = TeachersConfig(),
    ablations: bool = True,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = log_default,
) -> JobResult:
    """Cold-start evaluation: teachers, the student, one ablation per loss
    switched on (unless `ablations=False`), baselines and diagnostics, all on
    the same held-out items and test impressions. Writes OUT/metrics.json and
    OUT/item_embeddings.parquet (the full student's)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    tracker = tracker or NullTracker()
    ctx = load_inputs(features_dir, cfg, seed, log, out_dir)
    cfg, tcfg = ctx.distill, with_seed(teachers, seed)
    params = {"version": VERSION, "config_hash": config_hash(cfg), "teachers_hash": config_hash(tcfg),
              "ablations": ablations, "protocol": ctx.protocol}
    key = stage_key(JOB_EVAL, params, ctx.content_upstream)
    # the nested teachers/ and student/ too: registration serves student/student.pt (a probe, 2026-12-01: a
    # replaced one was registered, a deleted one never rebuilt)
    if not force and is_up_to_date(out, key) and (out / METRICS).is_file() and nested_intact(out, NESTED):
        log(f"distill eval: {out} is up to date (same config, inputs and code); reusing its metrics (--force recomputes)")
        return JobResult(out, True, read_manifest(out) or {}, time.perf_counter() - t0, json.loads((out / METRICS).read_text()))
    tracker.log_params({f"distill.{k}": v for k, v in flatten(to_dict(cfg)).items()})
    tracker.log_params({"distill.ablations": ablations})
    timings: dict[str, float] = {}
    tres, tobjs = ensure_teachers(ctx, out / "teachers", tcfg, tracker, force, log)
    timings["teachers_s"] = tres.seconds
    variants: dict[str, tuple[DistillConfig, Path]] = {"student": (cfg, out / "student")}
    if ablations:
        for loss in LOSSES:
            if getattr(cfg, f"use_{loss}"):
                try:
                    variants[f"student_no_{loss}"] = (cfg.ablation(loss), out / "ablations" / f"no_{loss}")
                except ValueError:  # it was the only loss switched on
                    log(f"distill eval: no ablation without {loss} (no other loss is on)")
    if cfg.two_tower:
        variants["two_tower"] = (cfg.two_tower_baseline(), out / "baselines" / "two_tower")
    students: dict[str, tuple[Any, np.ndarray]] = {}
    for name, (vcfg, folder) in variants.items():
        tr = tracker if name == "student" else PrefixedTracker(tracker, name)
        sres, student, emb = ensure_student(ctx, folder, vcfg, tobjs, teacher_fingerprints(tres), tr, force, log)
        students[name] = (student, emb)
        timings[f"{name}_s"] = sres.seconds
    t_cmp = time.perf_counter()
    with torch_threads(cfg.threads):
        metrics, hits = _compare(ctx, tobjs, students, cfg)
        metrics = json_safe(metrics)
    known = {"id_teacher": int(tobjs["id2item"].known_items_.sum()), "seq_teacher": int(tobjs["seq2item"].known_items_.sum())}
    metrics[REASONS] = _why_null(metrics, ctx.data, known, cfg.diag_clusters)
    timings["compare_s"] = time.perf_counter() - t_cmp
    timings.update(ctx.timings)
    timings["total_s"] = time.perf_counter() - t0
    manifest = publish(
        out, key, JOB_EVAL, out / "student" / EMBEDDINGS, metrics,
        {"config": to_dict(cfg), "teachers": to_dict(tcfg), "features": str(ctx.folder), "timings": timings, "hits_k": hits_k(cfg),
         "nested": nested_fingerprints(out, NESTED)},
        tables={TEST_HITS: hits},
    )  # fmt: skip
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_artifact(out / METRICS)
    if metrics[REASONS]:
        log(f"distill eval: {len(metrics[REASONS])} metrics are null (n/a); {METRICS} `{REASONS}` says why")
    log(f"distill eval: wrote {out / METRICS} in {timings['total_s']:.1f}s")
    return JobResult(out, False, manifest, timings["total_s"], metrics)


__all__ = ["PrefixedTracker", "evaluate"]
