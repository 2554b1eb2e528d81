"""`RankingData`: a features folder as numpy arrays, indexed by request, that
assembles `RankBatch`es.

A *request* is one user's history at one time with its C candidates: every
impression of that user at that timestamp (MovieLens users rate in batches,
so ties are common), plus, for training, optionally sampled negatives. The
history (the user's events strictly earlier, the last `max_history` of them)
is looked up once per request and shared by its candidates.

Shape legend: B requests, C_b candidates of request b (N = sum_b C_b),
L_b history length, F1 impression-level dense width, R requests in all.

Sampled negatives (`negatives_per_request > 0`, training only) get label 0,
no LT label (lt_mask False), row id -1, `sampled` True; they are items that
exist at the request's time, their item_pop is counted exactly (events on the
item strictly before the request time), and their match features are computed
by the match job's own step (recsys.data.negatives), so they look like real
rows.

Example:
    >>> data = RankingData.load("artifacts/ml100k/features", DataConfig(history_cap=50))  # doctest: +SKIP
    >>> batch = next(data.iter_batches("train", batch_size=32))                              # doctest: +SKIP
    >>> batch.sequence_features.keys()                                                       # doctest: +SKIP
    ['hist_item', 'cand_item']
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from torch import Tensor

from features import schemas as S
from features.core.errors import DataError
from features.core.manifest import read_manifest
from features.reader import check_manifest, check_match_upstream, existing_match_file, other_items_note, read_table
from recsys.data.batch import FeatureSpec, RankBatch, build_batch, concat_ranges
from recsys.data.content import Csr, content_fields
from recsys.data.dense import (
    ACTIVITY_FEATURES,
    COUNT_FEATURES,
    ITEM_POP_COLUMN,
    activity_features,
    count_features,
    match_features,
)
from recsys.config.sections import DataConfig
from recsys.data.negatives import existing_items, match_pool
from recsys.data.read import load_item_embeddings

SPLIT_CODE = {name: i for i, name in enumerate(S.SPLITS)}
# the columns the ranker reads from each file (kinds of dtype from features.schemas)
INTERACTION_COLUMNS = (
    S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, S.SPLIT, S.HIST_END, S.HIST_LEN, S.POS_HIST_LEN, S.ITEM_POP,
    S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED,
)
SEQUENCE_COLUMNS = (S.USER_ID, S.ITEM_IDS, S.TIMESTAMPS)




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
        self.input_files: dict[str, str] = {}  # what the data was read from (a checkpoint resumes only on the same bytes)
        self.dense_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # train (mean, std) per dense block
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
        inter = read_table(root / S.FILES["interactions"], "interactions", INTERACTION_COLUMNS)
        seqs = read_table(root / S.FILES["sequences"], "sequences", SEQUENCE_COLUMNS)
        items = read_table(root / S.FILES["items"], "items", (S.ITEM_ID,))
        users_path = root / S.FILES["users"]
        listed = (read_manifest(root) or {}).get("outputs")
        # a users.parquet the build did not write (a stray file of another build) is not this folder's
        has_users = users_path.exists() and (listed is None or S.FILES["users"] in listed)
        users = read_table(users_path, "users", (S.USER_ID,)) if has_users else None

        self._index_entities(inter, seqs, items, users)
        self._load_requests(inter, seqs, root)
        counts = count_features(inter, self.train_rows)
        self._count_mean, self._count_std = counts.mean, counts.std
        # train (mean, std) of each raw dense block: a scorer standardises requests the same way
        self.dense_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {"count": (counts.mean, counts.std)}
        user = self.user_index(inter[S.USER_ID].to_numpy())
        activity, activity_stats = activity_features(inter, user, self.seq_off, self.seq_ts, self.train_rows,
                                     str(root / S.FILES["sequences"]))
        self.dense_stats["activity"] = activity_stats
        dense_parts = [counts.values, activity]
        dense_names = list(COUNT_FEATURES + ACTIVITY_FEATURES)
        match = existing_match_file(match_path) if match_path is not None else None
        if match is not None:
            check_manifest(match)
            check_match_upstream(match, root)
            mf, wanted, match_stats = match_features(inter, match, config.match_columns, self.train_rows)
            self.dense_stats["match"] = match_stats
            self.match_columns = tuple(wanted)
            dense_parts.append(mf)
            dense_names += wanted + [f"{c}_missing" for c in wanted]
            if config.negatives_per_request:  # sampled rows get real match features (recsys.data.negatives)
                self._pool_items, self._pool_match = match_pool(self, root, match)
                self._pool_of_request = np.full(self.n_requests, -1, dtype=np.int64)
                self._pool_of_request[self.requests("train")] = np.arange(self._pool_items.shape[0])
        # impression-level dense block, stored in request order
        self.imp_dense = np.concatenate(dense_parts, axis=1)[self.imp_row].astype(np.float32)  # (n_imp, F1)
        content = content_fields(items, users, self.item_ids, self.user_ids)
        self.user_csr, self.item_csr = content.user_csr, content.item_csr
        self.item_numeric_names, self.user_numeric_names = content.item_numeric_names, content.user_numeric_names
        self.item_dense, self.user_dense = content.item_dense, content.user_dense
        dense_names += [f"item_{c}" for c in self.item_numeric_names] + [f"user_{c}" for c in self.user_numeric_names]
        self.spec = FeatureSpec(
            n_items=len(self.item_ids),
            n_users=len(self.user_ids),
            user_fields=tuple((k, v) for k, (_, v) in self.user_csr.items()),
            item_fields=tuple((k, v) for k, (_, v) in self.item_csr.items()),
            dense_names=tuple(dense_names),
        )
        if embeddings_path is not None and str(embeddings_path).strip().lower() not in ("", "none"):
            self.item_embeddings, self.embedding_coverage = load_item_embeddings(Path(embeddings_path), self.item_ids)
            self.input_files["embeddings"] = str(embeddings_path)
            note = other_items_note(root, embeddings_path)
            if note:
                print(note, file=sys.stderr)
        self.input_files.update({name: str(root / S.FILES[name]) for name in ("interactions", "sequences", "items")})
        if users is not None:
            self.input_files["users"] = str(users_path)
        if match is not None:
            self.input_files["match"] = str(match)
        return self

    def _index_entities(self, inter, seqs, items, users) -> None:
        item_ids = np.unique(np.concatenate([items[S.ITEM_ID].to_numpy(), inter[S.ITEM_ID].to_numpy()]))
        self.item_ids = item_ids.astype(np.int64)
        ids = [seqs[S.USER_ID].to_numpy(), inter[S.USER_ID].to_numpy()]
        if users is not None:
            ids.append(users[S.USER_ID].to_numpy())
        self.user_ids = np.unique(np.concatenate(ids)).astype(np.int64)

    def item_index(self, raw: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.item_ids, raw).astype(np.int64)

    def user_index(self, raw: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.user_ids, raw).astype(np.int64)

    def _load_requests(self, inter: pl.DataFrame, seqs: pl.DataFrame, root: Path) -> None:
        file = str(root / S.FILES["interactions"])
        bad_split = inter.filter(~pl.col(S.SPLIT).is_in(list(S.SPLITS)))
        if bad_split.height:
            raise DataError(f"unknown split value {bad_split[S.SPLIT][0]!r}", file=file, column=S.SPLIT)
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
        take = np.minimum(hl[starts], self.config.history_cap)
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
        # items by their first event: a sampled negative exists at its request's time
        first = np.full(len(self.item_ids), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, item_all, ts.astype(np.int64))
        self._items_by_first = np.argsort(first, kind="stable")
        self._first_sorted = first[self._items_by_first]
        self._pred_columns = inter.select(
            S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED, S.HIST_LEN
        )

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

    def batch(self, request_ids: np.ndarray, rng: np.random.Generator | None = None) -> RankBatch:
        """Assemble one batch. With `rng` and config.negatives_per_request > 0, each request
        gets that many negatives after its real candidates, drawn uniformly from
        the items that exist at the request's time (first event at or before it)."""
        r = np.asarray(request_ids, dtype=np.int64)  # (B,)
        k = self.config.negatives_per_request if rng is not None else 0
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
            m, j = len(self.match_columns), len(COUNT_FEATURES) + len(ACTIVITY_FEATURES)
            if m:  # from the request's pool, with the match features the match job gives such a row
                pool = self._pool_of_request[neg_req]
                if (pool < 0).any():
                    raise ValueError("sampled negatives with match features exist for training requests only")
                pick = rng.integers(0, self._pool_items.shape[1], size=len(neg_pos))
                neg_items = self._pool_items[pool, pick]
                neg_match = self._pool_match[pool, pick]  # (B k, 2M)
            else:  # uniform over the items whose first event is at or before the request time
                neg_items = existing_items(self, neg_req, rng, 1)[:, 0]
            items[neg_pos] = neg_items
            sampled[neg_pos] = True
            # same request -> same history counts; item_pop counted at the request time
            first = self.req_offsets[neg_req]
            neg_dense = self.imp_dense[first].copy()  # (B k, F1)
            pop = np.log1p(self.item_pop_at(neg_items, self.req_ts[neg_req]).astype(np.float64))
            c = ITEM_POP_COLUMN
            neg_dense[:, c] = (pop - self._count_mean[c]) / self._count_std[c]
            if m:
                neg_dense[:, j : j + 2 * m] = neg_match
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
    def _gather_sparse(csr: dict[str, tuple[Csr, int]], entities: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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
    ) -> Iterator[RankBatch]:
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
