"""Ranker inputs: requests, batches, and the ONE place KeyedJaggedTensors are built.

A *request* is one user's history at one time with its C candidates: every
impression of that user at that timestamp (MovieLens users rate in batches,
so ties are common), plus, for training, optionally sampled negatives. The
history (the user's events strictly earlier, the last `max_history` of them)
is looked up once per request and shared by its candidates.

Shape legend:
    B  requests in a batch
    C  candidates of one request (C_b varies; N = sum_b C_b candidates in all)
    L  history length of one request (L_b varies, capped at max_history)
    F  dense features per candidate

Sparse inputs of a `Batch` (all int64 ids, 0-based table rows):
    sequence_features  KJT, stride B, keys ("hist_item", "cand_item"): the
                       jagged history (L_b per request) and the candidates
                       (C_b per request), looked up in ONE item table
                       (EmbeddingCollection): the shared item vocabulary.
    user_features      KJT, stride B: "user" (id) and one key per categorical
                       user field ("user_<field>"), pooled (EmbeddingBagCollection).
    item_features      KJT, stride N: one key per categorical item field
                       ("item_<field>", multi-valued for List(String) fields
                       such as ML-100K genres), pooled per candidate.
Dense input (N, F), candidate order = the jagged order of "cand_item":
    log1p(hist_len), log1p(item_pop), log1p(pos_hist_len), the user's events
    in the last 1 and 7 days and log seconds since the last event (from the
    same strictly-earlier events; they feed the LT-proxy head), the match features
    `mf_*`, their missing-value indicators, numeric item and user fields. Counts
    and match features are standardised with statistics of the TRAIN split only
    (missing values -> 0 after standardising, indicator 1).

Sampled negatives (`negatives > 0`, training only) get label 0, no LT label
(lt_mask False), row id -1, `sampled` True; their item_pop is counted exactly
(events on the item strictly before the request time) and their match features
are missing (match features exist only for real impressions).

Example:
    >>> data = RankingData.load("artifacts/ml100k/features", DataConfig(max_history=50))  # doctest: +SKIP
    >>> batch = next(data.iter_batches("train", batch_size=32))                              # doctest: +SKIP
    >>> batch.sequence_features.keys()                                                       # doctest: +SKIP
    ['hist_item', 'cand_item']
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features import schemas as S
from features.core.errors import DataError, SchemaError, UsageError

HIST_KEY = "hist_item"
CAND_KEY = "cand_item"
USER_KEY = "user"
MATCH_FILE = "match_features.parquet"
MATCH_PREFIX = "mf_"
COUNT_FEATURES = ("log1p_hist_len", "log1p_item_pop", "log1p_pos_hist_len")
# the user's activity just before the request, from the same strictly-earlier events
ACTIVITY_FEATURES = ("log1p_events_1d", "log1p_events_7d", "log1p_since_last_s")
_DAY_S = 86_400
SPLIT_CODE = {name: i for i, name in enumerate(S.SPLITS)}

# column -> kind of dtype this module needs ("int", "str", "bool", "list_int")
_INTERACTION_COLUMNS = {
    S.USER_ID: "int",
    S.ITEM_ID: "int",
    S.TIMESTAMP: "int",
    S.LABEL: "int",
    S.SPLIT: "str",
    S.HIST_END: "int",
    S.HIST_LEN: "int",
    S.POS_HIST_LEN: "int",
    S.ITEM_POP: "int",
    S.RETURNED_1D: "int",
    S.ACTIVE_DAYS_7: "int",
    S.LT_OBSERVED: "bool",
}
_SEQUENCE_COLUMNS = {S.USER_ID: "int", S.ITEM_IDS: "list_int", S.TIMESTAMPS: "list_int"}
_ITEM_COLUMNS = {S.ITEM_ID: "int"}
_MATCH_KEYS = (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)


@dataclass(frozen=True)
class DataConfig:
    """How requests are built (filled from the `ranker` and `train` sections).

    max_history: keep the last this many events of each history (>= 1).
    negatives: sampled negatives per training request (0 = none).
    use_match_features: read `mf_*` columns when a match file is given.
    match_columns: the match columns to use; empty = every `mf_*` column.
    """

    max_history: int = 200
    negatives: int = 0
    use_match_features: bool = True
    match_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        bad = [c for c in self.match_columns if not c.startswith(MATCH_PREFIX)]
        if bad:
            raise ValueError(f"match_columns must start with {MATCH_PREFIX!r}, got {bad[0]!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """What the model must know about the inputs: vocabularies and dense width.

    user_fields / item_fields: (KJT key, vocabulary size) per pooled feature;
    user_fields includes the user id key "user" when present.
    """

    n_items: int
    n_users: int
    user_fields: tuple[tuple[str, int], ...] = ()
    item_fields: tuple[tuple[str, int], ...] = ()
    dense_names: tuple[str, ...] = COUNT_FEATURES

    @property
    def n_dense(self) -> int:
        return len(self.dense_names)


@dataclass
class Batch:
    """One batch of B requests / N candidates (see the module docstring).

    labels (N,) float32 click label; lt_labels (N,) float32 `returned_1d`;
    lt_mask (N,) bool: LT label usable (lt_observed and not sampled);
    sampled (N,) bool; row_ids (N,) int64 row of interactions.parquet (-1 for
    sampled negatives); cand_lengths (B,) int64 C_b; hist_lengths (B,) int64 L_b.
    """

    sequence_features: KeyedJaggedTensor
    user_features: KeyedJaggedTensor | None
    item_features: KeyedJaggedTensor | None
    dense: Tensor  # (N, F)
    cand_lengths: Tensor  # (B,)
    hist_lengths: Tensor  # (B,)
    labels: Tensor  # (N,)
    lt_labels: Tensor  # (N,)
    lt_mask: Tensor  # (N,)
    sampled: Tensor  # (N,)
    row_ids: Tensor  # (N,)

    @property
    def n_requests(self) -> int:
        return int(self.cand_lengths.shape[0])

    @property
    def n_candidates(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = None if v is None else v.to(device=torch.device(device), non_blocking=non_blocking)
        return Batch(**moved)


# --- small vectorised helpers ---------------------------------------------------------


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices [s_0, s_0+l_0) ++ [s_1, s_1+l_1) ++ ... without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.cumsum(lengths) - lengths  # (K,)
    return np.arange(total, dtype=np.int64) - np.repeat(seg_start - np.asarray(starts, dtype=np.int64), lengths)


@dataclass
class _Csr:
    """Per-entity id lists: entity e owns values[offsets[e]:offsets[e+1]]."""

    offsets: np.ndarray  # (E + 1,)
    values: np.ndarray  # (nnz,)

    def gather(self, entities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.offsets[entities + 1] - self.offsets[entities]
        return self.values[concat_ranges(self.offsets[entities], lengths)], lengths


def _kind_ok(dtype: pl.DataType, kind: str) -> bool:
    if kind == "int":
        return dtype.is_integer()
    if kind == "str":
        return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    if kind == "bool":
        return dtype == pl.Boolean
    if kind == "list_int":
        return isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_integer()
    if kind == "float":
        return dtype.is_numeric() or dtype == pl.Null
    raise ValueError(kind)


def _check_columns(schema: pl.Schema, needed: dict[str, str], file: str) -> None:
    for col, kind in needed.items():
        if col not in schema:
            raise SchemaError(f"missing column (found: {', '.join(schema.names())})", file=file, column=col)
        if not _kind_ok(schema[col], kind):
            raise SchemaError(f"dtype {schema[col]} is not {kind}", file=file, column=col)


def _schema(path: Path) -> pl.Schema:
    if not path.is_file():
        raise DataError("file does not exist", file=str(path))
    try:
        return pl.Schema(pl.read_parquet_schema(path))
    except Exception as e:  # noqa: BLE001 - polars raises several types for a broken file
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from e


def _read_parquet(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    try:
        return pl.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - a damaged data page after a readable footer
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from e


def _read(path: Path, needed: dict[str, str]) -> pl.DataFrame:
    _check_columns(_schema(path), needed, str(path))
    return _read_parquet(path)


def _vocab_csr(frame: pl.DataFrame, column: str, multi: bool, n_rows: int) -> tuple[_Csr, int]:
    """Categorical column of an entity table (row e = entity e) -> CSR of vocabulary ids."""
    col = frame[column]
    if multi:
        lists = col.list.drop_nulls()
        flat = lists.explode().drop_nulls()
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    else:
        flat = col.drop_nulls()
        lengths = col.is_not_null().to_numpy().astype(np.int64)
    vocab = np.sort(flat.cast(pl.String).unique().to_numpy().astype(str))
    ids = np.searchsorted(vocab, flat.cast(pl.String).to_numpy().astype(str)).astype(np.int64)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return _Csr(offsets, ids), max(len(vocab), 1)


def _standardize(values: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """(x - mean) / std with statistics over `fit_rows` and non-NaN values; NaN -> 0."""
    fit = values[fit_rows]
    out = np.zeros_like(values, dtype=np.float32)
    for j in range(values.shape[1]):  # loop over columns, not rows
        ok = ~np.isnan(fit[:, j])
        mean = float(fit[ok, j].mean()) if ok.any() else 0.0
        std = float(fit[ok, j].std()) if ok.sum() > 1 else 1.0
        std = std if std > 1e-12 else 1.0
        col = (values[:, j] - mean) / std
        out[:, j] = np.where(np.isnan(col), 0.0, col)
    return out


def _standardize_stats(values: np.ndarray, fit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fit = values[fit_rows]
    mean = np.nanmean(fit, axis=0) if fit.size else np.zeros(values.shape[1])
    std = np.nanstd(fit, axis=0) if fit.size else np.ones(values.shape[1])
    mean = np.where(np.isnan(mean), 0.0, mean)
    std = np.where(np.isnan(std) | (std < 1e-12), 1.0, std)
    return mean, std


def resolve_match_path(path: str | Path | None, *, key: str = "match features") -> Path | None:
    """A match-features location -> the parquet file; None only for "not
    asked for" (None, "" or "none").

    A folder must hold `match_features.parquet`; a .parquet path must exist.
    Anything else is a UsageError (exit 2) naming the path: a requested input
    that is absent is never a quiet run without it. `key` names the setting
    in the message (e.g. "paths.match_features").
    """
    if path is None or str(path).strip().lower() in ("", "none"):
        return None
    p = Path(path)
    fix = "run `recsys features match` to build it, or turn match features off (ranker.use_match_features: false)"
    if p.suffix == ".parquet":
        if not p.is_file():
            raise UsageError(f"{key}: {p} does not exist; {fix}")
        return p
    if not p.exists():
        raise UsageError(f"{key}: {p} does not exist; {fix}")
    f = p / MATCH_FILE
    if not f.is_file():
        raise UsageError(f"{key}: {p} holds no {MATCH_FILE}; {fix}")
    return f


# --- the dataset --------------------------------------------------------------------


class RankingData:
    """A features folder (+ match features, + item embeddings) as numpy arrays,
    ready to assemble request batches. Build it with `RankingData.load`.

    Impressions are stored grouped by request: request r owns impressions
    `req_offsets[r]:req_offsets[r+1]`; requests are sorted by (split, user, time).
    """

    def __init__(self) -> None:  # filled by `load`; kept argument-free on purpose
        self.config = DataConfig()
        self.spec = FeatureSpec(n_items=1, n_users=1)
        self.item_ids = np.zeros(0, dtype=np.int64)  # (n_items,) raw id of each table row
        self.user_ids = np.zeros(0, dtype=np.int64)
        self.item_embeddings: Tensor | None = None  # (n_items, De) distilled, frozen
        self.embedding_coverage = 0.0
        self.match_columns: tuple[str, ...] = ()
        self.interactions_file = ""  # for error messages

    # ---- loading --------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        features_dir: str | Path,
        config: DataConfig,
        match_path: str | Path | None = None,
        embeddings_path: str | Path | None = None,
    ) -> RankingData:
        """Read and validate the artifacts; SchemaError names the file and column."""
        self = cls()
        self.config = config
        root = Path(features_dir)
        self.interactions_file = str(root / S.FILES["interactions"])
        inter = _read(root / S.FILES["interactions"], _INTERACTION_COLUMNS)
        seqs = _read(root / S.FILES["sequences"], _SEQUENCE_COLUMNS)
        items = _read(root / S.FILES["items"], _ITEM_COLUMNS)
        users_path = root / S.FILES["users"]
        users = _read(users_path, {S.USER_ID: "int"}) if users_path.exists() else None

        self._index_entities(inter, seqs, items, users, root)
        self._load_requests(inter, seqs, root)
        dense_parts = [self._count_features(inter), self._activity_features(inter)]
        dense_names = list(COUNT_FEATURES + ACTIVITY_FEATURES)
        match = resolve_match_path(match_path) if config.use_match_features else None
        if match is not None:
            mf, names = self._match_features(inter, match)
            dense_parts.append(mf)
            dense_names += names
        # impression-level dense block, stored in request order
        self.imp_dense = np.concatenate(dense_parts, axis=1)[self.imp_row].astype(np.float32)  # (n_imp, F1)
        self._content_fields(items, users)
        dense_names += [f"item_{c}" for c in self.item_numeric_names] + [f"user_{c}" for c in self.user_numeric_names]
        self.spec = FeatureSpec(
            n_items=len(self.item_ids),
            n_users=len(self.user_ids),
            user_fields=tuple((k, v) for k, (_, v) in self.user_csr.items()),
            item_fields=tuple((k, v) for k, (_, v) in self.item_csr.items()),
            dense_names=tuple(dense_names),
        )
        if embeddings_path is not None and str(embeddings_path).strip().lower() not in ("", "none"):
            self._load_embeddings(Path(embeddings_path))
        return self

    def _index_entities(self, inter, seqs, items, users, root: Path) -> None:
        item_ids = np.unique(np.concatenate([items[S.ITEM_ID].to_numpy(), inter[S.ITEM_ID].to_numpy()]))
        self.item_ids = item_ids.astype(np.int64)
        ids = [seqs[S.USER_ID].to_numpy(), inter[S.USER_ID].to_numpy()]
        if users is not None:
            ids.append(users[S.USER_ID].to_numpy())
        self.user_ids = np.unique(np.concatenate(ids)).astype(np.int64)
        self.items_frame = items
        self.users_frame = users

    def item_index(self, raw: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.item_ids, raw).astype(np.int64)

    def user_index(self, raw: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.user_ids, raw).astype(np.int64)

    def _load_requests(self, inter: pl.DataFrame, seqs: pl.DataFrame, root: Path) -> None:
        file = str(root / S.FILES["interactions"])
        bad_split = inter.filter(~pl.col(S.SPLIT).is_in(list(S.SPLITS)))
        if bad_split.height:
            raise DataError(f"unknown split value {bad_split[S.SPLIT][0]!r}", file=file, column=S.SPLIT)
        self._sequences_file = str(root / S.FILES["sequences"])
        # flattened sequences: user u's events are seq_items[seq_off[u]:seq_off[u+1]]
        seq_users = self.user_index(seqs[S.USER_ID].to_numpy())
        if len(np.unique(seq_users)) != len(seq_users):
            raise DataError("a user has more than one row", file=str(root / S.FILES["sequences"]), column=S.USER_ID)
        seqs = seqs[np.argsort(seq_users, kind="stable")]
        seq_users = np.sort(seq_users)
        seq_len = seqs[S.ITEM_IDS].list.len().fill_null(0).to_numpy().astype(np.int64)
        counts = np.zeros(len(self.user_ids), dtype=np.int64)
        counts[seq_users] = seq_len
        self.seq_off = np.r_[0, np.cumsum(counts)].astype(np.int64)  # (n_users + 1,)
        self.seq_items = self.item_index(seqs[S.ITEM_IDS].explode().drop_nulls().to_numpy().astype(np.int64))
        self.seq_ts = seqs[S.TIMESTAMPS].explode().drop_nulls().to_numpy().astype(np.int64)
        if len(self.seq_ts) != len(self.seq_items):
            raise DataError("item_ids and timestamps lists differ in length",
                            file=str(root / S.FILES["sequences"]), column=S.TIMESTAMPS)

        n = inter.height
        user = self.user_index(inter[S.USER_ID].to_numpy())
        ts = inter[S.TIMESTAMP].to_numpy().astype(np.int64)
        split = inter[S.SPLIT].replace_strict(SPLIT_CODE, return_dtype=pl.Int8).to_numpy()
        hist_end = inter[S.HIST_END].to_numpy().astype(np.int64)
        hist_len = inter[S.HIST_LEN].to_numpy().astype(np.int64)
        row = np.arange(n, dtype=np.int64)
        order = np.lexsort((row, ts, user, split))  # (n,) request order
        self.imp_row = order
        u, t, sp = user[order], ts[order], split[order]
        new = np.r_[True, (u[1:] != u[:-1]) | (t[1:] != t[:-1]) | (sp[1:] != sp[:-1])] if n else np.zeros(0, bool)
        starts = np.flatnonzero(new)
        self.req_offsets = np.r_[starts, n].astype(np.int64)  # (R + 1,)
        he, hl = hist_end[order], hist_len[order]
        req_of_imp = np.cumsum(new) - 1
        if n and ((he != he[starts][req_of_imp]).any() or (hl != hl[starts][req_of_imp]).any()):
            bad = int(order[np.flatnonzero(he != he[starts][req_of_imp])[:1]].tolist()[0]) if (he != he[starts][req_of_imp]).any() else 0
            raise DataError("impressions of one user at one timestamp disagree on hist_end/hist_len",
                            file=file, column=S.HIST_END, rows=[bad + 1])
        seq_total = self.seq_off[u[starts] + 1] - self.seq_off[u[starts]]
        if (he[starts] > seq_total).any():
            raise DataError("hist_end beyond the user's sequence in sequences.parquet", file=file, column=S.HIST_END)
        self.req_user = u[starts]
        self.req_ts = t[starts]
        self.req_split = sp[starts]
        take = np.minimum(hl[starts], self.config.max_history)
        self.req_hist_len = take.astype(np.int64)
        self.req_hist_start = self.seq_off[self.req_user] + he[starts] - take
        self.imp_item = self.item_index(inter[S.ITEM_ID].to_numpy())[order]
        self.imp_label = inter[S.LABEL].to_numpy()[order].astype(np.float32)
        self.imp_lt = inter[S.RETURNED_1D].fill_null(0).to_numpy()[order].astype(np.float32)
        self.imp_lt_mask = inter[S.LT_OBSERVED].fill_null(False).to_numpy()[order].astype(bool)
        self.train_rows = np.flatnonzero(split == SPLIT_CODE["train"])  # rows of interactions.parquet
        # events per item, sorted by (item, time): exact item_pop for sampled negatives
        self._ts_min = int(ts.min()) if n else 0
        item_all = self.item_index(inter[S.ITEM_ID].to_numpy())
        self._item_time_keys = np.sort(item_all * (1 << 33) + (ts - self._ts_min))
        self._pred_columns = inter.select(
            S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED, S.HIST_LEN
        )

    def _count_features(self, inter: pl.DataFrame) -> np.ndarray:
        raw = inter.select(
            pl.col(S.HIST_LEN).cast(pl.Float64).log1p(),
            pl.col(S.ITEM_POP).cast(pl.Float64).log1p(),
            pl.col(S.POS_HIST_LEN).cast(pl.Float64).log1p(),
        ).to_numpy()  # (n, 3)
        self._count_mean, self._count_std = _standardize_stats(raw, self.train_rows)
        return ((raw - self._count_mean) / self._count_std).astype(np.float32)

    def _activity_features(self, inter: pl.DataFrame) -> np.ndarray:
        """Events in the last day / 7 days and seconds since the last event, all
        strictly before the impression (log1p, train-standardised; no history -> 0)."""
        user = self.user_index(inter[S.USER_ID].to_numpy())
        ts = inter[S.TIMESTAMP].to_numpy().astype(np.int64)
        end = self.seq_off[user] + inter[S.HIST_END].to_numpy().astype(np.int64)  # (n,) absolute
        t0 = min(int(ts.min()), int(self.seq_ts.min()) if len(self.seq_ts) else 0) - 8 * _DAY_S
        seq_user = np.repeat(np.arange(len(self.user_ids)), np.diff(self.seq_off))
        keys = seq_user * (1 << 33) + (self.seq_ts - t0)  # sorted: users in order, each by time
        if len(keys) > 1 and (np.diff(keys) < 0).any():
            raise DataError("a user's events are not in time order", file=self._sequences_file, column=S.TIMESTAMPS)
        cols = []
        for window in (_DAY_S, 7 * _DAY_S):
            start = np.searchsorted(keys, user * (1 << 33) + (ts - window - t0), side="left")
            cols.append(np.log1p(np.maximum(end - start, 0).astype(np.float64)))
        has = end > self.seq_off[user]
        last = np.where(has, self.seq_ts[np.maximum(end - 1, 0)], ts)
        cols.append(np.where(has, np.log1p(np.maximum(ts - last, 0).astype(np.float64)), np.nan))
        raw = np.stack(cols, axis=1)  # (n, 3)
        mean, std = _standardize_stats(raw, self.train_rows)
        return np.where(np.isnan(raw), 0.0, (raw - mean) / std).astype(np.float32)

    def _match_features(self, inter: pl.DataFrame, path: Path) -> tuple[np.ndarray, list[str]]:
        file = str(path)
        schema = _schema(path)
        available = [c for c in schema.names() if c.startswith(MATCH_PREFIX)]
        wanted = list(self.config.match_columns) or available
        if not wanted:
            raise SchemaError(f"no {MATCH_PREFIX}* columns (found: {', '.join(schema.names())})", file=file,
                              column=f"{MATCH_PREFIX}*")
        _check_columns(schema, {c: "float" for c in wanted}, file)
        has_keys = all(k in schema for k in _MATCH_KEYS)
        if has_keys:
            _check_columns(schema, {k: "int" for k in _MATCH_KEYS}, file)
        frame = _read_parquet(path, [*(_MATCH_KEYS if has_keys else ()), *wanted])
        if frame.height != inter.height:
            raise DataError(f"{frame.height} rows, but interactions.parquet has {inter.height} "
                            "(one row per impression expected)", file=file)
        if has_keys:
            keys = inter.select(_MATCH_KEYS)
            same_order = frame.select(_MATCH_KEYS).equals(keys)
            if not same_order:
                frame = keys.join(frame, on=list(_MATCH_KEYS), how="left", maintain_order="left")
                if frame.height != inter.height:
                    raise DataError("duplicate (user_id, item_id, timestamp) keys", file=file, column=S.USER_ID)
        values = frame.select(pl.col(c).cast(pl.Float64) for c in wanted).to_numpy()  # (n, M)
        values = np.where(np.isfinite(values), values, np.nan)
        missing = np.isnan(values).astype(np.float32)  # (n, M)
        self._match_mean, self._match_std = _standardize_stats(values, self.train_rows)
        std = np.where(np.isnan(values), 0.0, (values - self._match_mean) / self._match_std)
        self.match_columns = tuple(wanted)
        names = wanted + [f"{c}_missing" for c in wanted]
        return np.concatenate([std, missing], axis=1).astype(np.float32), names

    def _content_fields(self, items: pl.DataFrame, users: pl.DataFrame | None) -> None:
        """Categorical fields -> pooled sparse features; numeric fields -> dense."""
        self.user_csr: dict[str, tuple[_Csr, int]] = {}
        self.item_csr: dict[str, tuple[_Csr, int]] = {}
        n_u, n_i = len(self.user_ids), len(self.item_ids)
        ident_u = _Csr(np.arange(n_u + 1, dtype=np.int64), np.arange(n_u, dtype=np.int64))
        self.user_csr[USER_KEY] = (ident_u, n_u)
        # entity tables re-indexed so that row e = table row e (missing entities: nulls)
        items_full = pl.DataFrame({S.ITEM_ID: self.item_ids}).join(items, on=S.ITEM_ID, how="left", maintain_order="left")
        kinds = S.item_field_kinds(items.schema)
        for c in kinds["categorical"]:
            self.item_csr[f"item_{c}"] = _vocab_csr(items_full, c, False, n_i)
        for c in kinds["multi"]:
            self.item_csr[f"item_{c}"] = _vocab_csr(items_full, c, True, n_i)
        self.item_numeric_names = tuple(kinds["numeric"])
        self.item_dense = self._entity_numeric(items_full, self.item_numeric_names, n_i)
        self.user_numeric_names: tuple[str, ...] = ()
        self.user_dense = np.zeros((n_u, 0), dtype=np.float32)
        if users is not None:
            users_full = pl.DataFrame({S.USER_ID: self.user_ids}).join(users, on=S.USER_ID, how="left", maintain_order="left")
            cat = [c for c, t in users.schema.items() if c != S.USER_ID and t in (pl.String, pl.Categorical)]
            multi = [c for c, t in users.schema.items() if t == pl.List(pl.String)]
            for c in cat:
                self.user_csr[f"user_{c}"] = _vocab_csr(users_full, c, False, n_u)
            for c in multi:
                self.user_csr[f"user_{c}"] = _vocab_csr(users_full, c, True, n_u)
            self.user_numeric_names = tuple(c for c, t in users.schema.items() if c != S.USER_ID and t.is_numeric())
            self.user_dense = self._entity_numeric(users_full, self.user_numeric_names, n_u)

    @staticmethod
    def _entity_numeric(frame: pl.DataFrame, names: tuple[str, ...], n: int) -> np.ndarray:
        if not names:
            return np.zeros((n, 0), dtype=np.float32)
        values = frame.select(pl.col(c).cast(pl.Float64) for c in names).to_numpy()  # (n, k)
        return _standardize(values, np.arange(n))  # static content: statistics over the entity table

    def _load_embeddings(self, path: Path) -> None:
        file = str(path)
        if not path.exists():
            raise DataError("item embeddings file does not exist", file=file)
        schema = _schema(path)
        _check_columns(schema, {S.ITEM_ID: "int"}, file)
        if "embedding" not in schema:
            raise SchemaError("missing column", file=file, column="embedding")
        dtype = schema["embedding"]
        if not (isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_float()):
            raise SchemaError(f"dtype {dtype} is not a list of floats", file=file, column="embedding")
        frame = _read_parquet(path, [S.ITEM_ID, "embedding"])
        dims = frame["embedding"].list.len().unique().to_list() if isinstance(dtype, pl.List) else [dtype.size]
        if len(dims) != 1 or dims[0] in (None, 0):
            raise DataError(f"embeddings must all have one positive length, found {sorted(map(str, dims))}",
                            file=file, column="embedding")
        mat = np.stack(frame["embedding"].to_numpy()).astype(np.float32) if isinstance(dtype, pl.List) \
            else frame["embedding"].to_numpy().astype(np.float32)
        raw = frame[S.ITEM_ID].to_numpy()
        pos = np.searchsorted(self.item_ids, raw).clip(0, len(self.item_ids) - 1)
        known = self.item_ids[pos] == raw
        table = np.zeros((len(self.item_ids), mat.shape[1]), dtype=np.float32)
        table[pos[known]] = mat[known]
        self.embedding_coverage = float(np.isin(self.item_ids, raw).mean())
        self.item_embeddings = torch.from_numpy(table)

    # ---- requests and batches -----------------------------------------------------------
    @property
    def n_requests(self) -> int:
        return len(self.req_user)

    def requests(self, split: str) -> np.ndarray:
        """Request indices of a split, in (user, time) order."""
        return np.flatnonzero(self.req_split == SPLIT_CODE[split])

    def impressions(self, request_ids: np.ndarray) -> np.ndarray:
        """Impression positions (request order) of the given requests."""
        starts = self.req_offsets[request_ids]
        return concat_ranges(starts, self.req_offsets[request_ids + 1] - starts)

    def history(self, request_id: int) -> np.ndarray:
        """Item table rows of one request's (capped) history, oldest first."""
        s = self.req_hist_start[request_id]
        return self.seq_items[s : s + self.req_hist_len[request_id]]

    def item_pop_at(self, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Events on each item strictly before each timestamp (any user)."""
        base = items * (1 << 33)
        hi = np.searchsorted(self._item_time_keys, base + (timestamps - self._ts_min), side="left")
        lo = np.searchsorted(self._item_time_keys, base, side="left")
        return (hi - lo).astype(np.int64)

    def batch(self, request_ids: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """Assemble one batch. With `rng` and config.negatives > 0, each request
        gets that many uniformly sampled negatives after its real candidates."""
        r = np.asarray(request_ids, dtype=np.int64)  # (B,)
        k = self.config.negatives if rng is not None else 0
        imp = self.impressions(r)  # (N_real,)
        c_real = self.req_offsets[r + 1] - self.req_offsets[r]  # (B,)
        c_all = c_real + k  # (B,)
        n = int(c_all.sum())
        out_off = np.cumsum(c_all) - c_all  # (B,) first candidate of each request
        real_pos = concat_ranges(out_off, c_real)  # (N_real,) where real candidates go
        f1 = self.imp_dense.shape[1]
        items = np.empty(n, dtype=np.int64)
        dense1 = np.zeros((n, f1), dtype=np.float32)
        labels = np.zeros(n, dtype=np.float32)
        lt = np.zeros(n, dtype=np.float32)
        lt_mask = np.zeros(n, dtype=bool)
        sampled = np.zeros(n, dtype=bool)
        row_ids = np.full(n, -1, dtype=np.int64)
        items[real_pos] = self.imp_item[imp]
        dense1[real_pos] = self.imp_dense[imp]
        labels[real_pos] = self.imp_label[imp]
        lt[real_pos] = self.imp_lt[imp]
        lt_mask[real_pos] = self.imp_lt_mask[imp]
        row_ids[real_pos] = self.imp_row[imp]
        if k:
            neg_pos = concat_ranges(out_off + c_real, np.full(len(r), k))  # (B k,)
            neg_req = np.repeat(r, k)  # (B k,)
            neg_items = rng.integers(0, len(self.item_ids), size=len(neg_pos))
            items[neg_pos] = neg_items
            sampled[neg_pos] = True
            # same request -> same history counts; item_pop counted at the request time
            first = self.req_offsets[neg_req]
            neg_dense = self.imp_dense[first].copy()  # (B k, F1)
            pop = np.log1p(self.item_pop_at(neg_items, self.req_ts[neg_req]).astype(np.float64))
            neg_dense[:, 1] = (pop - self._count_mean[1]) / self._count_std[1]
            m, j = len(self.match_columns), len(COUNT_FEATURES) + len(ACTIVITY_FEATURES)
            if m:
                neg_dense[:, j : j + m] = 0.0
                neg_dense[:, j + m : j + 2 * m] = 1.0
            dense1[neg_pos] = neg_dense
        cand_user = np.repeat(self.req_user[r], c_all)  # (N,)
        dense = np.concatenate([dense1, self.item_dense[items], self.user_dense[cand_user]], axis=1)  # (N, F)
        hist = concat_ranges(self.req_hist_start[r], self.req_hist_len[r])  # (sum L,)
        return build_batch(
            hist_items=self.seq_items[hist],
            hist_lengths=self.req_hist_len[r],
            cand_items=items,
            cand_lengths=c_all,
            user_sparse=self._gather_sparse(self.user_csr, self.req_user[r]),
            item_sparse=self._gather_sparse(self.item_csr, items),
            dense=dense,
            labels=(labels, lt, lt_mask),
            meta=(sampled, row_ids),
        )

    @staticmethod
    def _gather_sparse(csr: dict[str, tuple[_Csr, int]], entities: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {key: table.gather(entities) for key, (table, _) in csr.items()}

    def n_batches(self, split: str, batch_size: int, world_size: int = 1) -> int:
        per_rank = math.ceil(len(self.requests(split)) / world_size)
        return math.ceil(per_rank / max(1, batch_size // world_size)) if per_rank else 0

    def iter_batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: np.random.Generator | None = None,
        negatives: np.random.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int = 0,
    ) -> Iterator[Batch]:
        """Batches of `batch_size` requests in all (batch_size // world_size per rank).

        Every rank gets the same number of equally sized batches (collectives
        need that): the request list is padded by wrapping around, so a few
        requests may appear on two ranks; evaluation de-duplicates by row id.
        """
        ids = self.requests(split)
        if shuffle is not None:
            ids = ids[shuffle.permutation(len(ids))]
        if world_size > 1 and len(ids):
            pad = (-len(ids)) % world_size
            ids = np.concatenate([ids, ids[:pad]])[rank::world_size]
        per_rank = max(1, batch_size // world_size)
        for i, start in enumerate(range(0, len(ids), per_rank)):
            if max_batches and i >= max_batches:
                return
            yield self.batch(ids[start : start + per_rank], negatives)

    def prediction_frame(self, row_ids: np.ndarray) -> pl.DataFrame:
        """Truth columns of interactions.parquet rows (for a predictions table)."""
        return self._pred_columns[np.asarray(row_ids, dtype=np.int64)]


# --- THE place KeyedJaggedTensors are built ----------------------------------------------


def _kjt(sparse: dict[str, tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor | None:
    if not sparse:
        return None
    keys = list(sparse)
    values = np.concatenate([sparse[k][0] for k in keys]).astype(np.int64)
    lengths = np.concatenate([sparse[k][1] for k in keys]).astype(np.int64)
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))


def build_batch(
    hist_items: np.ndarray,
    hist_lengths: np.ndarray,
    cand_items: np.ndarray,
    cand_lengths: np.ndarray,
    user_sparse: dict[str, tuple[np.ndarray, np.ndarray]],
    item_sparse: dict[str, tuple[np.ndarray, np.ndarray]],
    dense: np.ndarray,
    labels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    meta: tuple[np.ndarray, np.ndarray] | None = None,
) -> Batch:
    """numpy arrays -> Batch with its KeyedJaggedTensors (the only KJT constructor).

    hist_items (sum L,), hist_lengths (B,), cand_items (N,), cand_lengths (B,),
    *_sparse: key -> (values, lengths) with B (user) or N (item) lengths,
    dense (N, F); labels = (label, lt_label, lt_mask), meta = (sampled, row_ids).
    """
    n = len(cand_items)
    seq = KeyedJaggedTensor(
        keys=[HIST_KEY, CAND_KEY],
        values=torch.from_numpy(np.concatenate([hist_items, cand_items]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([hist_lengths, cand_lengths]).astype(np.int64)),
    )
    if labels is None:
        labels = (np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, bool))
    if meta is None:
        meta = (np.zeros(n, bool), np.full(n, -1, np.int64))
    return Batch(
        sequence_features=seq,
        user_features=_kjt(user_sparse),
        item_features=_kjt(item_sparse),
        dense=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        cand_lengths=torch.from_numpy(np.asarray(cand_lengths, dtype=np.int64)),
        hist_lengths=torch.from_numpy(np.asarray(hist_lengths, dtype=np.int64)),
        labels=torch.from_numpy(labels[0].astype(np.float32)),
        lt_labels=torch.from_numpy(labels[1].astype(np.float32)),
        lt_mask=torch.from_numpy(labels[2].astype(bool)),
        sampled=torch.from_numpy(meta[0].astype(bool)),
        row_ids=torch.from_numpy(meta[1].astype(np.int64)),
    )


def synthetic_batch(
    spec: FeatureSpec, n_requests: int, history_len: int, n_candidates: int, rng: np.random.Generator
) -> Batch:
    """A random Batch of the given shape for benchmarks and tests: every request
    has exactly `history_len` events and `n_candidates` candidates."""
    b, length, c = n_requests, history_len, n_candidates
    n = b * c
    user_sparse = {}
    for key, vocab in spec.user_fields:
        user_sparse[key] = (rng.integers(0, vocab, b), np.ones(b, np.int64))
    item_sparse = {}
    for key, vocab in spec.item_fields:
        lengths = rng.integers(0, 3, n)
        item_sparse[key] = (rng.integers(0, vocab, int(lengths.sum())), lengths)
    labels = (
        (rng.random(n) < 0.5).astype(np.float32),
        (rng.random(n) < 0.3).astype(np.float32),
        rng.random(n) < 0.8,
    )
    return build_batch(
        hist_items=rng.integers(0, spec.n_items, b * length),
        hist_lengths=np.full(b, length),
        cand_items=rng.integers(0, spec.n_items, n),
        cand_lengths=np.full(b, c),
        user_sparse=user_sparse,
        item_sparse=item_sparse,
        dense=rng.standard_normal((n, spec.n_dense)).astype(np.float32),
        labels=labels,
        meta=(np.zeros(n, bool), np.arange(n, dtype=np.int64)),
    )


__all__ = [
    "Batch",
    "DataConfig",
    "FeatureSpec",
    "RankingData",
    "build_batch",
    "concat_ranges",
    "resolve_match_path",
    "synthetic_batch",
]
