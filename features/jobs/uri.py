"""Input and output locations given as URIs.

Both engines take plain paths and `file://` URIs. Other schemes (hdfs://,
s3a://, viewfs://, ...) are Hadoop filesystems: the Spark engine reads and
writes them (`features.spark.hadoop.on_hadoop` serves them from local copies
while the job runs, registered here with `staged`); without it they are
refused with a clear message rather than half supported.
"""

from __future__ import annotations

import os

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from features.core.errors import UsageError

R = TypeVar("R")
# remote URI -> its local copy, while `on_hadoop` runs a job; and the remote
# scratch folder for files the executors must read (None: local paths do)
_STAGED: dict[str, Path] = {}
_SCRATCH: list[str] = []


def is_remote(location: str | Path | None) -> bool:
    """True for a URI whose scheme is not file:// (a Hadoop filesystem)."""
    if location is None:
        return False
    text = str(location)
    return "://" in text and urlparse(text).scheme not in ("", "file")


def normalise_uri(uri: str) -> str:
    """A remote URI without trailing slashes (the key of a staged copy)."""
    return str(uri).rstrip("/")


def _staged_copy(uri: str) -> Path | None:
    """The local copy of `uri`, or of the staged folder that contains it."""
    key = normalise_uri(uri)
    if key in _STAGED:
        return _STAGED[key]
    for remote, local in _STAGED.items():
        if key.startswith(remote + "/"):
            return local / key[len(remote) + 1 :]
    return None


def local_path(location: str | None, what: str = "path") -> str | None:
    """`file:///x` -> `/x`; a plain path unchanged but for a leading `~/`
    (expanded, as polars does when it reads or writes one); None stays None; a
    remote URI -> its local copy while a Spark job stages it, else an error."""
    if location is None:
        return None
    text = str(location)
    if "://" not in text and not text.startswith("file:"):
        return os.path.expanduser(text) if text == "~" or text.startswith("~/") else text
    parsed = urlparse(text)
    if parsed.scheme != "file":
        copy = _staged_copy(text)
        if copy is not None:
            return str(copy)
        raise UsageError(
            f"{what} {text}: scheme {parsed.scheme!r} is a Hadoop filesystem, read and written by the Spark "
            "engine only: add --engine spark (and the filesystem's settings under spark.conf), "
            "or mount it / copy the data to a local path"
        )
    if parsed.netloc not in ("", "localhost"):
        raise UsageError(f"{what} {text}: a file:// URI names no host (file:///abs/path)")
    return unquote(parsed.path)


def local_file_uri(path: str | Path, *, glob: bool = False) -> str:
    """The `file:` URI a local path is handed to Spark (Hadoop) as.

    Not `Path.as_uri()`: Hadoop's Path escapes the string it is given, so the
    `%20` of "my%20data" would be read as three characters and name a folder
    that does not exist. `glob`: the URI is read by `spark.read`, which takes
    a path as a glob pattern; its glob characters are backslash-escaped, so a
    folder named `b[1]` is that folder, not the pattern matching `b1`."""
    text = Path(path).resolve().as_posix()
    if glob:
        text = re.sub(r"([\\\[\]{}*?])", r"\\\1", text)
    return f"file://{text}"


def executor_uri(path: str | Path) -> str:
    """Where Spark executors read `path`: the remote URI it is a staged copy
    of (a cluster's executors cannot read the driver's disk), else its file:// URI."""
    p = Path(path).resolve()
    for remote, local in _STAGED.items():
        local = local.resolve()
        if p == local:
            return remote
        if local in p.parents:
            return f"{remote}/{p.relative_to(local).as_posix()}"
    return local_file_uri(p, glob=True)


def scratch() -> str | None:
    """The remote scratch folder of the running staged job, or None."""
    return _SCRATCH[-1] if _SCRATCH else None


@contextmanager
def staged(mapping: Mapping[str, Path], scratch_uri: str | None = None) -> Iterator[None]:
    """Serve the remote URIs in `mapping` from their local copies while the block runs."""
    added = {normalise_uri(k): Path(v) for k, v in mapping.items()}
    _STAGED.update(added)
    if scratch_uri is not None:
        _SCRATCH.append(scratch_uri)
    try:
        yield
    finally:
        for k in added:
            _STAGED.pop(k, None)
        if scratch_uri is not None:
            _SCRATCH.remove(scratch_uri)


def shown(path: str | Path) -> str:
    """`path` as messages name it: the user's URI for the local copy of a
    staged Hadoop location (or a path under it), else the path itself."""
    p = Path(path)
    for uri, local in _STAGED.items():
        if p == local or local in p.parents:
            rest = p.relative_to(local).as_posix()
            return uri if rest == "." else f"{uri}/{rest}"
    return str(path)


def run_at(engine: str, spark: Any, inputs: Mapping[str, str | None], out: str, run: Callable[[], R]) -> R:
    """`run()` on local paths; through `features.spark.hadoop.on_hadoop` when
    `out` or an input ({flag: location}) is a Hadoop URI (engine spark only)."""
    if not any(is_remote(p) for p in (out, *inputs.values())):
        return run()
    if engine != "spark":
        raise UsageError("hdfs://, s3a:// and other Hadoop paths are read and written by the Spark engine: add --engine spark")
    from features.spark.hadoop import on_hadoop

    return on_hadoop(spark, inputs, out, run)
