"""Dense features per impression: history counts, recent activity, match
features, and their standardisation.

Shape legend: n impressions (rows of interactions.parquet), M match columns.

Dense input of a batch (N, F), in this column order:
    log1p(hist_len), log1p(item_pop), log1p(pos_hist_len) (COUNT_FEATURES);
    the user's events in the last 1 and 7 days and log seconds since the last
    event (ACTIVITY_FEATURES, from the same strictly-earlier events as the
    history; they feed the LT-proxy head); the match features `mf_*` and
    their missing-value indicators; numeric item and user fields
    (`recsys.data.content`). Counts, activity and match features are
    standardised with statistics of the TRAIN split only (missing values -> 0
    after standardising, indicator 1).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError, SchemaError
from features.core.numeric import Z_CLIP, finite_mean_std
from features.reader import check_columns, parquet_schema, read_parquet

COUNT_FEATURES = ("log1p_hist_len", "log1p_item_pop", "log1p_pos_hist_len")
# the user's activity just before the request, from the same strictly-earlier events
ACTIVITY_FEATURES = ("log1p_events_1d", "log1p_events_7d", "log1p_since_last_s")
ITEM_POP_COLUMN = COUNT_FEATURES.index("log1p_item_pop")
_DAY_S = 86_400


def standardize(values: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """(x - mean) / std with statistics over `fit_rows` and non-NaN values; NaN -> 0."""
    fit = values[fit_rows]
    out = np.zeros_like(values, dtype=np.float32)
    for j in range(values.shape[1]):  # loop over columns, not rows
        ok = ~np.isnan(fit[:, j])
        mean, std = finite_mean_std(fit[ok, j]) if ok.any() else (0.0, 1.0)
        std = std if ok.sum() > 1 and std > 1e-12 else 1.0
        with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float range: clipped below
            col = (values[:, j] - mean) / std
        out[:, j] = np.clip(np.nan_to_num(col, nan=0.0, posinf=Z_CLIP, neginf=-Z_CLIP), -Z_CLIP, Z_CLIP)
    return out


def standardize_stats(values: np.ndarray, fit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column NaN-ignoring mean and std over `fit_rows` (std 1 where it is
    0 or undefined)."""
    fit = values[fit_rows]
    with warnings.catch_warnings():  # an all-NaN column (warned about by the caller) gives mean 0, std 1
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(fit, axis=0) if fit.size else np.zeros(values.shape[1])
        std = np.nanstd(fit, axis=0) if fit.size else np.ones(values.shape[1])
    for j in np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std))):  # overflowed (1e155 squared), or no value
        vals = fit[:, j][~np.isnan(fit[:, j])]
        mean[j], std[j] = finite_mean_std(vals) if len(vals) else (0.0, 1.0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    std = np.where(np.isnan(std) | (std < 1e-12), 1.0, std)
    return mean, std


@dataclass(frozen=True)
class CountFeatures:
    """COUNT_FEATURES of every impression, with the train statistics that
    standardised them (sampled negatives reuse them for their item_pop)."""

    values: np.ndarray  # (n, 3) float32, standardised
    mean: np.ndarray  # (3,)
    std: np.ndarray  # (3,)


def count_features(inter: pl.DataFrame, train_rows: np.ndarray) -> CountFeatures:
    raw = inter.select(
        pl.col(S.HIST_LEN).cast(pl.Float64).log1p(),
        pl.col(S.ITEM_POP).cast(pl.Float64).log1p(),
        pl.col(S.POS_HIST_LEN).cast(pl.Float64).log1p(),
    ).to_numpy()  # (n, 3)
    mean, std = standardize_stats(raw, train_rows)
    return CountFeatures(((raw - mean) / std).astype(np.float32), mean, std)


def recent_activity(
    ts: np.ndarray, seg: np.ndarray, seg_off: np.ndarray, events_ts: np.ndarray, end: np.ndarray, file: str = "<history>",
) -> np.ndarray:
    """Raw recent activity before each request: log1p(events in the last day),
    log1p(events in the last 7 days), log1p(seconds since the last event)
    (NaN: no history) -> (n, 3) float64. The one implementation, for training
    (`activity_features`) and serving (`recsys.serving.requests.activity_raw`).

    ts (n,) request times; request i's history is events_ts[seg_off[seg[i]] :
    end[i]], with each segment's events in time order (a DataError names
    `file` otherwise); seg_off (segments + 1,)."""
    ts = np.asarray(ts, dtype=np.int64)
    events_ts = np.asarray(events_ts, dtype=np.int64)
    begin = seg_off[seg]  # (n,)
    t0 = min(int(ts.min()) if len(ts) else 0, int(events_ts.min()) if len(events_ts) else 0) - 8 * _DAY_S
    seg_of_event = np.repeat(np.arange(len(seg_off) - 1), np.diff(seg_off))
    keys = seg_of_event * (1 << 33) + (events_ts - t0)  # sorted: segments in order, each by time
    if len(keys) > 1 and (np.diff(keys) < 0).any():
        raise DataError("a user's events are not in time order", file=file, column=S.TIMESTAMPS)
    cols = []
    for window in (_DAY_S, 7 * _DAY_S):
        start = np.maximum(np.searchsorted(keys, seg * (1 << 33) + (ts - window - t0), side="left"), begin)
        cols.append(np.log1p(np.maximum(end - start, 0).astype(np.float64)))
    has = end > begin
    last = np.where(has, events_ts[np.maximum(end - 1, 0)] if len(events_ts) else ts, ts)
    cols.append(np.where(has, np.log1p(np.maximum(ts - last, 0).astype(np.float64)), np.nan))
    return np.stack(cols, axis=1)  # (n, 3)


def activity_features(
    inter: pl.DataFrame, user: np.ndarray, seq_off: np.ndarray, seq_ts: np.ndarray, train_rows: np.ndarray,
    sequences_file: str,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """`recent_activity` of each impression, strictly before it (log1p,
    train-standardised; no history -> 0).

    user (n,) user table row of each impression; seq_off (n_users + 1,) and
    seq_ts (events,): the flattened sequences (user u's events are
    seq_ts[seq_off[u]:seq_off[u+1]]). Returns (n, 3) float32 and the train
    (mean, std) of the raw values (what a scorer needs to standardise the same way)."""
    ts = inter[S.TIMESTAMP].to_numpy().astype(np.int64)
    end = seq_off[user] + inter[S.HIST_END].to_numpy().astype(np.int64)  # (n,) absolute
    raw = recent_activity(ts, user, seq_off, seq_ts, end, sequences_file)  # (n, 3)
    mean, std = standardize_stats(raw, train_rows)
    return np.where(np.isnan(raw), 0.0, (raw - mean) / std).astype(np.float32), (mean, std)


def empty_match_warning(names: list[str], train_values: np.ndarray, file: str) -> str | None:
    """A warning naming the match columns with no value on any train row
    (train_values (n_train, M), NaN = missing), or None: such a column can
    teach a model nothing (every item missing from the embeddings, say), and
    a lift measured with it reads exactly 0 (a probe, 2026-12-01)."""
    empty = [n for n, col in zip(names, np.asarray(train_values).T) if np.isnan(col).all()]
    if not empty:
        return None
    return (f"warning: {file}: match feature(s) {', '.join(empty)} hold no value on any train row (every item missing "
            "from the embeddings?): they cannot help the model")


def match_features(
    inter: pl.DataFrame, path: Path, columns: tuple[str, ...], train_rows: np.ndarray
) -> tuple[np.ndarray, list[str], tuple[np.ndarray, np.ndarray]]:
    """The match file's `columns` (empty: every `mf_*` column) aligned with
    interactions.parquet rows, train-standardised, followed by one missing
    indicator per column -> ((n, 2M) float32, the M column names, the train
    (mean, std) of the raw values).

    A file with user_id, item_id, timestamp is joined on them; one without
    must have one row per impression in interactions.parquet order."""
    file = str(path)
    schema = parquet_schema(path)
    available = [c for c in schema.names() if c.startswith(S.MATCH_PREFIX)]
    wanted = list(columns) or available
    if not wanted:
        raise SchemaError(f"no {S.MATCH_PREFIX}* columns (found: {', '.join(schema.names())})", file=file,
                          column=f"{S.MATCH_PREFIX}*")
    check_columns(schema, {c: "float" for c in wanted}, file)
    has_keys = all(k in schema for k in S.MATCH_KEYS)
    if has_keys:
        check_columns(schema, {k: "int" for k in S.MATCH_KEYS}, file)
    frame = read_parquet(path, [*(S.MATCH_KEYS if has_keys else ()), *wanted])
    if frame.height != inter.height:
        raise DataError(f"{frame.height} rows, but interactions.parquet has {inter.height} "
                        "(one row per impression expected)", file=file)
    if has_keys:
        keys = inter.select(S.MATCH_KEYS)
        same_order = frame.select(S.MATCH_KEYS).equals(keys)
        if not same_order:
            frame = keys.join(frame, on=list(S.MATCH_KEYS), how="left", maintain_order="left")
            if frame.height != inter.height:
                raise DataError("duplicate (user_id, item_id, timestamp) keys", file=file, column=S.USER_ID)
    values = frame.select(pl.col(c).cast(pl.Float64) for c in wanted).to_numpy()  # (n, M)
    values = np.where(np.isfinite(values), values, np.nan)
    note = empty_match_warning(wanted, values[train_rows], file)
    if note:
        print(note, file=sys.stderr)
    missing = np.isnan(values).astype(np.float32)  # (n, M)
    mean, std = standardize_stats(values, train_rows)
    scaled = np.where(np.isnan(values), 0.0, (values - mean) / std)  # (n, M)
    return np.concatenate([scaled, missing], axis=1).astype(np.float32), wanted, (mean, std)
