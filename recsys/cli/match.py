"""`recsys features match`: match features of every impression (registered
into the `features` group by recsys.cli.features)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from recsys.cli import command, warnings_only

MATCH_EPILOG = """\
examples:
  recsys features match --features artifacts/ml100k/features \\
      --embeddings artifacts/ml100k/distill/item_embeddings.parquet --out artifacts/ml100k/match
  recsys features match --features F --embeddings E.parquet --out M --config experiments/configs/base.yaml
  # one shard of users per machine; the run that finishes the last shard merges them
  recsys features match --features F --embeddings E.parquet --out M --shard 0/4
  # the same output on Spark (local[2] unless --spark-master); paths may be file:// URIs,
  # or on Spark any Hadoop filesystem (its settings under match.spark.conf of --config)
  recsys features match --engine spark --features file:///data/F --embeddings E.parquet --out file:///data/M
  recsys features match --engine spark --features hdfs://nn/F --embeddings hdfs://nn/E.parquet --out hdfs://nn/M

Writes OUT/match_features.parquet (one row per impression of
FEATURES/interactions.parquet, same user_id/item_id/timestamp and order, mf_*
columns) and OUT/manifest.json. The embeddings file has columns item_id (Int64)
and embedding (List(Float32)); vectors are L2-normalised here. Finished shards
live under OUT/shards/ with their own manifests: a killed run resumes where it
stopped. A rerun with the same config, features, embeddings and code is skipped;
--force recomputes. Bad embeddings (missing items, ragged or wrong dimension,
NaN/inf, duplicate ids) exit 1 and write nothing, unless the config sets
match.missing_items: null (missing items get null features). With --engine
spark the same per-user kernel runs in Spark tasks (item vectors broadcast to
every worker) and writes the same bytes; --shard is for the polars engine.
With --folds K (or match.folds: K >= 2) the features of TRAIN rows come from
students refitted without the row's fold of users (out of fold: embeddings
that never saw the row's label), valid and test rows from the --embeddings
student; OUT/full/ and OUT/folds/kK/ hold the parts, the manifest their times.
"""


def _match(args: argparse.Namespace) -> int:
    from features.jobs import parse_shard
    from features.jobs.uri import run_at
    from recsys.config import load_pipeline_config

    shard = parse_shard(args.shard) if args.shard else None
    cfg = load_pipeline_config(args.config, {"match": {"folds": args.folds}} if args.folds is not None else None)
    engine = {"engine": args.engine} if args.engine else {}
    spark = {k: v for k, v in {"master": args.spark_master, "ui": args.spark_ui or None}.items() if v is not None}
    if engine or spark:
        match = dataclasses.replace(cfg.match, **engine, spark=dataclasses.replace(cfg.match.spark, **spark))
        cfg = dataclasses.replace(cfg, match=match)
    from recsys.cli.features import check_spark_flags

    check_spark_flags(cfg.match.engine, spark)
    inputs = {f"--{k}": getattr(args, k) for k in ("features", "embeddings")}
    return run_at(cfg.match.engine, cfg.match.spark, inputs, args.out, lambda: _run_match(args, cfg, shard))


def _run_match(args: argparse.Namespace, cfg: Any, shard: Any) -> int:
    from features.core.paths import check_output
    from features.jobs.uri import local_path
    from recsys.plan import plan_match
    from recsys.stages import run_match

    out, feats, emb = (local_path(getattr(args, k), f"--{k}") for k in ("out", "features", "embeddings"))
    check_output(out, {"--features": feats, "--embeddings": emb, "--config": args.config})
    job = plan_match(cfg, features=feats, embeddings=emb)
    result = run_match(job, None, out, shard=shard, force=args.force or not cfg.tracking.reuse, progress=not args.quiet,
                       log=warnings_only if args.quiet else print)
    if not args.quiet:
        shown = args.out if str(args.out) != str(out) else result.out
        print(f"output: {shown}" + ("" if result.manifest else " (shards pending)"))
    return 0


def register(features_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `match` to the `features` command group; returns its parser."""
    from recsys.cli.features import add_engine_args

    p = command(
        features_subparsers,
        "match",
        help="impressions + item embeddings -> match features (cosine stats, faiss rank, semantic IDs)",
        description=(
            "For every impression, compare the candidate item with the user's strictly earlier positive "
            "history: cosine max/mean/top-k/count/recency/last, faiss rank near the mean history "
            "embedding, semantic-ID prefix matches, history length (nulls for an empty history); with "
            "match.negatives: true also cosine max/mean and length over the earlier NEGATIVE events (mf_neg_*)."
        ),
        epilog=MATCH_EPILOG,
        handler=_match,
    )
    p.add_argument("--features", required=True, metavar="DIR", help="a folder written by `recsys features build`")
    p.add_argument("--embeddings", required=True, metavar="FILE", help="item embeddings parquet (item_id, embedding)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="FILE", help="pipeline YAML/JSON; its `match:` section (defaults otherwise)")
    add_engine_args(p)
    p.add_argument("--shard", metavar="I/N", help="compute only shard I of N (users by a stable hash of user_id)")
    p.add_argument("--folds", type=int, metavar="K",
                   help="out-of-fold features for train rows (match.folds): K >= 2 refits teachers and student K "
                        "times, each without one fold of users, per the config's teachers/distill sections; 0: in-sample")
    p.add_argument("--force", action="store_true", help="recompute even when up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (warnings still print)")
    return p
