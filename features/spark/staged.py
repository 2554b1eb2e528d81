"""Events staged as parquet files of whole users, and polars steps run on
each file in Spark's Python workers.

The driver holds the validated events (it checks every row before the job),
so it writes them as files that each hold a range of users
(`stage_by_user`). A pass over users is then one Spark task per file
(`StagedUsers.run`), with no shuffle: a user's rows are in one file.

What travels between the JVM and the Python workers is parquet bytes, or
only file names where the executors see the staged folder at its path (a
local file:// folder, which they read anyway). Handing Spark rows instead
(`spark.read.parquet` -> `repartition(user_id)` -> `mapInArrow`) costs the
shuffle and a conversion of every value twice in each direction (parquet ->
JVM rows -> Arrow for the worker; Arrow -> JVM rows -> parquet for the
driver): on the 10M-event bench build that was 31 s, against 11-12 s this
way, with the same output bytes.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from features import schemas as S


def stage_by_user(events: pl.DataFrame, n: int, folder: Path) -> None:
    """`events` as up to `n` parquet files `part-NNNNN.parquet` in `folder`,
    each holding whole users in a range of user_id (part-i's users all come
    before part-j's for i < j) and about as many events as the others. A
    file keeps the input order of its rows."""
    folder.mkdir(parents=True)
    if not events.height:
        return
    per_user = events.group_by(S.USER_ID).agg(pl.len().cast(pl.Int64).alias("len")).sort(S.USER_ID)  # no UInt32 wrap
    before = per_user["len"].cum_sum() - per_user["len"]  # the events of the users before each user
    first = per_user.filter((before * n // events.height).is_first_distinct())[S.USER_ID]  # each range's first user
    bucket = (first.search_sorted(events[S.USER_ID], side="right") - 1).alias("__bucket")
    parts = events.with_columns(bucket).partition_by("__bucket", include_key=False, as_dict=True)

    def write(item: tuple[tuple[int], pl.DataFrame]) -> None:
        (i,), part = item
        part.write_parquet(folder / f"part-{i:05d}.parquet", compression="lz4", statistics=False)

    with ThreadPoolExecutor(2) as pool:  # parquet encoding releases the GIL
        list(pool.map(write, parts.items()))


@contextmanager
def one_task_per_file(spark: Any) -> Iterator[None]:
    """Spark plans one task per staged file for the queries run inside (by
    default it packs small files into one task, which would leave a core
    idle). Spark plans file partitions when a query runs, so the query must
    run inside; the settings are restored after."""
    whole = str(1 << 50)
    keys = ("spark.sql.files.maxPartitionBytes", "spark.sql.files.openCostInBytes")
    old = {k: spark.conf.get(k) for k in keys}
    for k in keys:
        spark.conf.set(k, whole)
    try:
        yield
    finally:
        for k, v in old.items():
            spark.conf.set(k, v)


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="lz4", statistics=False)
    return buf.getvalue()


class StagedUsers:
    """The staged files (`uri`, as the executors read them) and the passes over them.

    `local`: the staged folder when the executors see it at that path (the
    local folder itself, not a copy on a Hadoop filesystem): the workers
    read the files and write their results there, and the JVM passes only
    file names. Otherwise the JVM reads each file and hands its bytes to the
    worker, and each result comes back as parquet bytes through Spark."""

    def __init__(self, spark: Any, uri: str, local: Path | None) -> None:
        self._spark, self._local = spark, local
        self._files = spark.read.format("binaryFile").load(uri)  # one row per file

    def run(self, step: Callable[[pl.DataFrame], Any], *schemas: pl.Schema) -> list[pl.DataFrame]:
        """`step` on each file's rows, in the Python workers; it returns one
        frame per schema (a tuple when several). Each output comes back as
        one frame, the files' results in file order (rows of users in
        user_id order; the schema's empty frame when there are no files)."""
        local, k = self._local, len(schemas)
        results = local.parent / f"results-{uuid.uuid4().hex[:12]}" if local is not None else None
        names = [f"part{i}" for i in range(k)]
        schema = pa.schema([("file", pa.int64())] + [(n, pa.binary()) for n in names])

        def task(batches):
            for batch in batches:
                paths = batch.column("path").to_pylist()
                contents = batch.column("content").to_pylist() if local is None else [None] * len(paths)
                for path, content in zip(paths, contents):
                    name = path.rsplit("/", 1)[1]
                    if local is not None and not (local / name).is_file():
                        raise FileNotFoundError(
                            f"an executor on {socket.gethostname()} cannot read the staged file {local / name}: "
                            "with a cluster master, --out must be on a filesystem every executor sees "
                            "(a shared folder, or a Hadoop one such as hdfs://)")
                    out = step(pl.read_parquet(local / name if local is not None else io.BytesIO(content)))
                    frames = out if isinstance(out, tuple) else (out,)
                    if len(frames) != k:
                        raise ValueError(f"the step returned {len(frames)} frames for {k} schemas")
                    number = int(name.removeprefix("part-").split(".")[0])
                    if results is None:
                        parts = [_parquet_bytes(f) for f in frames]
                    else:  # written beside the staged files: a retried task replaces its file whole
                        results.mkdir(exist_ok=True)
                        for i, f in enumerate(frames):
                            tmp = results / f".{number}-{i}.{uuid.uuid4().hex[:8]}"
                            f.write_parquet(tmp, compression="lz4", statistics=False)
                            os.replace(tmp, results / f"{number:05d}-{i}.parquet")
                        parts = [b""] * k
                    row = {"file": [number]} | {n: [p] for n, p in zip(names, parts, strict=True)}
                    yield pa.RecordBatch.from_pydict(row, schema=schema)

        columns = ["path"] if local is not None else ["path", "content"]  # binaryFile reads no bytes unless asked
        query = self._files.select(*columns).mapInArrow(task, ", ".join(["file long"] + [f"{n} binary" for n in names]))
        out = []
        try:
            with one_task_per_file(self._spark):
                table = query.toArrow().sort_by("file")
            for i, schema in enumerate(schemas):
                if results is None:
                    frames = [pl.read_parquet(io.BytesIO(b)) for b in table.column(names[i]).to_pylist()]
                else:
                    frames = [pl.read_parquet(results / f"{n:05d}-{i}.parquet") for n in table.column("file").to_pylist()]
                out.append(pl.concat(frames, rechunk=False) if frames else pl.DataFrame(schema=schema))
        finally:
            if results is not None:
                shutil.rmtree(results, ignore_errors=True)
        return out
