"""`build_features`: a source (MovieLens-100K/-1M, user files, synthetic) ->
validated, time-split, leak-free parquet artifacts plus a manifest. A rerun
with the same config and inputs finds the manifest up to date and skips.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features import schemas as S
from features import transforms as T
from features.core.errors import DataError, SchemaError, UsageError
from features.core.frames import collect
from features.core.provenance import stage_key
from features.core.manifest import (
    TMP_MARK, atomic_outputs, describe_parquet, is_up_to_date, read_manifest, write_manifest, write_parquet,
)
from features.core.paths import check_output
from features.jobs.config import JOB, JOB_VERSION, FeaturesConfig
from features.jobs.steps import (
    DUP_FLAGS,
    FrameOrder,
    check_duplicates,
    check_known_items,
    interactions_table,
    item_features,
    order_and_flag,
    plan_split,
    user_features,
)
from features.jobs.uri import is_remote, local_path, shown
from features.jobs.stats import summarize
from features.sources import RawSource, RawTable, generate_synthetic, load_files, load_movielens1m, load_movielens100k
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
        inter, items = local_path(cfg.interactions, "interactions"), local_path(cfg.items, "items")
        source = load_files(inter, items, cfg.text_column)
        # a Hadoop input is read from its local copy; messages name the URI the user gave
        if is_remote(cfg.interactions):
            source = dataclasses.replace(source, interactions=dataclasses.replace(source.interactions, file=cfg.interactions))
        if is_remote(cfg.items) and source.items is not None:
            source = dataclasses.replace(source, items=dataclasses.replace(source.items, file=cfg.items))
        return source, None
    if cfg.source == "synthetic":
        return generate_synthetic(cfg.synthetic)
    raise UsageError(f"unknown source {cfg.source!r}")


def _say_which_label(inter: pl.LazyFrame, file: str, threshold: float, log: Callable[[str], None]) -> None:
    """With both a label and a rating column, say which one each row's label comes from."""
    n = inter.select(pl.col(S.LABEL).is_not_null().sum().alias("label"), pl.col(S.RATING).is_not_null().sum().alias(
        "rating"), (pl.col(S.LABEL).is_null() & pl.col(S.RATING).is_not_null()).sum().alias("from_rating")).collect().row(0, named=True)
    if n["label"] and n["rating"]:
        log(f"features: {file} has both {S.LABEL!r} and {S.RATING!r}: {n['label']:,} rows take their {S.LABEL!r} "
            f"(features.label_threshold does not apply to them), {n['from_rating']:,} rows without one take "
            f"{S.RATING} >= {threshold}")


def _typed_item_fields(items: pl.DataFrame, table: RawTable, cfg: FeaturesConfig, log: Callable[[str], None]) -> pl.DataFrame:
    """Files source: every content field gets a type the encoders read, and
    each conversion is logged (see the transforms): parquet Categorical,
    Boolean, Decimal and integer-list columns are cast; CSV columns (read as
    strings) that hold numbers only become numeric fields; columns holding
    `multi_value_sep` become multi-valued fields; NaN in a float field is a
    missing value. A column no field type fits, or an infinite number, is
    refused, naming the file, the column (and the rows). A pandas `category`
    of numbers is one category per value, as its writer meant."""
    items, numbered = T.numeric_categories(items, table.categories)
    for name in numbered:
        log(f"features: items column {name!r} is a pandas category of numbers: read as a categorical field "
            "(one category per value), not as a number")
    items, casts, unfit = T.field_dtypes(items)
    for name, dtype in unfit.items():
        raise SchemaError(f"item column of type {dtype} is no content field type (text, number, list of text): "
                          "cast it (a date to a year number, say) or drop it", file=table.file, column=name)
    for name, what in casts.items():
        log(f"features: items column {name!r} read as a field of another type ({what})")
    if table.from_csv:
        items, numeric, kept = T.parse_numeric_strings(items)
        for name in numeric:
            log(f"features: items column {name!r} holds numbers only: read as a numeric field")
        for name, why in kept.items():
            log(f"features: items column {name!r} holds numbers only but stays a categorical field, one category "
                f"per value ({why})")
    if cfg.multi_value_sep is None:
        log("features: features.multi_value_sep is null: no items column is split into values (in YAML an "
            "unquoted ~ or # reads as null: quote it to split on it)")
    else:
        items, split = T.split_multi_valued(items, cfg.multi_value_sep)
        for name, n in split.items():
            log(f"features: items column {name!r} holds {cfg.multi_value_sep!r}-separated values ({n:,} of "
                f"{items.height:,} rows): read as a multi-valued field (features.multi_value_sep; null keeps it one category)")
    items, nans, infs = T.non_finite_numbers(items)
    for name, rows in infs.items():
        raise DataError("infinite number in an item field (write a missing value as empty, or NaN)",
                        file=table.file, column=name, rows=[r + table.row_offset for r in rows])
    for name, n in nans.items():
        log(f"features: items column {name!r}: {n:,} NaN values read as missing")
    return items


def _interactions(
    inter: pl.LazyFrame, bounds: dict, items: pl.DataFrame | None, source: RawSource, cfg: FeaturesConfig,
    log: Callable[[str], None],
) -> pl.DataFrame:
    """The interactions table on the polars engine: every step over all events."""
    events = collect(order_and_flag(inter, cfg, bounds))
    flagged = events.filter(pl.col("__dup"))
    check_duplicates(flagged, cfg, source.interactions.file, log)
    events = (events.filter(~pl.col("__dup")) if flagged.height else events).drop(DUP_FLAGS)
    check_known_items(events[S.ITEM_ID], items, source.interactions.file, source.items and source.items.file,
                      events[ROW])
    plan = plan_split(cfg, bounds[S.TIMESTAMP][1], FrameOrder(events))
    if (warning := plan.empty_splits_warning(cfg)) is not None:
        log(warning)
    frame = user_features(events.lazy(), plan, cfg)
    return collect(item_features(frame.lazy()).pipe(interactions_table))


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
    out = Path(local_path(str(out_dir), "--out"))
    check_output(out, {"interactions": local_path(cfg.interactions), "items": local_path(cfg.items)})
    source, truth = loaded if loaded is not None else load_source(cfg)
    for note in source.notes:
        log(f"warning: {note}")
    tables = {"interactions": source.interactions, "items": source.items, "users": source.users}
    # the input files enter the key by content (their fingerprints), not by
    # path: the same file named relatively, absolutely or after a move skips
    keyed = {k: v for k, v in cfg.relevant().items() if k not in ("interactions", "items")}
    if source.items is not None and S.IMAGE_PATH in source.items.frame.collect_schema().names():
        # except the items file's folder where images are named: relative paths are resolved against it
        keyed["image_base"] = str(Path(source.items.file).resolve().parent)
        tilde = pl.col(S.IMAGE_PATH).cast(pl.String).str.strip_chars().str.starts_with("~").any()
        if source.items.frame.select(tilde).collect().item():  # and the home folder `~/...` cells are read from
            keyed["image_home"] = str(Path.home())
    key = stage_key(JOB, {"version": JOB_VERSION, "config": keyed},
                    {k: t.fingerprint for k, t in tables.items() if t is not None})
    if not force and is_up_to_date(out, key):
        log(f"features: {shown(out)} is up to date (same config, inputs and code); skipping")
        return BuildResult(out, True, read_manifest(out) or {}, time.perf_counter() - t0)

    # validation runs once, here, before either engine starts
    inter, bounds = validate_interactions(source.interactions, cfg.timestamp_unit, log)
    _say_which_label(inter, source.interactions.file, cfg.label_threshold, log)
    items = validate_items(source.items) if source.items is not None else None
    if items is not None and cfg.source == "files":
        items = _typed_item_fields(items, source.items, cfg, log)
    users = validate_users(source.users) if source.users is not None else None
    if cfg.engine == "spark":
        from features.spark.build import interactions_on_spark

        # staged input for the executors, beside the output (a path they can
        # read); named like a temp folder so a killed run's copy is cleaned up
        staging = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}-spark"
        missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # made for the staging
        done = False
        try:
            frame = interactions_on_spark(inter, bounds, items, source, cfg, log, staging)
            done = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            for p in missing if not done else []:  # a failed run leaves no folder it made (deepest first)
                try:
                    p.rmdir()
                except OSError:
                    break
    else:
        frame = _interactions(inter, bounds, items, source, cfg, log)
    sequences = collect(frame.lazy().pipe(T.to_sequences))
    # the default (streaming) engine: its group_by by item costs half the
    # in-memory engine's, and the output is one row per item
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
    # one chunk per column: the parquet row groups follow the chunks, and the
    # engines chunk differently; single-chunk frames give the same bytes
    outputs = {name: df.rechunk() for name, df in outputs.items()}
    earlier = set(((read_manifest(out) or {}).get("outputs") or {})) - set(outputs)
    with atomic_outputs(out) as tmp:

        def write(name: str, df: pl.DataFrame) -> tuple[str, dict]:
            write_parquet(df, tmp / name)
            return name, describe_parquet(tmp / name)  # fingerprinted while the other file is written

        # parquet encoding releases the GIL: write the files side by side
        with ThreadPoolExecutor(max_workers=2) as pool:
            described = dict(pool.map(write, outputs, outputs.values()))
        manifest = write_manifest(
            tmp,
            job=JOB,
            key=key,
            outputs=described,
            extra={
                "source": source.name,
                "engine": cfg.engine,  # recorded, not keyed: both engines write the same bytes
                "config": cfg.relevant(),
                "upstream_files": {k: t.file for k, t in tables.items() if t is not None},
                "item_fields": S.item_field_kinds(items_out.schema),
                "stats": stats,
            },
        )
    # an earlier build's outputs this one did not write (users.parquet of a
    # source with user fields, say) would be read as this build's: removed
    for name in earlier:
        if "/" not in name and name.endswith(".parquet"):
            (out / name).unlink(missing_ok=True)
    labels = frame.filter(pl.col(S.SPLIT) == "train")[S.LABEL].unique().to_list()
    if len(labels) == 1:
        log(f"warning: every train event has {S.LABEL} {labels[0]}: `rank train` and `baseline lightgbm` need both "
            f"labels (ratings: check features.label_threshold, now {cfg.label_threshold}; implicit data: add the "
            "impressions that were not clicked, label 0)" + ("; the distillation reads positives only" if labels[0] == 1
                                                              else "; the distillation learns from positives: it has none"))
    secs = time.perf_counter() - t0
    log(f"features: wrote {shown(out)} [{cfg.engine}] ({frame.height:,} events, {sequences.height:,} users, {items_out.height:,} items) in {secs:.1f}s")
    return BuildResult(out, False, manifest, secs)

