"""Spark settings shared by the feature jobs (`features.spark`, `match.spark`).
Light: imports neither pyspark nor polars."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Engine = Literal["polars", "spark"]
# the master URL forms Spark parses (SparkContext.createTaskScheduler)
_MASTER = re.compile(r"local(\[(\d+|\*)(,\s*\d+)?\])?|local-cluster\[.+\]|(spark|k8s|mesos)://.+|yarn")


@dataclass(frozen=True)
class SparkConfig:
    """How a job reaches Spark when its `engine` is spark. None of these keys
    changes the output, so none enters the manifest key."""

    master: str = "local[2]"  # Spark master URL: local[N] (embedded, the default) or a cluster (spark://host:7077, yarn, k8s://...)
    partitions: int = 0  # user/item buckets per shuffle (0: twice the cluster's default parallelism, at least one per 2M events)
    driver_memory: str = "4g"  # JVM heap of the driver (local[N]: of the whole embedded Spark); it receives the match job's rows
    ui: bool = False  # open the Spark web UI (a listening port); off unless asked for
    log_level: Literal["OFF", "ERROR", "WARN", "INFO"] = "OFF"  # Spark's own console log (worker failures become one `error:` line either way)
    conf: dict[str, str | int | float | bool] = field(default_factory=dict, hash=False)  # more Spark settings, e.g. a Hadoop filesystem's: {spark.hadoop.fs.s3a.endpoint: ...} (hdfs://, s3a://... paths need engine spark)

    def __post_init__(self) -> None:
        if not _MASTER.fullmatch(self.master.strip()):
            # Spark would say only that its gateway exited
            raise ValueError(f"spark.master must be a Spark master URL: local, local[N], local[*], spark://host:7077, "
                             f"yarn, k8s://..., got {self.master!r}")
        bad = [k for k in self.conf if not str(k).startswith("spark.")]
        if bad:
            raise ValueError(f"spark.conf keys are Spark settings and start with 'spark.', got {bad[:3]}")
        if self.partitions < 0:
            raise ValueError(f"spark.partitions must be >= 0 (0: automatic), got {self.partitions}")
        size = re.fullmatch(r"(\d+)[kmgt]?b?", self.driver_memory.strip().lower())
        if size is None or not int(size[1]):  # the JVM would not start, and Spark says only that its gateway exited
            raise ValueError(f"spark.driver_memory must be a JVM memory size such as 4g or 512m, got {self.driver_memory!r}")
