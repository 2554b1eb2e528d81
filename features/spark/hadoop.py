"""Inputs and outputs on a Hadoop filesystem (hdfs://, s3a://, abfs://, viewfs://, ...).

The Spark engine reaches any filesystem the cluster's Hadoop configuration
knows (`spark.hadoop.*` settings go in `spark.conf`). A job given such URIs
runs the same code as on local paths, with the data moved around it:

    1. the driver copies each remote input, and the remote output folder if
       one exists (so the skip-when-unchanged check reads its manifest and
       fingerprints its files, as on a local folder), to a local temp folder;
    2. the job runs on those copies; its executors read remote inputs at
       their remote URIs (`features.jobs.uri.executor_uri`) and the build's
       staged events from a scratch folder beside the remote output;
    3. a new result is uploaded to a temp folder beside the output, then
       renamed into place (the old folder is moved aside first and deleted
       last). On HDFS the rename is atomic; on object stores (s3a) it is a
       copy, so a reader may briefly see a partial folder there.

The driver holds the inputs and outputs anyway (it validates every row and
writes one file per table), so the copies cost disk, not a new limit.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from features.core.errors import UsageError
from features.core.manifest import MANIFEST
from features.jobs.uri import is_remote, local_file_uri, normalise_uri, staged
from features.spark.config import SparkConfig
from features.spark.session import one_line, spark_session

R = TypeVar("R")


class HadoopFS:
    """The few Hadoop FileSystem calls the jobs need, through a Spark session's JVM."""

    def __init__(self, spark: Any) -> None:
        sc = spark.sparkContext
        self._jvm = sc._jvm
        self._conf = sc._jsc.hadoopConfiguration()

    def _path(self, uri: str) -> tuple[Any, Any]:
        path = self._jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(self._conf), path

    def _local(self, path: Path) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(local_file_uri(path))

    def exists(self, uri: str) -> bool:
        fs, path = self._path(uri)
        return bool(fs.exists(path))

    def is_dir(self, uri: str) -> bool:
        fs, path = self._path(uri)
        return bool(fs.getFileStatus(path).isDirectory())

    def download(self, uri: str, local: Path) -> None:
        """A file or a whole folder -> `local` (which must not exist)."""
        fs, path = self._path(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.copyToLocalFile(False, path, self._local(local), True)  # raw local FS: no .crc files

    def upload(self, local: Path, uri: str) -> None:
        fs, path = self._path(uri)
        fs.copyFromLocalFile(False, True, self._local(local), path)

    def delete(self, uri: str) -> None:
        fs, path = self._path(uri)
        fs.delete(path, True)

    def rename(self, src: str, dst: str) -> bool:
        fs, a = self._path(src)
        _, b = self._path(dst)
        return bool(fs.rename(a, b))

    def publish(self, local_dir: Path, uri: str) -> None:
        """Upload `local_dir` as the folder `uri`: temp folder, then rename into place."""
        parent, name = uri.rstrip("/").rsplit("/", 1)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp, old = f"{parent}/.{name}.tmp-{tag}", f"{parent}/.{name}.old-{tag}"
        self.upload(local_dir, tmp)
        try:
            moved = self.exists(uri) and self.rename(uri, old)
            if self.exists(uri):
                raise UsageError(f"--out {uri}: could not move the old folder aside (rename refused)")
            if not self.rename(tmp, uri):
                if moved:
                    self.rename(old, uri)
                raise UsageError(f"--out {uri}: the filesystem refused to rename the finished output into place")
        except BaseException:
            self.delete(tmp)
            raise
        if moved:
            self.delete(old)


def scratch_uri(out: str) -> str:
    """A fresh folder beside the remote output, for files the executors must read."""
    parent, name = normalise_uri(out).rsplit("/", 1)
    return f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-spark"


@contextmanager
def executor_copy(spark: Any, local: Path, scratch: str | None) -> Iterator[str]:
    """The URI executors read `local` (a file or folder the driver wrote) at: itself, or,
    when the job writes to a Hadoop filesystem, a copy in `scratch` (deleted after)."""
    if scratch is None:
        yield local_file_uri(local, glob=True)  # read by spark.read
        return
    fs = HadoopFS(spark)
    uri = f"{scratch}/{local.name}"
    fs.upload(local, uri)
    try:
        yield uri
    finally:
        fs.delete(scratch)


@contextmanager
def _named(flag: str, uri: str) -> Iterator[None]:
    """A filesystem failure (unknown host, no credentials, no permission) ->
    one usage error naming the path, not a JVM stack trace."""
    try:
        yield
    except Exception as e:
        if (type(e).__module__ or "").startswith(("py4j", "pyspark")):
            raise UsageError(f"{flag} {uri}: the filesystem failed: {one_line(e)}") from None
        raise


def _manifest_text(folder: Path) -> str | None:
    try:
        return (folder / MANIFEST).read_text()
    except OSError:
        return None


def on_hadoop(spark_cfg: SparkConfig, inputs: Mapping[str, str | None], out: str, run: Callable[[], R]) -> R:
    """Run `run()` with the remote URIs among `inputs` ({flag: uri}) and `out`
    served from local copies (see the module docstring); publish a changed
    output. `run` resolves every path through `features.jobs.uri.local_path`."""
    out = normalise_uri(out) if is_remote(out) else out
    remote = {flag: normalise_uri(u) for flag, u in inputs.items() if u is not None and is_remote(u)}
    if is_remote(out):
        for flag, u in remote.items():
            if out == u or out.startswith(u + "/") or u.startswith(out + "/"):
                raise UsageError(f"--out {out} overlaps {flag} {u}: the output must be a separate folder (inputs are never touched)")
    with tempfile.TemporaryDirectory(prefix="recsys-hadoop-") as tmp:
        mapping: dict[str, Path] = {}
        local_out: Path | None = None
        with spark_session(spark_cfg, "recsys staging") as spark:
            fs = HadoopFS(spark)
            for i, (flag, uri) in enumerate(remote.items()):
                with _named(flag, uri):
                    if not fs.exists(uri):
                        raise UsageError(f"{flag} {uri}: no such file or folder")
                    local = Path(tmp) / "in" / str(i) / uri.rsplit("/", 1)[1]
                    fs.download(uri, local)
                mapping[uri] = local
            if is_remote(out):
                local_out = Path(tmp) / "out" / out.rsplit("/", 1)[1]
                with _named("--out", out):
                    if fs.exists(out):
                        if not fs.is_dir(out):
                            raise UsageError(f"--out {out} is an existing file; expected a folder")
                        fs.download(out, local_out)
                mapping[out] = local_out
        before = _manifest_text(local_out) if local_out is not None else None
        scratch = scratch_uri(out) if local_out is not None else None
        with staged(mapping, scratch):
            result = run()
        if local_out is not None and _manifest_text(local_out) not in (None, before):
            with spark_session(spark_cfg, "recsys publish") as spark, _named("--out", out):
                HadoopFS(spark).publish(local_out, out)
    return result
