"""The match job on Spark: `features.jobs.match.match_rows` (the per-user
step of the polars engine) on each bucket of users, with the impressions and
the positive sequences of the bucket's users brought together by
`cogroup(...).applyInArrow`.

Item vectors reach the workers as a broadcast, never as a join: every
candidate's `mf_faiss_rank` ranks it among *all* items, so each worker needs
the whole catalogue anyway, and a join would ship a vector with every
impression and every history event (C + M vectors per user instead of N once
per worker). The catalogue (N x D float32, plus V x N semantic ids) must fit
in a worker's memory, as it must for the faiss index of the polars engine;
semantic IDs are computed once, on the driver, and broadcast with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from features import schemas as S
from features.jobs.match import inter_columns, match_rows, seq_columns
from features.jobs.uri import executor_uri
from features.match import ItemSpace, MatchConfig
from features.spark.arrow import cast_to, spark_schema, to_arrow, with_bucket
from features.spark.session import default_buckets, spark_session

STATS = ["rows", "users", "rows_empty_history", "rows_missing_candidate", "history_events_dropped"]
_PART = "__part_stats"  # marks the one row per group that carries the group's counts

_spaces: dict[int, tuple[Any, ItemSpace]] = {}  # per worker process: the broadcast value -> its ItemSpace


def _space(bc: Any) -> ItemSpace:
    """The broadcast catalogue as an ItemSpace, built once per worker process
    (the flat faiss index is a copy of the vectors: cheap to rebuild). A
    worker's Broadcast objects share one loaded value per broadcast."""
    value = bc.value
    if id(value) not in _spaces:
        import faiss

        ids, emb, sid = value
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        _spaces[id(value)] = (value, ItemSpace(ids, emb, sid, index))  # the value is kept: its id stays unique
    return _spaces[id(value)][1]


def _out_schema(cfg: MatchConfig) -> pl.Schema:
    keys = {c: S.INTERACTIONS_SCHEMA[c] for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)}
    return pl.Schema(keys | cfg.dtypes() | {_PART: pl.Boolean} | {f"__{k}": pl.Int64 for k in STATS})


def match_on_spark(features_dir: Path, space: ItemSpace, cfg: MatchConfig) -> tuple[pl.DataFrame, dict[str, int]]:
    """Match features of every impression of `features_dir` (interactions
    order) and the job's counts, computed on Spark."""
    schema = _out_schema(cfg)
    struct = spark_schema(schema)
    worker_cfg = dataclasses.replace(cfg, workers=1)  # Spark runs the users in parallel; one thread per task
    inter_file = str(features_dir / S.FILES["interactions"])

    with spark_session(cfg.spark, "recsys features match") as spark:
        rows = int(pl.scan_parquet(inter_file).select(pl.len()).collect().item())
        n = default_buckets(spark, cfg.spark, rows)
        spark.conf.set("spark.sql.shuffle.partitions", str(n))
        bc = spark.sparkContext.broadcast((space.item_ids, space.emb, space.sid))

        def per_bucket(left: pa.Table, right: pa.Table) -> pa.Table:
            inter = pl.from_arrow(left).select(inter_columns(cfg))
            seqs = pl.from_arrow(right).select(seq_columns(cfg))
            frame, stats = match_rows(inter, seqs, _space(bc), worker_cfg, None, inter_file)
            counts = pl.DataFrame({_PART: [True], **{f"__{k}": [int(stats[k])] for k in STATS}})
            out = pl.concat([frame.with_columns(pl.lit(False).alias(_PART)), counts], how="diagonal_relaxed")
            return cast_to(to_arrow(out), struct)

        inter = spark.read.parquet(executor_uri(inter_file)).select(*inter_columns(cfg))
        seqs = spark.read.parquet(executor_uri(features_dir / S.FILES["sequences"])).select(*seq_columns(cfg))
        grouped = with_bucket(inter, S.USER_ID, n).groupBy("__bucket").cogroup(with_bucket(seqs, S.USER_ID, n).groupBy("__bucket"))
        result = pl.from_arrow(grouped.applyInArrow(per_bucket, struct).toArrow())
        bc.unpersist()

    counts = result.filter(pl.col(_PART))
    total = {k: int(counts[f"__{k}"].sum()) for k in STATS}
    frame = (
        result.filter(~pl.col(_PART))
        .select(list(_out_schema(cfg))[: -1 - len(STATS)])
        .cast(dict(cfg.dtypes()))
        .sort([S.USER_ID, S.TIMESTAMP, S.ITEM_ID], maintain_order=True)
    )
    return frame, total
