"""`build_features`: a source (MovieLens-100K/-1M, user files, synthetic) ->
validated, time-split, leak-free parquet artifacts plus a manifest. A rerun
with the same config and inputs finds the manifest up to date and skips.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features import schemas as S
from features import transforms as T
from features.core.errors import DataError, UsageError
from features.core.provenance import stage_key
from features.core.manifest import atomic_outputs, is_up_to_date, read_manifest, write_manifest, write_parquet
from features.core.paths import check_output
from features.jobs.config import JOB, JOB_VERSION, FeaturesConfig
from features.jobs.stats import summarize
from features.sources import RawSource, generate_synthetic, load_files, load_movielens1m, load_movielens100k
from features.validate import ROW, validate_interactions, validate_items, validate_users


@dataclass
class BuildResult:
    out_dir: Path
    skipped: bool
    manifest: dict[str, Any]
    seconds: float = 0.0


def load_source(cfg: FeaturesConfig) -> tuple[RawSource, pl.DataFrame | None]:
    if cfg.source == "movielens100k":
        return load_movielens100k(), None
    if cfg.source == "movielens1m":
        return load_movielens1m(), None
    if cfg.source == "files":
        return load_files(cfg.interactions, cfg.items, cfg.text_column), None
    if cfg.source == "synthetic":
        return generate_synthetic(cfg.synthetic)
    raise UsageError(f"unknown source {cfg.source!r}")


def _dedup(events: pl.DataFrame, cfg: FeaturesConfig, file: str, log: Callable[[str], None]) -> pl.DataFrame:
    conflicts = events.filter(pl.col("__conflict"))
    if conflicts.height:
        rows = (conflicts[ROW] + 1).head(5).to_list()
        raise DataError(
            f"{conflicts.height} duplicate (user_id, item_id, timestamp) rows disagree on rating/label; "
            "fix the source (these cannot be dropped safely)",
            file=file,
            column="user_id,item_id,timestamp",
            rows=rows,
        )
    dups = events.filter(pl.col("__dup"))
    if dups.height:
        rows = (dups[ROW] + 1).head(5).to_list()
        if cfg.on_duplicate == "error":
            raise DataError(
                f"{dups.height} exact duplicate rows (set on_duplicate: drop to drop them)",
                file=file,
                column="user_id,item_id,timestamp",
                rows=rows,
            )
        log(f"warning: {file}: dropped {dups.height} exact duplicate rows (first rows {rows})")
        events = events.filter(~pl.col("__dup"))
    return events.drop("__dup", "__conflict")


def _split(events: pl.DataFrame, cfg: FeaturesConfig) -> tuple[pl.LazyFrame, pl.Expr]:
    """The split column, and the last day each row's LT label may use (labels
    never look past their split's cutoff, nor past the last full day)."""
    offset = cfg.day_offset
    last_full_day = int((events[S.TIMESTAMP].max() + offset) // T.DAY_S) - 1
    if cfg.split == "leave_last_out":
        return events.lazy().pipe(T.add_split_leave_last_out), T.lt_limit_leave_last_out()
    n = events.height
    n_train = round(n * (1 - cfg.valid_frac - cfg.test_frac))
    n_valid = round(n * cfg.valid_frac)
    positions = [p for p in (n_train, n_train + n_valid) if p < n]
    cuts = T.global_time_cuts(
        events[S.TIMESTAMP].to_numpy(), events[S.USER_ID].to_numpy(), events[S.ITEM_ID].to_numpy(), positions
    )
    train_cut = cuts[0] if n_train < n else None
    valid_cut = cuts[-1] if n_train + n_valid < n else None
    if n_train == 0:
        train_cut = (-1, -1, -1)

    def day_before(cut: tuple | None) -> int:
        # the cutoff instant lies inside its day: the day before is the last full one
        return last_full_day if cut is None else min(last_full_day, int((cut[0] + offset) // T.DAY_S) - 1)

    valid_limit = day_before(valid_cut)
    limits = {"train": min(day_before(train_cut), valid_limit), "valid": valid_limit, "test": last_full_day}
    return events.lazy().pipe(T.add_split_global_time, train_cut, valid_cut), T.lt_limit_global_time(limits)


def build_features(
    cfg: FeaturesConfig,
    out_dir: str | Path,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    loaded: tuple[RawSource, pl.DataFrame | None] | None = None,
) -> BuildResult:
    """Run the feature build into `out_dir` (skipped when up to date).

    `loaded`: the result of `load_source(cfg)` when the caller already has
    it (it fingerprints the inputs, and generates synthetic data)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output(out, {"interactions": cfg.interactions, "items": cfg.items})
    source, truth = loaded if loaded is not None else load_source(cfg)
    tables = {"interactions": source.interactions, "items": source.items, "users": source.users}
    key = stage_key(JOB, {"version": JOB_VERSION, "config": cfg.relevant()},
                    {k: t.fingerprint for k, t in tables.items() if t is not None})
    if not force and is_up_to_date(out, key):
        log(f"features: {out} is up to date (same config, inputs and code); skipping")
        return BuildResult(out, True, read_manifest(out) or {}, time.perf_counter() - t0)

    inter, bounds = validate_interactions(source.interactions, cfg.timestamp_unit)
    items = validate_items(source.items) if source.items is not None else None
    users = validate_users(source.users) if source.users is not None else None

    events = (
        inter.pipe(T.add_label, cfg.label_threshold).pipe(T.sort_events, bounds).pipe(T.flag_duplicates).collect()
    )
    events = _dedup(events, cfg, source.interactions.file, log)
    if items is not None:
        unknown = events.select(pl.col(S.ITEM_ID).unique()).filter(~pl.col(S.ITEM_ID).is_in(items[S.ITEM_ID].implode()))
        if unknown.height:
            ids = sorted(unknown[S.ITEM_ID].to_list())
            raise DataError(
                f"{len(ids)} item ids of the interactions are missing from the items file "
                f"{source.items.file}: {ids[:10]}{' ...' if len(ids) > 10 else ''}",
                file=source.interactions.file,
                column=S.ITEM_ID,
            )

    split, lt_limit = _split(events, cfg)
    frame = (
        split.pipe(T.add_history_offsets, cfg.history_cap)
        .pipe(T.add_item_popularity)
        .pipe(T.add_day, cfg.day_offset)
        .with_columns(lt_limit.alias("__lt_limit"))
        .collect()
    )
    frame = (
        T.add_lt_labels(frame, frame["__lt_limit"].to_numpy())
        .lazy()
        .pipe(T.add_cold_item)
        .select([pl.col(c).cast(t) for c, t in S.INTERACTIONS_SCHEMA.items() if c != S.EVENT_IDX])
        .collect()
    )
    sequences = frame.lazy().pipe(T.to_sequences).collect()
    items_out = T.build_items(items.lazy() if items is not None else None, T.item_stats(frame.lazy())).collect()

    outputs = {
        S.FILES["interactions"]: frame,
        S.FILES["sequences"]: sequences,
        S.FILES["items"]: items_out,
    }
    if users is not None:
        outputs[S.FILES["users"]] = users
    if truth is not None:
        outputs["planted_truth.parquet"] = truth
    stats = summarize(frame, sequences, items_out, day_offset_s=cfg.day_offset)
    with atomic_outputs(out) as tmp:
        # parquet encoding releases the GIL: write the files side by side
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda kv: write_parquet(kv[1], tmp / kv[0]), outputs.items()))
        manifest = write_manifest(
            tmp,
            job=JOB,
            key=key,
            outputs=list(outputs),
            extra={
                "source": source.name,
                "config": cfg.relevant(),
                "upstream_files": {k: t.file for k, t in tables.items() if t is not None},
                "item_fields": S.item_field_kinds(items_out.schema),
                "stats": stats,
            },
        )
    secs = time.perf_counter() - t0
    log(f"features: wrote {out} ({frame.height:,} events, {sequences.height:,} users, {items_out.height:,} items) in {secs:.1f}s")
    return BuildResult(out, False, manifest, secs)

