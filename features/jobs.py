"""Feature jobs: the only module of `features` that reads and writes files.

`build_features` turns a source (MovieLens-100K, user files, synthetic) into
validated, time-split, leak-free parquet artifacts plus a manifest. A rerun
with the same config and inputs finds the manifest up to date and skips.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from features import schemas as S
from features import transforms as T
from features.core.config import config_hash, to_dict
from features.core.errors import DataError, UsageError
from features.core.manifest import atomic_outputs, is_up_to_date, read_manifest, write_manifest, write_parquet
from features.core.paths import check_output
from features.sources import (
    RawSource,
    SyntheticConfig,
    generate_synthetic,
    load_files,
    load_movielens1m,
    load_movielens100k,
)
from features.validate import ROW, validate_interactions, validate_items, validate_users

JOB = "features.build"
JOB_VERSION = 2  # bump when the output of the same inputs and config changes

if TYPE_CHECKING:
    from features.match import ItemSpace, MatchConfig

SourceName = Literal["movielens100k", "movielens1m", "files", "synthetic"]
TimestampUnit = Literal["s", "ms", "us", "ns"]

# Where a calendar day starts, per source, when `day_offset_s` is not set.
# MovieLens-100K is US data: a UTC day splits the evening sessions of US users
# at UTC midnight (12% of its next-day returns are one session crossing it).
# Its days start at 04:00 US Central (10:00 UTC), next to the activity trough
# of the data (11:00 UTC): a session rarely crosses that boundary. MovieLens-1M
# has the same trough (11:00 UTC): the same offset (next-day returns 0.193 at
# UTC days, 0.177 at this offset).
DEFAULT_DAY_OFFSET_S: dict[str, int] = {
    "movielens100k": -10 * 3600,
    "movielens1m": -10 * 3600,
    "files": 0,
    "synthetic": 0,
}


@dataclass(frozen=True)
class FeaturesConfig:
    """How raw interactions become training data (every key documented in
    experiments/configs/base.yaml, section `features`)."""

    source: SourceName = "movielens100k"  # input: movielens100k | movielens1m (installed packages) | files | synthetic
    interactions: str | None = None  # files source: interactions parquet/CSV
    items: str | None = None  # files source: optional items parquet/CSV
    text_column: str = S.TEXT  # files source: the items column holding text
    timestamp_unit: TimestampUnit = "s"  # files source: unit of the timestamp column (converted to seconds on read)
    label_threshold: float = 4.0  # label = rating >= threshold (if no label column)
    split: Literal["global_time", "leave_last_out"] = "global_time"  # global time cut by event count, or last events per user
    valid_frac: float = 0.1  # global_time: share of events (by count) in valid
    test_frac: float = 0.1  # global_time: share of events (by count) in test (> 0)
    max_history: int = 10_000  # cap on history length per impression
    day_offset_s: int | None = None  # calendar days start at UTC midnight + offset; null: the source's default (movielens100k and movielens1m -36000, else 0)
    on_duplicate: Literal["drop", "error"] = "drop"  # exact duplicate rows
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # synthetic source: generator settings

    def __post_init__(self) -> None:
        if not math.isfinite(self.label_threshold):
            raise ValueError(f"label_threshold must be a finite number, got {self.label_threshold}")
        if not (0 <= self.valid_frac < 1 and 0 <= self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise ValueError("valid_frac and test_frac must be in [0, 1) and sum to less than 1")
        if self.split == "global_time" and self.test_frac == 0:
            # with no test share the later rows would still be called "test"
            raise ValueError("test_frac must be > 0 for split global_time (there is no split without a test part)")
        if self.max_history < 1:
            raise ValueError("max_history must be >= 1")
        if self.day_offset_s is not None and not -86_400 < self.day_offset_s < 86_400:
            raise ValueError("day_offset_s must be within one day (-86400, 86400)")
        if self.source == "files" and not self.interactions:
            raise ValueError("source 'files' needs `interactions` (--interactions PATH)")
        if self.source != "files" and self.timestamp_unit != "s":
            raise ValueError(f"timestamp_unit applies to the files source only (source {self.source!r} is in seconds)")

    @property
    def day_offset(self) -> int:
        """The day offset in use: `day_offset_s`, else the source's default."""
        return DEFAULT_DAY_OFFSET_S[self.source] if self.day_offset_s is None else self.day_offset_s

    def relevant(self) -> dict[str, Any]:
        """The keys that affect the output (source-specific keys of other sources dropped)."""
        d = to_dict(self) | {"day_offset_s": self.day_offset}
        if self.source != "synthetic":
            d.pop("synthetic")
        if self.source != "files":
            for k in ("interactions", "items", "text_column", "timestamp_unit"):
                d.pop(k)
        return d


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
    key = {
        "job": JOB,
        "version": JOB_VERSION,
        "config_hash": config_hash(cfg.relevant()),
        "upstream": {k: t.fingerprint for k, t in tables.items() if t is not None},
    }
    if not force and is_up_to_date(out, key):
        log(f"features: {out} is up to date (same config and inputs); skipping")
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
        split.pipe(T.add_history_offsets, cfg.max_history)
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


def summarize(
    inter: pl.DataFrame, sequences: pl.DataFrame, items: pl.DataFrame, *, day_offset_s: int | None = None
) -> dict[str, Any]:
    """Stats for `recsys data describe` and the manifest (one pass per table;
    quantiles by O(n) selection, not a sort). With `day_offset_s` (the offset
    the build used), the next-day return rate under UTC days and under it."""
    q = [0.5, 0.9, 0.99]
    seq_len = sequences.select(pl.col(S.ITEM_IDS).list.len()).to_series().to_numpy()
    hist_len = inter[S.HIST_LEN].to_numpy()
    by_split = (
        inter.group_by(S.SPLIT)
        .agg(
            pl.len().alias("events"),
            pl.col(S.LABEL).mean().alias("label_rate"),
            pl.col(S.COLD_ITEM).mean().alias("cold_item_share"),
            (pl.col(S.HIST_END) == 0).mean().alias("empty_history_share"),
        )
        .join(_users_per_split(inter), on=S.SPLIT)
        .sort(pl.col(S.SPLIT).replace_strict({s: i for i, s in enumerate(S.SPLITS)}, default=9))
        .select(S.SPLIT, "events", "users", "label_rate", "cold_item_share", "empty_history_share")
    )
    lt = inter.select(
        pl.col(S.LABEL).mean().alias("label_rate"),
        pl.col(S.RETURNED_1D).filter(pl.col(S.LT_OBSERVED)).mean().alias("returned"),
        pl.col(S.ACTIVE_DAYS_7).filter(pl.col(S.LT_OBSERVED)).mean().alias("active"),
        pl.col(S.LT_OBSERVED).mean().alias("observed"),
        pl.col(S.TIMESTAMP).min().alias("t0"),
        pl.col(S.TIMESTAMP).max().alias("t1"),
    ).row(0, named=True)
    by_offset = {}
    if day_offset_s is not None:
        user, ts = inter[S.USER_ID].to_numpy(), inter[S.TIMESTAMP].to_numpy()
        by_offset = {str(o): T.next_day_return_rate(user, ts, o) for o in dict.fromkeys([0, day_offset_s])}
    return {
        "day_offset_s": day_offset_s,
        "next_day_return_rate_by_day_offset_s": by_offset,
        "users": sequences.height,
        "items": items.height,
        "items_seen": int(items[S.FIRST_TS].is_not_null().sum()),
        "events": inter.height,
        "label_rate": float(lt["label_rate"]),
        "history_length_per_user": {f"p{int(x * 100)}": float(v) for x, v in zip(q, np.quantile(seq_len, q))}
        | {"max": int(seq_len.max())},
        "history_length_at_impression": {f"p{int(x * 100)}": float(v) for x, v in zip(q, np.quantile(hist_len, q))},
        "cold_item_share": float(items[S.COLD_ITEM].mean()),
        "returned_1d_rate": lt["returned"],
        "active_days_7_mean": lt["active"],
        "lt_observed_share": float(lt["observed"]),
        "time_range": [int(lt["t0"]), int(lt["t1"])],
        "splits": by_split.to_dicts(),
    }


def _users_per_split(inter: pl.DataFrame) -> pl.DataFrame:
    """Distinct users of each split. Rows are sorted by user and time and a
    user's split never goes back (train -> valid -> test in time, or last
    events for leave-last-out), so each (user, split) is one run of rows:
    count run starts instead of hashing every (user, split) pair."""
    starts = (pl.col(S.USER_ID) != pl.col(S.USER_ID).shift(1)) | (pl.col(S.SPLIT) != pl.col(S.SPLIT).shift(1))
    return inter.filter(starts.fill_null(True)).group_by(S.SPLIT).agg(pl.len().alias("users"))


def describe(folder: str | Path) -> dict[str, Any]:
    """Stats of a built features folder (recomputed from its files)."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None or m.get("job") != JOB:
        raise UsageError(f"{folder} is not a features folder (no features manifest): run `recsys features build` first")
    tables = {}
    for name in ("interactions", "sequences", "items"):
        path = folder / S.FILES[name]
        try:
            tables[name] = pl.read_parquet(path)
        except (OSError, pl.exceptions.PolarsError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot be read ({msg}): rebuild with `recsys features build --force`", file=str(path)) from e
    inter, seqs, items = tables["interactions"], tables["sequences"], tables["items"]
    stats = summarize(inter, seqs, items, day_offset_s=(m.get("config") or {}).get("day_offset_s"))
    stats["source"] = m.get("source")
    stats["folder"] = str(folder)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """Human table of `summarize` output."""
    lines = [f"features: {stats.get('folder', '')}  (source: {stats.get('source', '?')})", ""]
    rows = [
        ("users", f"{stats['users']:,}"),
        ("items (seen in events)", f"{stats['items']:,} ({stats['items_seen']:,})"),
        ("events", f"{stats['events']:,}"),
        ("label rate", f"{stats['label_rate']:.3f}"),
        ("cold-item share (items)", f"{stats['cold_item_share']:.3f}"),
        (
            "history length per user p50/p90/p99/max",
            "/".join(f"{v:,.0f}" for v in stats["history_length_per_user"].values()),
        ),
        (
            "history length at impression p50/p90/p99",
            "/".join(f"{v:,.0f}" for v in stats["history_length_at_impression"].values()),
        ),
        ("returned_1d rate (observed)", _fmt(stats["returned_1d_rate"])),
        ("active_days_7 mean (observed)", _fmt(stats["active_days_7_mean"])),
        ("LT window observed share", f"{stats['lt_observed_share']:.3f}"),
    ]
    offset = stats.get("day_offset_s")
    if offset is not None:
        rates = stats.get("next_day_return_rate_by_day_offset_s") or {}
        rows.append(("day boundary (day_offset_s)", f"UTC midnight {offset / 3600:+g} h ({offset} s)"))
        rows += [
            (f"next-day return rate, days at UTC {int(o) / 3600:+g} h", _fmt(r))
            for o, r in rates.items()
        ]
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    lines += ["", f"  {'split':<6} {'events':>10} {'users':>7} {'label':>6} {'cold':>6} {'no-hist':>8}"]
    for s in stats["splits"]:
        lines.append(
            f"  {s['split']:<6} {s['events']:>10,} {s['users']:>7,} {s['label_rate']:>6.3f} "
            f"{s['cold_item_share']:>6.3f} {s['empty_history_share']:>8.3f}"
        )
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def features_config_from(base: FeaturesConfig | None = None, **overrides: Any) -> FeaturesConfig:
    """Copy of `base` (default config) with the non-None overrides applied."""
    base = base or FeaturesConfig()
    kw = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **kw)


__all__ = ["FeaturesConfig", "BuildResult", "build_features", "describe", "format_stats"]


# --- match features (issue 5) ---------------------------------------------------
# features.match pulls in torch and faiss: imported inside the functions below
# so that `features build` and `--help` stay fast.

MATCH_JOB = "features.match"
MATCH_JOB_VERSION = 2  # bump when the output of the same inputs and config changes
MATCH_FILE = "match_features.parquet"
SHARDS_DIR = "shards"


@dataclass
class MatchResult:
    out_dir: Path
    skipped: bool  # the final output was already up to date
    complete: bool  # out_dir/match_features.parquet exists and is up to date
    manifest: dict[str, Any]  # final manifest (empty while shards are missing)
    shards_computed: list[int] = field(default_factory=list)  # shard indexes computed by this call
    seconds: float = 0.0


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return i, n


def match_shard_dir(out_dir: str | Path, i: int, n: int) -> Path:
    """Folder of shard i of n: its parquet and its own small manifest."""
    return Path(out_dir) / SHARDS_DIR / f"{i:04d}-of-{n:04d}"


def concat_match_shards(folders: list[str | Path]) -> pl.DataFrame:
    """Shard outputs -> the unsharded table. Shards hold whole users; the
    interactions order is (user_id, timestamp, item_id), so one stable sort
    restores it exactly."""
    frames = [pl.read_parquet(Path(f) / MATCH_FILE) for f in folders]
    return pl.concat(frames).sort([S.USER_ID, S.TIMESTAMP, S.ITEM_ID], maintain_order=True)


def _match_key(features_dir: Path, embeddings: Path, cfg: MatchConfig) -> dict[str, Any]:
    fm = read_manifest(features_dir)
    names = (S.FILES["interactions"], S.FILES["sequences"])
    if fm is None or any(n not in fm.get("outputs", {}) for n in names):
        raise UsageError(f"{features_dir} is not a features folder (no manifest); run `recsys features build` first")
    if not embeddings.is_file():
        raise UsageError(f"embeddings file {embeddings} does not exist")
    from features.core.fingerprint import file_fingerprint

    return {
        "job": MATCH_JOB,
        "version": MATCH_JOB_VERSION,
        "config_hash": config_hash(cfg.relevant()),
        "upstream": {
            "interactions": fm["outputs"][names[0]]["fingerprint"],
            "sequences": fm["outputs"][names[1]]["fingerprint"],
            "embeddings": file_fingerprint(embeddings),
        },
    }


def _match_part(
    features_dir: Path, users: np.ndarray, space: ItemSpace, cfg: MatchConfig, on_user: Callable[[int], None]
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Match features of the impressions of `users` (interactions order)."""
    from features import match as M

    inter_file = features_dir / S.FILES["interactions"]
    users_s = pl.Series(S.USER_ID, users, dtype=pl.Int64)
    inter = (
        pl.scan_parquet(inter_file)
        .filter(pl.col(S.USER_ID).is_in(users_s.implode()))
        .select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.POS_HIST_END)
        .collect()
    )
    seqs = (
        pl.scan_parquet(features_dir / S.FILES["sequences"])
        .filter(pl.col(S.USER_ID).is_in(users_s.implode()))
        .select(S.USER_ID, S.POS_ITEM_IDS, S.POS_TIMESTAMPS)
        .sort(S.USER_ID)
        .collect()
    )
    seq_users = seqs[S.USER_ID].to_numpy()
    lens = seqs[S.POS_ITEM_IDS].list.len().to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    flat_ids = seqs[S.POS_ITEM_IDS].explode().drop_nulls().to_numpy().astype(np.int64)
    flat_ts = seqs[S.POS_TIMESTAMPS].explode().drop_nulls().to_numpy().astype(np.int64)
    hist_rows, hist_found = space.rows(flat_ids)

    u = inter[S.USER_ID].to_numpy()
    end = inter[S.POS_HIST_END].to_numpy().astype(np.int64)
    ts = inter[S.TIMESTAMP].to_numpy()
    if len(seq_users):
        row_user = np.minimum(np.searchsorted(seq_users, u), len(seq_users) - 1)
        bad = (seq_users[row_user] != u) | (end > lens[row_user])
    else:
        row_user, bad = np.zeros(len(u), np.int64), np.ones(len(u), bool)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} impressions whose user or positive history is missing from {S.FILES['sequences']} "
            f"(users {sorted(set(u[bad].tolist()))[:10]}); rebuild the features",
            file=str(inter_file),
            column=S.POS_HIST_END,
        )
    # guard against stale or foreign inputs: a history must end strictly before its impression
    has = end > 0
    newest = flat_ts[offsets[row_user[has]] + end[has] - 1]
    if (newest >= ts[has]).any():
        rows = (np.flatnonzero(has)[newest >= ts[has]] + 1).tolist()
        raise DataError(
            "positive history not strictly earlier than the impression", file=str(inter_file), column=S.POS_HIST_END, rows=rows
        )

    hist = M.Histories(offsets, hist_rows, flat_ts)
    dropped = int((~hist_found).sum())
    if dropped:  # missing_items == "null": unknown history items are left out
        hist, end = hist.drop(hist_found, end, row_user)
    cand_rows, cand_found = space.rows(inter[S.ITEM_ID].to_numpy())
    feats = M.compute_match_features(space, hist, row_user, cand_rows, end, cfg, on_user=on_user)
    stats = {
        "rows": inter.height,
        "users": len(seq_users),
        "rows_empty_history": int((np.minimum(end, cfg.history_cap) == 0).sum()),
        "rows_missing_candidate": int((~cand_found).sum()),
        "history_events_dropped": dropped,
    }
    return M.to_frame(inter, feats, cfg), stats


def _shard_count(features_dir: Path, shard: tuple[int, int] | None, configured: int, log: Callable[[str], None]) -> int:
    """Number of shards of this run, bounded by the number of users: a shard
    holds whole users, so more shards than users would be empty (and a huge
    `n` must never cost memory or time)."""
    fm = read_manifest(features_dir) or {}
    users = int(fm.get("outputs", {}).get(S.FILES["sequences"], {}).get("rows", 0)) or 1
    if shard is not None:
        i, n = shard
        if n > users:
            raise UsageError(
                f"--shard {i}/{n}: {n:,} shards for {users:,} users of {features_dir}; "
                f"use at most {users:,} shards (each shard holds whole users)"
            )
        return n
    if configured > users:
        log(f"match: {configured} shards configured for {users} users: using {users}")
    return max(1, min(configured, users))


def _remove_shards(out: Path, keep: set[str]) -> None:
    """Remove shard folders (and their lock files) under out/shards except
    `keep`; the folder itself once empty. Temp folders of live writers stay
    (their owners clean up)."""
    import shutil

    root = out / SHARDS_DIR
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".") or p.name in keep or not p.is_dir():
            continue
        shutil.rmtree(p, ignore_errors=True)
        (root / f".{p.name}.lock").unlink(missing_ok=True)
    if not keep and not any(root.iterdir()):
        root.rmdir()


def build_match_features(
    features_dir: str | Path,
    embeddings_path: str | Path,
    out_dir: str | Path,
    cfg: MatchConfig | None = None,
    *,
    shard: tuple[int, int] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> MatchResult:
    """Match features of every impression of `features_dir` -> `out_dir/match_features.parquet`.

    The users are split into shards by a stable hash of user_id (`cfg.shards`
    of them, or only shard i of n with `shard=(i, n)`). Each finished shard is
    written atomically with its own manifest under `out_dir/shards/`, so a
    killed run resumes after the last finished shard; once every shard of n
    is there, they are merged (interactions order) into the final file and
    manifest. Skipped when up to date (same config, features and embeddings).
    """
    from tqdm import tqdm

    from features import match as M

    t0 = time.perf_counter()
    cfg = cfg or M.MatchConfig()
    feats_dir, emb_path, out = Path(features_dir), Path(embeddings_path), Path(out_dir)
    check_output(out, {"features": feats_dir, "embeddings": emb_path})
    key = _match_key(feats_dir, emb_path, cfg)
    n = _shard_count(feats_dir, shard, cfg.shards, log)
    if not force and is_up_to_date(out, key):
        log(f"match: {out} is up to date (same config, features and embeddings); skipping")
        return MatchResult(out, True, True, read_manifest(out) or {}, [], time.perf_counter() - t0)
    todo = [shard[0]] if shard else list(range(n))

    def shard_key(i: int) -> dict[str, Any]:
        return {**key, "shard": [i, n]}

    pending = [i for i in todo if force or not is_up_to_date(match_shard_dir(out, i, n), shard_key(i))]
    if len(pending) < len(todo):
        log(f"match: resuming: {len(todo) - len(pending)} of {len(todo)} shards already done")

    computed: list[int] = []
    if pending:
        emb_df = pl.read_parquet(emb_path)
        ids, vec = M.validate_embeddings(emb_df, str(emb_path), cfg.dim)
        needed = pl.scan_parquet(feats_dir / S.FILES["interactions"]).select(pl.col(S.ITEM_ID).unique()).collect()
        missing = M.check_missing_items(ids, needed[S.ITEM_ID].to_numpy(), str(emb_path), cfg.missing_items)
        if len(missing):
            log(f"warning: {emb_path}: {len(missing)} items without a vector get null match features")
        space = M.ItemSpace.build(ids, vec, cfg)
        users = pl.scan_parquet(feats_dir / S.FILES["sequences"]).select(S.USER_ID).collect()[S.USER_ID].to_numpy()
        of = M.stable_shard(users, n)
        bar = tqdm(total=int(np.isin(of, pending).sum()), unit="user", desc="match", disable=None if progress else True)
        for i in pending:
            frame, stats = _match_part(feats_dir, users[of == i], space, cfg, bar.update)
            with atomic_outputs(match_shard_dir(out, i, n)) as tmp:
                write_parquet(frame, tmp / MATCH_FILE)
                write_manifest(
                    tmp,
                    job=MATCH_JOB,
                    key=shard_key(i),
                    outputs=[MATCH_FILE],
                    extra={"stats": {**stats, "items_missing": len(missing), "dim": space.dim}},
                )
            computed.append(i)
        bar.close()

    dirs = [match_shard_dir(out, i, n) for i in range(n)]
    if not all(is_up_to_date(d, shard_key(i), verify_outputs=False) for i, d in enumerate(dirs)):
        secs = time.perf_counter() - t0
        log(f"match: wrote shard(s) {computed} of {n} under {out / SHARDS_DIR} in {secs:.1f}s")
        return MatchResult(out, False, False, {}, computed, secs)
    frame = concat_match_shards(dirs)
    expected = (read_manifest(feats_dir) or {})["outputs"][S.FILES["interactions"]]["rows"]
    if frame.height != expected:  # e.g. users of the interactions missing from sequences.parquet
        raise DataError(
            f"the shards hold {frame.height:,} rows, the interactions {expected:,}: rebuild the features",
            file=str(feats_dir / S.FILES["sequences"]),
            column=S.USER_ID,
        )
    parts = [read_manifest(d) or {} for d in dirs]
    total = {k: sum(p["stats"][k] for p in parts) for k in parts[0]["stats"] if k not in ("items_missing", "dim")}
    total |= {k: parts[0]["stats"][k] for k in ("items_missing", "dim")}
    with atomic_outputs(out) as tmp:
        write_parquet(frame, tmp / MATCH_FILE)
        manifest = write_manifest(
            tmp,
            job=MATCH_JOB,
            key=key,
            outputs=[MATCH_FILE],
            extra={
                "config": cfg.relevant(),
                "columns": cfg.columns(),
                "shards": n,
                "upstream_files": {"features": str(feats_dir), "embeddings": str(emb_path)},
                "stats": total,
            },
        )
    # merged: the parts of other layouts (an older --shard i/m, another
    # config's shard count) are stale, and after an unsharded run its own
    # parts are redundant too
    _remove_shards(out, keep=set() if shard is None else {d.name for d in dirs})
    secs = time.perf_counter() - t0
    log(f"match: wrote {out / MATCH_FILE} ({frame.height:,} rows, {total['users']:,} users) in {secs:.1f}s")
    return MatchResult(out, False, True, manifest, computed, secs)


__all__ += ["MatchResult", "build_match_features", "concat_match_shards", "match_shard_dir", "parse_shard"]
