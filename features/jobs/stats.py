"""Stats of a features folder: `summarize` (also stored in the build
manifest), `describe` (recomputed from the files) and `format_stats` (the
table `recsys data describe` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features import transforms as T
from features.core.errors import UsageError
from features.core.manifest import MANIFEST, read_manifest
from features.jobs.config import JOB


def _day_start(offset_s: int) -> str:
    """"HH:MM" (UTC) at which days start: day = (t + offset) // 86400 turns over at t = -offset (mod a day)."""
    start = -offset_s % 86_400
    return f"{start // 3600:02d}:{start % 3600 // 60:02d}"


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
        if not folder.is_dir():
            why = "does not exist" if not folder.exists() else "is not a folder"
        elif (folder / MANIFEST).is_file():
            why = ("holds a manifest.json that is not valid JSON" if m is None else
                   f"holds the output of {m.get('job')!r}, not of `recsys features build`")
        else:
            why = "is not a features folder (no manifest.json)"
        raise UsageError(f"{folder} {why}: run `recsys features build --out {folder}` first")
    from features.reader import read_features_table

    # each file checked against the manifest: an edited file would be described as if the build had written it
    tables = {name: read_features_table(folder, name, ()) for name in ("interactions", "sequences", "items")}
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
        rows.append(("day boundary (day_offset_s)", f"{_day_start(offset)} UTC: local midnight at UTC{offset / 3600:+g} h ({offset} s)"))
        rows += [
            (f"next-day return rate, days from {_day_start(int(o))} UTC", _fmt(r))
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

