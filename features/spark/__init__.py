"""Spark as the second engine of the feature jobs.

One implementation of the logic, two engines: the per-user and per-item
steps are the polars functions of `features.jobs` (`features.jobs.steps`,
`features.jobs.match.match_rows`). The polars engine runs them over the whole
data in one process; this package runs the very same functions in Spark's
Python workers, each call on the rows of whole users, and computes the few
global values they need (event count, time-split cut points) from what the
Spark tasks return (per-file histograms, summed on the driver). Nothing here
re-implements a feature.

How a call gets whole users: the driver, which holds the validated events,
writes them as parquet files that each hold a range of users
(`staged.stage_by_user`), and a pass over users is one Spark task per file
(`staged.StagedUsers`, `mapInArrow` over a `binaryFile` frame). Workers read
the files (or get their bytes from the JVM on a Hadoop filesystem) and
return parquet, so no value goes through Spark's row format. The first
version repartitioned the events by user_id and exchanged Arrow batches with
the JVM: 31 s for the 10M-event bench build against 11 s this way (warm JVM,
2 cores), most of it the shuffle and the row conversions; before that,
`groupBy(bucket).applyInArrow` first sorted every partition in the JVM. The
match job needs two inputs per bucket of users (impressions and positive
sequences) and uses `groupBy(bucket).cogroup(...).applyInArrow`.

Outputs: the driver collects the result and writes the same single parquet
files as the polars engine, with the same writer: the same bytes, so the
manifests' content fingerprints agree (the manifest records the engine; its
key ignores it, so either engine's folder is up to date for the other). The
result must therefore fit in the driver's memory, as it does for the polars
engine; input validation also runs once on the driver, before the job.

- `config`: `SparkConfig` (light; the `spark:` key of `features` and `match`);
- `arrow`: polars <-> Arrow for Spark (the match job);
- `staged`: events staged as files of whole users, and steps run on them;
- `session`: the session (always stopped, Ctrl-C included; no UI port unless
  asked) and the translation of worker failures into one `error:` line;
- `build`: the feature build on Spark; `match`: the match job on Spark;
- `check`: `python -m features.spark.check`, the ML-100K equality check.

Importing this package does not import pyspark; `session`, `build` and
`match` do.
"""
