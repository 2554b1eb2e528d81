"""Spark as the second engine of the feature jobs.

One implementation of the logic, two engines: the per-user and per-item
steps are the polars functions of `features.jobs` (`features.jobs.steps`,
`features.jobs.match.match_rows`). The polars engine runs them over the whole
data in one process; this package runs the very same functions in Spark's
Python workers on Arrow data, each call on rows of whole users (or items),
and computes the few global values they need (event count, time-split cut
points, distinct item ids) as Spark aggregations. Nothing here re-implements
a feature.

How a call gets whole users: the build repartitions by user_id (item_id) and
runs the step per partition with `mapInArrow` (`arrow.partition_step`): the
steps accept any set of whole users, and `groupBy(bucket).applyInArrow`
would first sort every partition by the bucket in the JVM, which cost more
than the steps (1M events, warm JVM, loaded 2-core machine: 37 s with
groupBy, 17-22 s with mapInArrow). The match job
needs two inputs per bucket of users (impressions and positive sequences) and
uses `groupBy(bucket).cogroup(...).applyInArrow`.

Outputs: the driver collects the result and writes the same single parquet
files as the polars engine, with the same writer: the same bytes, so the
manifests' content fingerprints agree (the manifest records the engine; its
key ignores it, so either engine's folder is up to date for the other). The
result must therefore fit in the driver's memory, as it does for the polars
engine; input validation also runs once on the driver, before the job.

- `config`: `SparkConfig` (light; the `spark:` key of `features` and `match`);
- `arrow`: polars <-> Arrow for Spark, a step as a `mapInArrow` function;
- `session`: the session (always stopped, Ctrl-C included; no UI port unless
  asked) and the translation of worker failures into one `error:` line;
- `build`: the feature build on Spark; `match`: the match job on Spark;
- `check`: `python -m features.spark.check`, the ML-100K equality check.

Importing this package does not import pyspark; `session`, `build` and
`match` do.
"""
