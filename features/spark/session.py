"""The Spark session of a feature job, and worker failures as typed errors.

`spark_session` starts a session for the job and always stops it (an error,
Ctrl-C). The web UI stays off unless `SparkConfig.ui`; Spark's console log is
quiet by default (`SparkConfig.log_level`). Workers run the venv's Python
(`PYSPARK_PYTHON`): the system Python has no pyarrow or polars.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from features.core.errors import DataError, RecsysError, UsageError
from features.spark.config import SparkConfig

# PySpark 4.3 warns on import that pandas >= 3 is not fully supported; the
# jobs use the Arrow path only, never pandas.
_PANDAS_WARNING = "PySpark does not yet fully support pandas"
_LOG4J = Path(__file__).with_name("log4j2.properties")


def require_pyspark() -> None:
    """A clear usage error when pyspark is not installed (it is an extra)."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UsageError(
            "engine spark needs pyspark: run `make spark` (or `pip install pyspark==4.3.0`); Java 17+ must be installed"
        ) from None


def quiet_pandas_warning() -> None:
    warnings.filterwarnings("ignore", message=_PANDAS_WARNING, category=FutureWarning)


@contextmanager
def _env(updates: dict[str, str]) -> Iterator[None]:
    """Environment for the JVM and the Python workers it starts, restored after."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def spark_session(cfg: SparkConfig, app: str) -> Iterator[Any]:
    """A SparkSession for one job; stopped on exit, whatever happens."""
    require_pyspark()
    quiet_pandas_warning()
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    env = {
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONWARNINGS": f"ignore:{_PANDAS_WARNING}:FutureWarning",
    }
    if cfg.master.startswith("local"):
        env["SPARK_LOCAL_IP"] = os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")
    java_opts = f"-Dlog4j2.configurationFile={_LOG4J.as_uri()} -Drecsys.spark.level={cfg.log_level}"
    conf = (
        SparkConf()
        .setMaster(cfg.master)
        .setAppName(app)
        .set("spark.ui.enabled", str(cfg.ui).lower())
        .set("spark.ui.showConsoleProgress", "false")
        .set("spark.driver.extraJavaOptions", java_opts)
        .set("spark.executor.extraJavaOptions", java_opts)
        .set("spark.sql.execution.arrow.pyspark.enabled", "true")
        .set("spark.driver.memory", cfg.driver_memory)
        # the job collects its result on purpose (one output file per table)
        .set("spark.driver.maxResultSize", "0")
        # a failed task here is a data problem, not a flaky machine: on the
        # embedded master fail at once; a cluster keeps Spark's retries
        .set("spark.task.maxFailures", "1" if cfg.master.startswith("local") else "4")
        .set("spark.executorEnv.PYTHONWARNINGS", env["PYTHONWARNINGS"])
        .setAll(sorted((str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in cfg.conf.items()))
    )
    outer = _sigint_handler()  # before PySpark installs its own for the context
    # Ctrl-C while the JVM starts is held until the session exists, then
    # stops it: raised inside the start it left a JVM running (PySpark starts
    # it ignoring SIGINT) and printed py4j tracebacks
    held: list[bool] = []
    pyspark_handler = _hold_sigint(held)
    with _env(env):
        try:
            if SparkContext._gateway is None and cfg.log_level == "OFF":
                # the JVM writes banners (and Python workers their tracebacks)
                # to its own stderr: silenced; failures reach us as exceptions
                from pyspark.java_gateway import launch_gateway

                null = subprocess.DEVNULL
                SparkContext._gateway = launch_gateway(conf, popen_kwargs={"stdout": null, "stderr": null})
                SparkContext._jvm = SparkContext._gateway.jvm
            sc = SparkContext.getOrCreate(conf)
            pyspark_handler = _hold_sigint(held)  # the context installed PySpark's handler: held again
            spark = SparkSession(sc)
            spark.range(0)  # instantiates the SQL session state: a bad spark.sql.* setting fails here, not in the job
        except BaseException as e:  # no Java, a bad master URL or setting: before any work
            cause = one_line(e) if isinstance(e, Exception) else ""  # read first: py4j asks the JVM for it
            _kill_jvm()
            _restore_sigint(outer)
            if isinstance(e, Exception):
                raise UsageError(f"cannot start Spark (master {cfg.master!r}): {cause}") from None
            raise
        _restore_sigint(pyspark_handler)
        interrupted: list[bool] = []
        restore = _note_interrupts(interrupted, outer)
        try:
            if held:
                interrupted.append(True)
                raise KeyboardInterrupt
            sc.setLogLevel(cfg.log_level)
            with worker_errors(interrupted):
                yield spark
        finally:
            _stop(spark, restore)


def _hold_sigint(held: list[bool]) -> Any:
    """Record Ctrl-C in `held` instead of raising; returns the handler it
    replaces (None off the main thread, where nothing changes)."""
    import signal

    if not _on_main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda *_: held.append(True))


def _restore_sigint(handler: Any) -> None:
    import signal

    if _on_main_thread() and handler is not None:
        signal.signal(signal.SIGINT, handler)


def _kill_jvm() -> None:
    """After a failed or interrupted start: stop what exists of the context
    and kill the JVM PySpark launched (it ignores SIGINT and could outlive
    us), so the next session starts afresh."""
    from pyspark import SparkContext

    try:
        if SparkContext._active_spark_context is not None:
            SparkContext._active_spark_context.stop()
    except Exception:  # noqa: BLE001 - half-started: the kill below is what counts
        pass
    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)
    try:
        if gateway is not None:
            gateway.shutdown()
    except Exception:  # noqa: BLE001
        pass
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    SparkContext._gateway = None
    SparkContext._jvm = None


def _on_main_thread() -> bool:
    """Signal handlers can be read and set on the main thread only."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _sigint_handler() -> Any:
    """The current SIGINT handler (None off the main thread)."""
    import signal

    return signal.getsignal(signal.SIGINT) if _on_main_thread() else None


def _stop(spark: Any, restore: Callable[[], None]) -> None:
    """Stop the session with Ctrl-C ignored, then put back the handler from
    before the session. A second Ctrl-C during the stop used to run PySpark's
    handler, a py4j call inside the stop's own, which printed py4j tracebacks;
    and PySpark leaves its handler installed after the context stopped."""
    import signal

    if _on_main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        spark.stop()
    finally:
        restore()


def _note_interrupts(interrupted: list[bool], outer: Any = None) -> Callable[[], None]:
    """Record a Ctrl-C in `interrupted`, then run PySpark's own handler
    (which cancels the running jobs). The cancelled job fails with a py4j
    error that may reach us before the KeyboardInterrupt: `worker_errors`
    reads the record to report an interruption (exit 130), not a failed
    task (exit 1). Returns the function that installs `outer` (the handler
    from before the Spark context; the current one when None) and puts the
    root logger's level back."""
    import logging
    import signal

    if not _on_main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    after = previous if outer is None else outer
    root = logging.getLogger()
    level = root.level

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.append(True)
        # py4j logs each call the cancel cut short, with its traceback, on the
        # root logger: noise after a Ctrl-C, whose one line is "interrupted"
        root.setLevel(logging.CRITICAL)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    def restore() -> None:
        signal.signal(signal.SIGINT, after)
        root.setLevel(level)

    signal.signal(signal.SIGINT, on_sigint)
    return restore


def default_buckets(spark: Any, cfg: SparkConfig, rows: int) -> int:
    """User/item buckets of a shuffle: the configured number, else twice the
    cluster's parallelism and at least one bucket per 2M rows (a bucket is
    one Arrow table in one Python worker)."""
    if cfg.partitions:
        return cfg.partitions
    return max(2 * spark.sparkContext.defaultParallelism, math.ceil(rows / 2_000_000), 1)


# "SomeError: message", also as py4j writes a Java exception (": org.apache.x.SomeException: message")
# and its cause ("Caused by: org.apache.x.SomeException: message")
_ERROR_LINE = re.compile(r"^\s*(?::\s*|Caused by:\s*)?(?:[\w$.]+\.)?(\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = ("Py4JJavaError", "PythonException", "SparkException")


def one_line(e: BaseException) -> str:
    """The meaningful line of a (JVM or Python worker) error: the last
    `SomethingError: message` line that is not a wrapper (the Python error
    raised in a worker, the Java cause), else the last wrapper's ("Asked to
    run locally with 0 threads"), else the first line."""
    text = str(e)
    hits = [m for m in map(_ERROR_LINE.match, text.splitlines()) if m]
    for m in reversed(hits):
        if m.group(1) not in _WRAPPERS:
            return f"{m.group(1)}: {m.group(2).strip()}"[:500]
    if hits:
        return f"{hits[-1].group(1)}: {hits[-1].group(2).strip()}"[:500]
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:500]


@contextmanager
def worker_errors(interrupted: list[bool] | None = None) -> Iterator[None]:
    """Failures of Spark jobs -> one DataError (exit 1) naming the cause, not a
    JVM stack trace. Our own typed errors raised on the driver pass through;
    a failure after a Ctrl-C (`interrupted`, see `_note_interrupts`) is the
    interruption (KeyboardInterrupt: exit 130)."""
    try:
        yield
    except (RecsysError, KeyboardInterrupt):
        raise
    except Exception as e:
        mod = type(e).__module__ or ""
        if interrupted and mod.startswith(("pyspark", "py4j")):
            raise KeyboardInterrupt from None
        if mod.startswith(("pyspark", "py4j")):
            line = one_line(e)
            m = re.match(r"^(?:DataError|SchemaError): (.+)$", line)
            raise DataError(f"a Spark task failed: {m.group(1) if m else line}") from None
        raise
