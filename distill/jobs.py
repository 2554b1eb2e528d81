"""Distillation jobs: the only module of `distill` that reads and writes files
(besides the encoders' embedding cache, see distill/encoders.py).

    fit_teachers(features_dir, out_dir, cfg, tracker)   teachers into out_dir
    train_student(features_dir, out_dir, cfg, tracker)  teachers, student, published embeddings
    evaluate(features_dir, out_dir, cfg, tracker)       all of the above + ablations + metrics.json

Output folder of `train_student` / `evaluate`:

    OUT/teachers/                 id2item.parquet, seq2item.parquet (item_id, embedding, known),
                                  teachers.pt, manifest.json   (= what `fit_teachers` writes)
    OUT/student/                  item_embeddings.parquet, student.pt, manifest.json
    OUT/ablations/no_{loss}/      the same for each ablation (evaluate only)
    OUT/item_embeddings.parquet   the student's embedding of EVERY item (item_id Int64,
                                  embedding List(Float32), L2-normalised)
    OUT/metrics.json              evaluate only: {name: number or null}, plus "reasons": {name: why it is null}
    OUT/manifest.json             job distill.train or distill.eval

Every folder's manifest key holds the job, its version, the config hash, the
protocol (holdout share and seed, query length...), the fingerprints of the
features manifest's outputs and of the stage's own inputs (the teachers'
tables for a student). A rerun whose key matches reuses the folder; `force`
recomputes. Outputs are written with `features.core.manifest.atomic_outputs`, so a
killed job never leaves a half-written file under its final name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from distill import evaluate as E
from distill.early_stopping import check_finite_table
from distill.encoders import IMAGE_MODEL, TEXT_MODEL, ContentFeatures, build_content, default_cache_dir, empty_texts
from distill.teachers import IDToItemTeacher, SeqToItemTeacher, TeachersConfig
from distill.train import LOSSES, DistillConfig, TeacherTarget, fit_student
from features import schemas as S
from features.core.config import config_hash, flatten, to_dict
from features.core.errors import DataError, SchemaError, UsageError
from features.core.manifest import atomic_outputs, is_up_to_date, read_manifest, write_manifest, write_parquet
from features.core.fingerprint import file_fingerprint
from features.core.tracker import NullTracker, Tracker

VERSION = 1  # bump when the same inputs and config give different outputs
JOB_TEACHERS, JOB_STUDENT, JOB_TRAIN, JOB_EVAL = "distill.teachers", "distill.student", "distill.train", "distill.eval"
FEATURES_JOB = "features.build"
EMBEDDINGS = "item_embeddings.parquet"
METRICS = "metrics.json"
REASONS = "reasons"  # metrics.json: {metric: why it is null}
REQUIRED = {
    "interactions": [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT, S.HIST_END, S.POS_HIST_END, S.POS_HIST_LEN],
    "sequences": [S.USER_ID, S.ITEM_IDS, S.POS_ITEM_IDS],
    "items": [S.ITEM_ID, S.N_TRAIN],
}


@dataclass
class JobResult:
    out_dir: Path
    skipped: bool  # True when an up-to-date output was reused
    manifest: dict[str, Any]
    seconds: float = 0.0
    metrics: dict[str, Any] | None = None  # evaluate only: {name: number, or None when it cannot be computed}, "reasons"


# --- inputs ------------------------------------------------------------------------


@dataclass
class _Context:
    """One job's inputs, read once: features, the cold-start split, content."""

    folder: Path
    upstream: dict[str, str]  # features output file -> fingerprint
    items: pl.DataFrame
    kinds: dict[str, list[str]]
    distill: DistillConfig  # seed resolved
    data: E.ColdStartData
    _content: ContentFeatures | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def protocol(self) -> dict[str, Any]:
        c = self.distill
        return {
            "holdout_frac": c.holdout_frac,
            "seed": c.seed,
            "history_len": c.history_len,
            "query_len": c.query_len,
            "select_k": c.select_k,
        }

    def content(self) -> ContentFeatures:
        if self._content is None:
            t0 = time.perf_counter()
            c = self.distill
            self._content = build_content(
                self.items,
                self.kinds,
                cache_dir=c.cache_dir or None,
                use_text=c.student.use_text,
                use_fields=c.student.use_fields,
                use_image=c.student.use_image,
                n_buckets=c.n_buckets,
                progress=c.progress,
            )
            self.timings["encode_s"] = time.perf_counter() - t0
        return self._content


def _read(folder: Path, name: str) -> pl.DataFrame:
    path = folder / S.FILES[name]
    if not path.is_file():
        raise DataError("missing from the features folder (rebuild it with `recsys features build`)", file=str(path))
    try:
        df = pl.read_parquet(path)
    except Exception as e:  # polars raises several types for corrupt files
        raise DataError(f"not a readable parquet file ({type(e).__name__}: {e})", file=str(path)) from e
    missing = [c for c in REQUIRED[name] if c not in df.columns]
    if missing:
        raise SchemaError(f"missing required column(s) {missing}", file=str(path), column=missing[0])
    return df


def _check_text(items: pl.DataFrame, file: Path, max_share: float, log: Callable[[str], None]) -> None:
    """Refuse items whose text is missing or mostly empty (the "content"
    student would learn from nothing); warn, with counts, when some are."""
    hint = (
        "build the features from an items file with a text column (`--items FILE --text-column NAME`), "
        "or set distill.student.use_text: false"
    )
    if S.TEXT not in items.columns:
        raise DataError(f"items have no text column, which the text encoder needs: {hint}", file=str(file), column=S.TEXT)
    null, blank = empty_texts(items[S.TEXT].to_list())
    n, empty = items.height, null + blank
    counts = f"{empty} of {n} items ({empty / max(n, 1):.0%}) have no text ({null} null, {blank} blank)"
    if empty == n or empty / max(n, 1) > max_share:
        raise DataError(
            f"{counts}, more than distill.max_empty_text_share {max_share:g} allows: a text student would learn from "
            f"nothing; {hint}, or raise distill.max_empty_text_share",
            file=str(file),
            column=S.TEXT,
        )
    if empty:
        log(
            f"warning: {file}: column {S.TEXT!r}: {counts}; they all get the same text vector "
            f"(refused above distill.max_empty_text_share {max_share:g})"
        )


def _check_cache_dir(cache_dir: str) -> None:
    """The encoder cache folder must be creatable: checked before any work."""
    from features.core.paths import check_output

    where = "distill.cache_dir" if cache_dir else "the encoder cache ($RECSYS_CACHE_DIR/encoders)"
    check_output(cache_dir or default_cache_dir(), {}, flag=where)


def _context(features_dir: str | Path, cfg: DistillConfig, seed: int, log: Callable[[str], None] = print) -> _Context:
    folder = Path(features_dir)
    if not folder.is_dir():
        raise UsageError(f"features folder {folder} does not exist: run `recsys features build --out {folder}` first")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UsageError(f"{folder} has no readable manifest.json, so it is not a features folder: run `recsys features build --out {folder}`")
    if manifest.get("job") != FEATURES_JOB:
        raise UsageError(f"{folder} holds the output of {manifest.get('job')!r}, not of `recsys features build`")
    inter, seqs, items = (_read(folder, n) for n in ("interactions", "sequences", "items"))
    if cfg.student.use_text:
        _check_text(items, folder / S.FILES["items"], cfg.max_empty_text_share, log)
        _check_cache_dir(cfg.cache_dir)
    inter_file = str(folder / S.FILES["interactions"])
    if inter.filter((pl.col(S.SPLIT) == "train") & (pl.col(S.LABEL) == 1)).height == 0:
        raise DataError("no positive train events: nothing to learn from", file=inter_file, column=S.LABEL)
    cfg = _resolve(cfg, seed)
    data = E.prepare_cold_start(inter, seqs, items, holdout_frac=cfg.holdout_frac, seed=cfg.seed, history_len=cfg.history_len)
    if not any(len(s) >= 2 for s in data.train_sequences):
        raise DataError(
            f"no user has 2 or more train positives once {data.counts['n_items_heldout']} of {data.n_items} items are held out "
            f"(distill.holdout_frac {cfg.holdout_frac}): the sequence teacher has nothing to learn from; "
            "use more data, or a smaller distill.holdout_frac",
            file=inter_file,
            column=S.LABEL,
        )
    upstream = {k: v.get("fingerprint") for k, v in manifest.get("outputs", {}).items()}
    kinds = manifest.get("item_fields") or S.item_field_kinds(items.schema)
    return _Context(folder, upstream, items.sort(S.ITEM_ID), kinds, cfg, data)


def _resolve(cfg: Any, seed: int) -> Any:
    """The config with its seed filled in: None means the caller's (pipeline) seed."""
    return cfg if cfg.seed is not None else dataclasses.replace(cfg, seed=seed)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch, faiss and BLAS/OpenMP (k-means) threads for the block, restored
    after (0: leave as is). On a shared 2-core machine, two OpenMP threads
    that wait on each other made these small workloads up to 15x slower."""
    if n <= 0:
        yield
        return
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    old_faiss = faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)
        faiss.omp_set_num_threads(old_faiss)


class _Prefixed:
    """Tracker adapter renaming `student/x` -> `{prefix}/x`, so the ablations'
    curves do not overwrite the main student's in one tracking run."""

    def __init__(self, tracker: Tracker, prefix: str) -> None:
        self.tracker, self.prefix = tracker, prefix

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics({f"{self.prefix}/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tracker.set_tags(tags)


def _embedding_frame(item_ids: np.ndarray, emb: np.ndarray, known: np.ndarray | None = None) -> pl.DataFrame:
    cols: dict[str, Any] = {
        S.ITEM_ID: pl.Series(item_ids, dtype=pl.Int64),
        "embedding": pl.Series(np.asarray(emb, dtype=np.float32).tolist(), dtype=pl.List(pl.Float32)),
    }
    if known is not None:
        cols["known"] = pl.Series(known, dtype=pl.Boolean)
    return pl.DataFrame(cols)


def _to_torch(obj: Any) -> Any:
    """numpy arrays -> tensors (torch.load(weights_only=True) reads tensors, not arrays)."""
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    return obj


def _load_pt(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise DataError("missing (rerun with --force to rebuild it)", file=str(path))
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises several types
        raise DataError(f"not a readable checkpoint ({type(e).__name__}); rerun with --force to rebuild it", file=str(path)) from e


@contextmanager
def _foreign_checkpoint(path: Path) -> Iterator[None]:
    """A readable checkpoint whose content is not what this version wrote."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = f"checkpoint does not match this version ({type(e).__name__}: {e}); rerun with --force to rebuild it"
        raise DataError(msg, file=str(path)) from e


def _log_default(msg: str) -> None:
    """Progress to stdout; warnings to stderr, where they are not lost in the output."""
    print(msg, flush=True, file=sys.stderr if msg.startswith("warning:") else sys.stdout)


# --- teachers ----------------------------------------------------------------------


def _seq_valid(data: E.ColdStartData, k: int) -> Callable[[SeqToItemTeacher], float]:
    def score(t: SeqToItemTeacher) -> float:
        r = E.Retriever(t.item_embeddings_, lambda imps: t.encode(imps.hist), t.known_items_, ("warm",))
        return E.evaluate_retrievers({"m": r}, data.valid, [k])[f"recall@{k}_warm_m"]

    return score


def _ensure_teachers(
    ctx: _Context, folder: Path, cfg: TeachersConfig, tracker: Tracker, force: bool, log: Callable[[str], None]
) -> tuple[JobResult, dict[str, Any]]:
    t0 = time.perf_counter()
    key = {"job": JOB_TEACHERS, "version": VERSION, "config_hash": config_hash(cfg), "protocol": ctx.protocol, "upstream": ctx.upstream}
    if not force and is_up_to_date(folder, key) and (folder / "teachers.pt").is_file():
        state = _load_pt(folder / "teachers.pt")
        with _foreign_checkpoint(folder / "teachers.pt"):
            teachers = {"id2item": IDToItemTeacher.from_state(state["id2item"]), "seq2item": SeqToItemTeacher.from_state(state["seq2item"])}
        log(f"teachers: {folder} is up to date; reusing")
        return JobResult(folder, True, read_manifest(folder) or {}, time.perf_counter() - t0), teachers
    data, d = ctx.data, ctx.distill
    tracker.log_params({f"teachers.{k}": v for k, v in flatten(to_dict(cfg)).items()})
    with _threads(d.threads):
        idt = IDToItemTeacher(cfg.id2item, seed=cfg.seed).fit(
            data.train_users,
            data.train_items,
            n_users=data.n_users,
            n_items=data.n_items,
            valid_fn=lambda t: E.selection_score(t.item_embeddings_, data.valid, d.query_len, d.select_k, t.known_items_),
            tracker=tracker,
            progress=d.progress,
        )
        t_id = time.perf_counter() - t0
        sqt = SeqToItemTeacher(cfg.seq2item, seed=cfg.seed).fit(
            data.train_sequences, n_items=data.n_items, valid_fn=_seq_valid(data, d.select_k), tracker=tracker, progress=d.progress
        )
    import torch

    with atomic_outputs(folder) as tmp:
        write_parquet(_embedding_frame(data.item_ids, idt.item_embeddings_, idt.known_items_), tmp / "id2item.parquet")
        write_parquet(_embedding_frame(data.item_ids, sqt.item_embeddings_, sqt.known_items_), tmp / "seq2item.parquet")
        torch.save(_to_torch({"id2item": idt.to_state(), "seq2item": sqt.to_state()}), tmp / "teachers.pt")
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
    log(
        f"teachers: fitted in {secs:.1f}s (id2item valid R@{d.select_k} {max(idt.valid_curve_):.4f} at epoch {idt.best_epoch_}, "
        f"seq2item {max(sqt.valid_curve_):.4f} at epoch {sqt.best_epoch_}) -> {folder}"
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
    log: Callable[[str], None] = _log_default,
) -> JobResult:
    """Fit both teachers on the train split minus held-out items into `out_dir`.

    The protocol (held-out share and seed, query length, valid metric) comes
    from `distill`, so the teachers match the student trained with it. Seeds
    left at None take `seed`.
    """
    ctx = _context(features_dir, distill, seed, log)
    res, _ = _ensure_teachers(ctx, Path(out_dir), _resolve(cfg, seed), tracker or NullTracker(), force, log)
    return res


# --- student -----------------------------------------------------------------------


def _teacher_fps(res: JobResult) -> dict[str, str]:
    return {k: v.get("fingerprint") for k, v in res.manifest.get("outputs", {}).items()}


def _build_student(state: dict[str, Any]):
    from distill.student import ContentSpec, Student, StudentConfig

    cfg = StudentConfig(**state["config"])
    student = Student(cfg, ContentSpec(**state["spec"]), dict(state["teacher_dims"]), tuple(state["matryoshka_dims"]))
    student.load_state_dict(state["state_dict"])
    student.eval()
    return student


def _ensure_student(
    ctx: _Context,
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
    key = {
        "job": JOB_STUDENT,
        "version": VERSION,
        "config_hash": config_hash(cfg.training_key()),
        "protocol": ctx.protocol,
        "teachers": dict(teacher_fps),
        "encoders": [TEXT_MODEL, IMAGE_MODEL],
        "upstream": ctx.upstream,
    }
    if not force and is_up_to_date(folder, key) and (folder / "student.pt").is_file():
        with _foreign_checkpoint(folder / "student.pt"):
            student = _build_student(_load_pt(folder / "student.pt"))
        emb = np.asarray(pl.read_parquet(folder / EMBEDDINGS)["embedding"].to_list(), dtype=np.float32)
        log(f"{folder.name}: {folder} is up to date; reusing")
        return JobResult(folder, True, read_manifest(folder) or {}, time.perf_counter() - t0), student, emb
    content = ctx.content()
    x = ContentTensors.from_features(content, cfg.student)
    spec = ContentSpec.of(x, content.fields.vocab_size)
    targets = {n: TeacherTarget(t.item_embeddings_, t.known_items_) for n, t in teachers.items()}
    data, q, k = ctx.data, cfg.query_len, cfg.select_k
    with _threads(cfg.threads):
        fit = fit_student(
            x,
            spec,
            data,
            targets,
            cfg,
            valid_fn=lambda s: E.selection_score(s.embed(x), data.valid, q, k),
            tracker=tracker,
            seed=cfg.seed,
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
        write_parquet(_embedding_frame(data.item_ids, emb), tmp / EMBEDDINGS)
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
    best = max(fit.valid_curve) if fit.valid_curve else float("nan")
    log(f"{folder.name}: trained in {secs:.1f}s (valid score {best:.4f} at epoch {fit.best_epoch}, {fit.samples_per_s:,.0f} samples/s) -> {folder}")
    return JobResult(folder, False, manifest, secs), fit.student, emb


def _publish(out: Path, key: dict[str, Any], job: str, emb_src: Path, metrics: dict[str, Any] | None, extra: dict[str, Any]) -> dict:
    with atomic_outputs(out) as tmp:
        shutil.copyfile(emb_src, tmp / EMBEDDINGS)
        files = {}
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
            files[METRICS] = file_fingerprint(tmp / METRICS)
        return write_manifest(tmp, job=job, key=key, outputs=[EMBEDDINGS], extra={"files": files, **extra})


def train_student(
    features_dir: str | Path,
    out_dir: str | Path,
    cfg: DistillConfig = DistillConfig(),
    tracker: Tracker | None = None,
    *,
    teachers: TeachersConfig = TeachersConfig(),
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = _log_default,
) -> JobResult:
    """Teachers (OUT/teachers, reused when up to date), then the student
    (OUT/student); publishes OUT/item_embeddings.parquet for every item."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    tracker = tracker or NullTracker()
    ctx = _context(features_dir, cfg, seed, log)
    tcfg = _resolve(teachers, seed)
    key = {
        "job": JOB_TRAIN,
        "version": VERSION,
        "config_hash": config_hash(ctx.distill.training_key()),
        "teachers_hash": config_hash(tcfg),
        "protocol": ctx.protocol,
        "upstream": ctx.upstream,
    }
    if not force and is_up_to_date(out, key):
        log(f"distill train: {out} is up to date; skipping")
        return JobResult(out, True, read_manifest(out) or {}, time.perf_counter() - t0)
    tracker.log_params({f"distill.{k}": v for k, v in flatten(to_dict(ctx.distill)).items()})
    tres, tobjs = _ensure_teachers(ctx, out / "teachers", tcfg, tracker, force, log)
    sres, _, _ = _ensure_student(ctx, out / "student", ctx.distill, tobjs, _teacher_fps(tres), tracker, force, log)
    manifest = _publish(
        out, key, JOB_TRAIN, out / "student" / EMBEDDINGS, None, {"student": str(out / "student"), "seconds": time.perf_counter() - t0}
    )
    return JobResult(out, False, manifest, time.perf_counter() - t0)


# --- evaluation --------------------------------------------------------------------


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe: NaN or inf (an empty group) -> None; numpy scalars -> Python."""
    out = {}
    for k, v in metrics.items():
        v = float(v) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, (int, np.integer)) else v
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def _why_null(metrics: Mapping[str, Any], data: E.ColdStartData, known: Mapping[str, int]) -> dict[str, str]:
    """{metric: reason} for every metric that could not be computed (None):
    an empty target group, a split without impressions, a teacher that knows
    too few items for neighbourhoods. `known`: teacher name -> items it knows."""
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
        elif key.startswith("kendall_tau"):
            out[key] = "every neighbour score is tied (tau-b undefined)"
        else:
            out[key] = "could not be computed"
    return out


def _compare(
    ctx: _Context, teachers: Mapping[str, Any], students: Mapping[str, tuple[Any, np.ndarray]], cfg: DistillConfig
) -> dict[str, float]:
    """Every model on the same test impressions (plus valid at select_k), and
    the diagnostics against both teachers.

    Models: `content` (untrained [MiniLM text, field multi-hot] concatenation,
    see ContentFeatures.raw_embedding), `content_text` (MiniLM only),
    `popularity` (train positives per item), `id_teacher` (cosine, mean of the
    last query_len known items; warm only), `seq_teacher` (its own history
    encoder, dot product; warm only), each student (cosine), the full
    student's matryoshka prefixes `student_d{d}`, and `student_known_items`
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
    metrics.update(E.evaluate_retrievers(retrievers, data.test, ks, cfg.index))
    # valid at select_k for the models whose choices were made on it
    chosen = {n: r for n, r in retrievers.items() if n in students or n in ("id_teacher", "seq_teacher", "content")}
    valid = E.evaluate_retrievers(chosen, data.valid, [cfg.select_k], cfg.index)
    metrics.update({f"valid_{k}": v for k, v in valid.items()})

    # diagnostics on the items each teacher knows (warm items with a train positive)
    x = ContentTensors.from_features(content, cfg.student)
    refs = {"id_teacher": (idt, "id2item"), "seq_teacher": (sqt, "seq2item")}
    models = {"content": (None, content.raw_embedding(True))} | dict(students)
    for ref_name, (teacher, head) in refs.items():
        known = np.flatnonzero(teacher.known_items_)
        n_known = len(known)
        metrics[f"topk_overlap_chance_vs_{ref_name}"] = min(cfg.diag_k, n_known - 1) / (n_known - 1) if n_known >= 2 else math.nan
        if n_known < 2:  # no item has a neighbour: every diagnostic is undefined (null, with the reason)
            metrics.update({f"{d}_{name}_vs_{ref_name}": math.nan for name in models for d in ("nmi", "topk_overlap", "kendall_tau")})
            continue
        ref_labels = E.kmeans_labels(teacher.item_embeddings_[known], cfg.diag_clusters, cfg.seed)
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
    metrics.update({k: float(v) for k, v in data.counts.items()})
    return metrics


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
    log: Callable[[str], None] = _log_default,
) -> JobResult:
    """Cold-start evaluation: teachers, the student, one ablation per loss
    switched on (unless `ablations=False`), baselines and diagnostics, all on
    the same held-out items and test impressions. Writes OUT/metrics.json and
    OUT/item_embeddings.parquet (the full student's)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    tracker = tracker or NullTracker()
    ctx = _context(features_dir, cfg, seed, log)
    cfg, tcfg = ctx.distill, _resolve(teachers, seed)
    key = {
        "job": JOB_EVAL,
        "version": VERSION,
        "config_hash": config_hash(cfg),
        "teachers_hash": config_hash(tcfg),
        "ablations": ablations,
        "protocol": ctx.protocol,
        "upstream": ctx.upstream,
    }
    if not force and is_up_to_date(out, key) and (out / METRICS).is_file():
        log(f"distill eval: {out} is up to date; skipping")
        return JobResult(out, True, read_manifest(out) or {}, time.perf_counter() - t0, json.loads((out / METRICS).read_text()))
    tracker.log_params({f"distill.{k}": v for k, v in flatten(to_dict(cfg)).items()})
    tracker.log_params({"distill.ablations": ablations})
    timings: dict[str, float] = {}
    tres, tobjs = _ensure_teachers(ctx, out / "teachers", tcfg, tracker, force, log)
    timings["teachers_s"] = tres.seconds
    variants: dict[str, tuple[DistillConfig, Path]] = {"student": (cfg, out / "student")}
    if ablations:
        for loss in LOSSES:
            if getattr(cfg, f"use_{loss}"):
                try:
                    variants[f"student_no_{loss}"] = (cfg.ablation(loss), out / "ablations" / f"no_{loss}")
                except ValueError:  # it was the only loss switched on
                    log(f"distill eval: no ablation without {loss} (no other loss is on)")
    students: dict[str, tuple[Any, np.ndarray]] = {}
    for name, (vcfg, folder) in variants.items():
        tr = tracker if name == "student" else _Prefixed(tracker, name)
        sres, student, emb = _ensure_student(ctx, folder, vcfg, tobjs, _teacher_fps(tres), tr, force, log)
        students[name] = (student, emb)
        timings[f"{name}_s"] = sres.seconds
    t_cmp = time.perf_counter()
    with _threads(cfg.threads):
        metrics = _clean(_compare(ctx, tobjs, students, cfg))
    known = {"id_teacher": int(tobjs["id2item"].known_items_.sum()), "seq_teacher": int(tobjs["seq2item"].known_items_.sum())}
    metrics[REASONS] = _why_null(metrics, ctx.data, known)
    timings["compare_s"] = time.perf_counter() - t_cmp
    timings.update(ctx.timings)
    timings["total_s"] = time.perf_counter() - t0
    manifest = _publish(
        out, key, JOB_EVAL, out / "student" / EMBEDDINGS, metrics,
        {"config": to_dict(cfg), "teachers": to_dict(tcfg), "features": str(ctx.folder), "timings": timings},
    )  # fmt: skip
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_artifact(out / METRICS)
    if metrics[REASONS]:
        log(f"distill eval: {len(metrics[REASONS])} metrics are null (n/a); {METRICS} `{REASONS}` says why")
    log(f"distill eval: wrote {out / METRICS} in {timings['total_s']:.1f}s")
    return JobResult(out, False, manifest, timings["total_s"], metrics)


def format_metrics(metrics: Mapping[str, Any], ks: tuple[int, ...] = (10, 50, 100)) -> str:
    """Recall table (models x warm/cold Recall@k) plus the diagnostics, as text.
    A metric that could not be computed (None) shows as n/a, with one line per
    reason (metrics["reasons"]) below. A `-` cell is a group the model does not
    serve (a teacher cannot rank cold items)."""
    models = []
    for key in metrics:
        if key.startswith("recall@"):
            name = key.split("_", 2)[2]
            if name not in models:
                models.append(name)
    cols = [f"{g}@{k}" for g in ("warm", "cold") for k in ks]
    w = max(len(m) for m in models) if models else 5
    lines = [f"{'model':<{w}}  " + "  ".join(f"{c:>8}" for c in cols)]
    for m in models:
        cells = []
        for g in ("warm", "cold"):
            for k in ks:
                v = metrics.get(f"recall@{k}_{g}_{m}")
                cell = "n/a" if v is None and f"recall@{k}_{g}_{m}" in metrics else "-"
                cells.append(f"{v:8.4f}" if isinstance(v, (int, float)) else f"{cell:>8}")
        lines.append(f"{m:<{w}}  " + "  ".join(cells))
    diag = {k: v for k, v in metrics.items() if k.split("_")[0] in {"nmi", "kendall", "topk", "bijective"}}
    if diag:
        lines.append("")
        w = max(map(len, diag))
        lines += [f"{k:<{w}}  {v:.4f}" if isinstance(v, (int, float)) else f"{k:<{w}}  n/a" for k, v in diag.items()]
    reasons: dict[str, int] = {}
    for k, why in (metrics.get(REASONS) or {}).items():
        if metrics.get(k, 0) is None:
            reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        lines.append("")
        lines += [f"n/a ({n} metric{'s' if n > 1 else ''}): {why}" for why, n in reasons.items()]
    return "\n".join(lines)


__all__ = ["JobResult", "fit_teachers", "train_student", "evaluate", "format_metrics"]
