"""The trained ranker as a self-contained scorer of request rows.

    export_ranker(job, run_dir, dest)   a rank stage's output -> a bundle folder
    RankerScorer.load(dest)             the bundle -> .score(requests) -> click and LT scores

A bundle holds everything scoring needs, and nothing from the features
folder: `ranker.json` (RankerConfig, FeatureSpec, the history cap, the match
columns, the train statistics that standardise the dense features, the
request columns) and `tables.pt` (best.pt's weights, the item and user
vocabularies, their content fields, the distilled item table when the model
reads one). Scores equal `recsys rank train`'s predictions for the same rows
(tests/integration/test_models_registry.py).

Shape legend: n request rows, B requests, N candidates (= n), F dense width.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from features import schemas as S
from features.core.config import to_dict
from features.core.errors import DataError
from features.core.manifest import read_manifest
from recsys.data.content import Csr
from recsys.serving.requests import (
    HISTORY,
    HISTORY_TS,
    REQUEST_SCHEMA,
    activity_raw,
    check_requests,
    counts_raw,
    match_raw,
)

if TYPE_CHECKING:
    from recsys.plan import RankJob

CONFIG_FILE = "ranker.json"
TABLES_FILE = "tables.pt"
SCORE_COLUMNS = ("score", "lt_score")  # click and LT-proxy probabilities, as in predictions.parquet


def request_schema(match_columns: tuple[str, ...]) -> dict[str, pl.DataType]:
    """The request columns a ranker with these match columns reads."""
    return {**REQUEST_SCHEMA, **{c: pl.Float64 for c in match_columns}}


def _stats(stats: tuple[np.ndarray, np.ndarray] | None) -> list[list[float]]:
    """The train (mean, std) RankingData standardised a dense block with, as JSON lists."""
    mean, std = stats if stats is not None else (np.zeros(0), np.ones(0))
    return [np.asarray(mean, np.float64).tolist(), np.asarray(std, np.float64).tolist()]


def export_ranker(job: RankJob, run_dir: str | Path, dest: str | Path) -> Path:
    """Write the scoring bundle of the ranker trained into `run_dir`
    (best.pt under `job.train.checkpoints(run_dir)`: OUT/checkpoints, or
    train.checkpoint_dir) by `job` into `dest` (created)."""
    from recsys.data import RankingData

    run_dir, dest = Path(run_dir), Path(dest)
    best = job.train.checkpoints(run_dir) / "best.pt"
    if not best.is_file():
        raise DataError("no best.pt (a single-process run writes it): nothing to export", file=str(best))
    data = RankingData.load(job.features, job.data, job.match, job.embeddings)
    state = torch.load(best, map_location="cpu", weights_only=True)["model"]
    state = {k.removeprefix("model."): v for k, v in state.items()}
    tables: dict[str, Any] = {
        "state": state,
        "item_ids": torch.from_numpy(data.item_ids),
        "user_ids": torch.from_numpy(data.user_ids),
        "item_dense": torch.from_numpy(data.item_dense),
        "user_dense": torch.from_numpy(data.user_dense),
        "csr": {f"{side}/{key}": (torch.from_numpy(c.offsets), torch.from_numpy(c.values))
                for side, csrs in (("user", data.user_csr), ("item", data.item_csr)) for key, (c, _) in csrs.items()},
    }
    if data.item_embeddings is not None:
        tables["distilled"] = data.item_embeddings
    features_cap = (read_manifest(job.features) or {}).get("config", {}).get("history_cap")
    config = {
        "ranker": to_dict(job.model),
        "spec": dataclasses.asdict(data.spec),
        "history_cap": job.data.history_cap,
        # the features build's cap on hist_len/pos_hist_len (the encoders read min(hist_len, history_cap) events)
        "features_history_cap": features_cap,
        # the events a request's history encoder reads: the window of an IncrementalSVDState serving it
        "serving_window": min(job.data.history_cap, features_cap or job.data.history_cap),
        "match_columns": list(data.match_columns),
        "stats": {name: _stats(data.dense_stats.get(name)) for name in ("count", "activity", "match")},
        "request_columns": {c: str(t) for c, t in request_schema(data.match_columns).items()},
        "score_columns": list(SCORE_COLUMNS),
    }
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(tables, dest / TABLES_FILE)
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dest


def _scale(raw: np.ndarray, stats: list[list[float]]) -> np.ndarray:
    mean, std = np.asarray(stats[0], np.float64), np.asarray(stats[1], np.float64)
    return np.where(np.isnan(raw), 0.0, (raw - mean) / std)


_MATCH_COUNT = re.compile(r"_(count_gt|faiss_rank|hist_len|sid_l\d+)$")  # match columns that count (>= 0)


class RankerScorer:
    """A bundle loaded for scoring: `.score(requests)` -> DataFrame(score, lt_score)."""

    def __init__(self, model: Any, config: dict[str, Any], tables: dict[str, Any]) -> None:
        self.model = model.eval()
        self.config = config
        self.match_columns = tuple(config["match_columns"])
        self.item_ids = tables["item_ids"].numpy()
        self.user_ids = tables["user_ids"].numpy()
        self.item_dense = tables["item_dense"].numpy()
        self.user_dense = tables["user_dense"].numpy()
        self.csr = {k: Csr(o.numpy(), v.numpy()) for k, (o, v) in tables["csr"].items()}

    @classmethod
    def load(cls, bundle: str | Path) -> RankerScorer:
        from recsys.config.sections import RankerConfig
        from recsys.data import FeatureSpec
        from recsys.models.ranker import Ranker

        bundle = Path(bundle)
        config = json.loads((bundle / CONFIG_FILE).read_text())
        tables = torch.load(bundle / TABLES_FILE, map_location="cpu", weights_only=True)
        spec_d = config["spec"]
        spec = FeatureSpec(spec_d["n_items"], spec_d["n_users"], tuple(map(tuple, spec_d["user_fields"])),
                           tuple(map(tuple, spec_d["item_fields"])), tuple(spec_d["dense_names"]))
        rc = config["ranker"]
        ranker_cfg = RankerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in rc.items()})
        model = Ranker(ranker_cfg, spec, item_embeddings=tables.get("distilled"))
        model.load_state_dict(tables["state"])
        return cls(model, config, tables)

    def _index(self, ids: np.ndarray, vocab: np.ndarray, what: str, column: str) -> np.ndarray:
        """Positions of `ids` in `vocab`; an unknown id is an error naming the request column it came from."""
        pos = np.searchsorted(vocab, ids).clip(0, max(len(vocab) - 1, 0))
        unknown = vocab[pos] != ids if len(vocab) else np.ones(len(ids), bool)
        if unknown.any():
            distinct = np.unique(ids[unknown])
            raise ValueError(f"request column {column!r}: {len(distinct)} {what} id(s) not in the ranker's vocabulary, "
                             f"e.g. {distinct[:5].tolist()}; the ranker scores known {what}s only")
        return pos.astype(np.int64)

    def _gather(self, side: str, entities: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        prefix = f"{side}/"
        return {k[len(prefix):]: c.gather(entities) for k, c in self.csr.items() if k.startswith(prefix)}

    def _check(self, frame: pl.DataFrame) -> None:
        missing = [c for c in request_schema(self.match_columns) if c not in frame.columns]
        if missing:
            raise ValueError(f"request rows lack column(s) {missing}; expected {list(request_schema(self.match_columns))}")
        check_requests(frame, self.config.get("features_history_cap"))
        for c in self.match_columns:  # training read finite values or null; a count is never negative
            v = frame[c].cast(pl.Float64)
            checks = [(v.is_infinite(), "infinite value (a missing value is null or NaN)")]
            if _MATCH_COUNT.search(c):
                checks.append((v < 0, "negative count"))
            for bad, what in checks:
                rows = np.flatnonzero(bad.fill_null(False).to_numpy())
                if rows.size:
                    raise DataError(f"request rows: {what}", column=c, rows=rows[:5].tolist())

    def dense(self, frame: pl.DataFrame) -> np.ndarray:
        """Impression-level dense block (n, F1) in the ranker's column order."""
        st = self.config["stats"]
        hist_ts = [np.asarray(h if h is not None else [], np.int64) for h in frame[HISTORY_TS].to_list()]
        act = activity_raw(frame[S.TIMESTAMP].to_numpy(), hist_ts)
        parts = [_scale(counts_raw(frame), st["count"]), _scale(act, st["activity"])]
        if self.match_columns:
            m = match_raw(frame, self.match_columns)
            scaled = _scale(m, st["match"])
            big = ~np.isfinite(scaled.astype(np.float32)) & np.isfinite(scaled)  # finite in float64, inf in the model
            if big.any():
                col = int(np.flatnonzero(big.any(axis=0))[0])
                raise DataError("request rows: value too large for the model (float32 after standardising); a missing "
                                "value is null", column=self.match_columns[col], rows=np.flatnonzero(big[:, col])[:5].tolist())
            parts += [scaled, np.isnan(m).astype(np.float64)]
        return np.concatenate(parts, axis=1).astype(np.float32)  # (n, F1)

    @torch.no_grad()
    def score(self, requests: pl.DataFrame | Any, batch_size: int = 512) -> pl.DataFrame:
        """Click and LT probabilities (float64) of every row, in input order."""
        from recsys.data import build_batch, concat_ranges
        from recsys.models.ranker import probabilities

        frame = requests if isinstance(requests, pl.DataFrame) else pl.from_pandas(requests)
        if frame.height == 0:  # nothing to score (pandas gives an empty list column no list dtype to check)
            return pl.DataFrame({"score": [], "lt_score": []}, schema={"score": pl.Float64, "lt_score": pl.Float64})
        self._check(frame)
        n = frame.height
        frame = frame.with_row_index("_in")
        u, t = frame[S.USER_ID].to_numpy().astype(np.int64), frame[S.TIMESTAMP].to_numpy().astype(np.int64)
        order = np.lexsort((np.arange(n), t, u))  # rows grouped by request (user, time), input order within
        frame, u, t = frame[order], u[order], t[order]
        new = np.r_[True, (u[1:] != u[:-1]) | (t[1:] != t[:-1])] if n else np.zeros(0, bool)
        starts = np.flatnonzero(new)
        cand_len = np.diff(np.r_[starts, n]).astype(np.int64)  # (R,)
        items = self._index(frame[S.ITEM_ID].to_numpy().astype(np.int64), self.item_ids, "item", S.ITEM_ID)
        users = self._index(frame[S.USER_ID].to_numpy()[starts].astype(np.int64), self.user_ids, "user", S.USER_ID)
        cap = int(self.config["history_cap"])
        hist_len = frame[S.HIST_LEN].to_numpy().astype(np.int64)[starts]
        histories = frame[HISTORY].to_list()
        hist = []
        for r, s in enumerate(starts):
            h = np.asarray(histories[s] or [], np.int64)
            take = min(int(hist_len[r]), cap, len(h))
            hist.append(h[len(h) - take:] if take else h[:0])
        h_len = np.fromiter((len(h) for h in hist), np.int64, len(hist))
        h_items = self._index(np.concatenate(hist) if h_len.sum() else np.zeros(0, np.int64), self.item_ids, "item", HISTORY)
        dense1 = self.dense(frame)
        cand_user = np.repeat(users, cand_len)
        dense = np.concatenate([dense1, self.item_dense[items], self.user_dense[cand_user]], axis=1)  # (n, F)
        h_off = np.r_[0, np.cumsum(h_len)]
        c_off = np.r_[0, np.cumsum(cand_len)]
        click, lt = np.zeros(n), np.zeros(n)
        for b0 in range(0, len(starts), batch_size):
            r = np.arange(b0, min(b0 + batch_size, len(starts)))
            rows = concat_ranges(c_off[r], cand_len[r])
            batch = build_batch(
                hist_items=h_items[concat_ranges(h_off[r], h_len[r])], hist_lengths=h_len[r],
                cand_items=items[rows], cand_lengths=cand_len[r],
                user_sparse=self._gather("user", users[r]), item_sparse=self._gather("item", items[rows]),
                dense=dense[rows],
            )
            out = self.model(batch)
            click[rows], lt[rows] = probabilities(out.click), probabilities(out.lt)
        back = np.empty(n, np.int64)
        back[frame["_in"].to_numpy()] = np.arange(n)
        return pl.DataFrame({"score": click[back], "lt_score": lt[back]})


__all__ = ["CONFIG_FILE", "TABLES_FILE", "SCORE_COLUMNS", "RankerScorer", "export_ranker", "request_schema"]
