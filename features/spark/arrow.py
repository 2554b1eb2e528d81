"""Polars frames <-> the Arrow tables Spark exchanges with Python workers,
and the output schema of a polars step.

`applyInArrow` checks the returned schema exactly (an Int64 where Spark
declared an int fails the task), so every step's output is cast to the Arrow
schema Spark derives from the declared one. The declared schema itself is
never written by hand: it is the polars schema the step produces on an empty
input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import pyarrow as pa


def to_arrow(df: pl.DataFrame) -> pa.Table:
    """Plain Arrow types (large_string, not string_view) that Spark reads."""
    return df.to_arrow(compat_level=pl.CompatLevel.oldest())


def spark_schema(schema: pl.Schema) -> Any:
    """The Spark StructType of a polars schema (unsigned ints become signed:
    Spark has none)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    fixed = {c: (pl.Int64 if t.is_unsigned_integer() else t) for c, t in schema.items()}
    return from_arrow_schema(to_arrow(pl.DataFrame(schema=fixed)).schema)


def cast_to(table: pa.Table, struct: Any) -> pa.Table:
    """`table` with the exact Arrow types of the Spark schema `struct`."""
    from pyspark.sql.pandas.types import to_arrow_schema

    target = to_arrow_schema(struct)
    return table.select(target.names).cast(target)


def output_schema(step: Callable[[pl.DataFrame], pl.DataFrame], example: pl.DataFrame) -> pl.Schema:
    """What `step` returns, found by running it on the zero-row slice of `example`."""
    return step(example.head(0)).schema


def with_bucket(df: Any, column: str, n: int) -> Any:
    """`df` plus `__bucket` = pmod(xxhash64(column), n): the group of a
    Spark step. All rows of one user (item) share a bucket, which is all the
    steps need; n buckets bound the work of one Python call."""
    from pyspark.sql import functions as F

    return df.withColumn("__bucket", F.pmod(F.xxhash64(F.col(column)), F.lit(n)))
