"""Sampled negatives that look like real rows: a pool per training request.

A sampled negative is an item that exists at its request's time (its first
event at or before it), scored with the SAME features as a real impression of
that request: the request-level counts and recent activity, its own exact
item_pop, and, when the ranker reads match features, match features computed
by the match job's own per-user step (`features.jobs.match.match_rows`) with
the match job's config and embeddings, against the request's positive
history. Missing flags then follow one rule for both kinds of row (null iff
the history is empty or an item has no vector), so the model cannot tell a
sampled row by them.

Match features cost a pass of the match kernel, so a fixed pool of `POOL`
candidates per training request is drawn and scored once at load; each epoch
draws its negatives from that pool.

Shape legend: R training requests, P pool size, M match columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import from_dict
from features.core.errors import DataError
from features.core.fingerprint import file_fingerprint
from features.core.manifest import read_manifest

if TYPE_CHECKING:
    from recsys.data.dataset import RankingData

POOL = 8  # candidates per training request; each epoch draws its negatives from them
POOL_SEED = 0  # the pool is data (fixed); the epochs' draws from it follow the training seed


def existing_items(data: RankingData, request_ids: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """(len(request_ids), size) item rows drawn uniformly from the items whose
    first event is at or before each request's time."""
    exist = np.maximum(np.searchsorted(data._first_sorted, data.req_ts[request_ids], side="right"), 1)  # (R,)
    draws = (rng.random((len(request_ids), size)) * exist[:, None]).astype(np.int64)
    return data._items_by_first[draws]


def match_pool(data: RankingData, features_dir: Path, match_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pool items (R, P) of the training requests and their match block
    (R, P, 2M): train-standardised values then missing flags, exactly as
    `recsys.data.dense.match_features` builds the real rows'."""
    from features.jobs.match import inter_columns, item_space, match_rows, seq_columns
    from features.match.config import MatchConfig

    manifest = read_manifest(match_file.parent) or {}
    if manifest.get("job") == "features.match.oof":  # `recsys.oof.JOB`: train rows from fold students
        raise DataError("sampled negatives need one set of embeddings to score them with, but these are out-of-fold "
                        "match features (train rows from per-fold students): set data.negatives_per_request: 0, or "
                        "use match features without folds (match.folds: 0)", file=str(match_file))
    emb = (manifest.get("upstream_files") or {}).get("embeddings")
    if emb and not Path(emb).is_absolute():  # recorded as given before 2026-12-01: relative to that run's cwd
        emb = None
    if "config" not in manifest or not emb or not Path(emb).is_file():
        raise DataError("sampled negatives need match features computed like the real rows', but this match file's "
                        "manifest names no config or embeddings file that still exists (at an absolute path); rebuild "
                        "it with `recsys features match`, or set data.negatives_per_request: 0", file=str(match_file))
    want = ((manifest.get("key") or {}).get("upstream") or {}).get("embeddings")
    if want is not None and file_fingerprint(emb) != want:
        # replaced since (another distill run): the negatives would be scored with other vectors than the real
        # rows' match features, silently (a probe, 2026-12-01)
        raise DataError(f"the embeddings the match features were computed from, {emb}, have changed since: sampled "
                        "negatives would be scored with other vectors than the real rows; rerun `recsys features "
                        "match` on the current embeddings", file=str(match_file))
    cfg = from_dict(MatchConfig, {k: v for k, v in manifest["config"].items() if k != "folds"}, where=str(match_file))
    reqs = data.requests("train")
    items = existing_items(data, reqs, np.random.default_rng(POOL_SEED), POOL)  # (R, P)
    keys = (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)
    ends = [c for c in inter_columns(cfg) if c not in keys]  # the history ends match_rows reads
    inter = pl.read_parquet(features_dir / S.FILES["interactions"], columns=ends)
    first_row = data.imp_row[data.req_offsets[reqs]]  # a real impression of each request: its positive history
    rows = pl.DataFrame({
        S.USER_ID: np.repeat(data.user_ids[data.req_user[reqs]], POOL),
        S.ITEM_ID: data.item_ids[items.ravel()],
        S.TIMESTAMP: np.repeat(data.req_ts[reqs], POOL),
        **{c: np.repeat(inter[c].to_numpy()[first_row], POOL) for c in ends},
    })
    seqs = pl.read_parquet(features_dir / S.FILES["sequences"], columns=seq_columns(cfg))
    seqs = seqs.filter(pl.col(S.USER_ID).is_in(rows[S.USER_ID].unique().implode()))
    space, _ = item_space(features_dir, Path(emb), cfg, lambda _m: None)
    frame, _ = match_rows(rows, seqs, space, cfg, None, str(features_dir / S.FILES["interactions"]))
    values = frame.select(pl.col(c).cast(pl.Float64) for c in data.match_columns).to_numpy()  # (R P, M)
    values = np.where(np.isfinite(values), values, np.nan)
    mean, std = data.dense_stats["match"]
    block = np.concatenate([np.where(np.isnan(values), 0.0, (values - mean) / std), np.isnan(values)], axis=1)
    return items, block.reshape(len(reqs), POOL, -1).astype(np.float32)


__all__ = ["POOL", "existing_items", "match_pool"]
