"""Where runs go, and whether the store can be used: URIs and store checks.

Precedence for the store (`TrackingConfig`, section `tracking:` of the
pipeline config): the config key `tracking.uri` > env `MLFLOW_TRACKING_URI` >
the embedded default, a sqlite store under the working directory:

    sqlite:///<cwd>/mlflow/mlflow.db        runs, params, metrics, tags
    <cwd>/mlflow/artifacts/<experiment>/    artifacts (files, figures, parquet)

For any sqlite store the artifacts default to `<folder of the .db>/artifacts`
(override with `tracking.artifact_root`); for an http(s) server the server
decides (start one with `recsys ui`). `tracking.enabled: false` logs nothing
(every tracker is a `NullTracker`). The store is checked before any work:
an unknown scheme, a sqlite folder that cannot be written, or a server that
does not answer within 3 s raises `UsageError` (exit 2) naming the URI.

A sqlite store is created under a file lock beside the database (two first
runs would otherwise race on MLflow's migrations), on a temporary file that
is renamed into place once the migrations finish (an interrupted creation
leaves no store), and a sqlite file that is not an MLflow store is refused,
never migrated.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from features.core.errors import RecsysError, UsageError
from recsys.tracking.config import TrackingConfig

DEFAULT_DIR = "mlflow"  # the embedded store lives in <cwd>/mlflow/
CHECK_TIMEOUT_S = 3.0
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
HTTP_SCHEMES = ("http", "https")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stdout(message: str) -> None:
    print(message, flush=True)


def _default_uri(cwd: Path) -> str:
    return f"sqlite:///{(cwd / DEFAULT_DIR / 'mlflow.db').resolve()}"


def _resolve(cfg: TrackingConfig, cwd: Path | None = None) -> tuple[str, str]:
    """(uri, where it came from) following the documented precedence."""
    cwd = Path(cwd or Path.cwd())
    if cfg.uri:
        return cfg.uri, "tracking.uri in the config"
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env, "env MLFLOW_TRACKING_URI"
    return _default_uri(cwd), "the default embedded store"


def resolve_uri(cfg: TrackingConfig, cwd: str | Path | None = None) -> str:
    """The tracking URI: config key > MLFLOW_TRACKING_URI > embedded sqlite default."""
    return _resolve(cfg, Path(cwd) if cwd else None)[0]


def sqlite_path(uri: str, cwd: Path | None = None) -> Path | None:
    """Path of the database file of a `sqlite:///...` URI (None for :memory:)."""
    rest = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else uri.split("://", 1)[-1].lstrip("/")
    rest = rest.split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    p = Path(urllib.parse.unquote(rest))
    return p if p.is_absolute() else Path(cwd or Path.cwd()) / p


def resolve_artifact_root(cfg: TrackingConfig, uri: str | None = None, cwd: str | Path | None = None) -> str | None:
    """Artifact root for new experiments as a URI, or None to let the store decide."""
    cwd = Path(cwd or Path.cwd())
    if cfg.artifact_root:
        root = cfg.artifact_root
        if "://" in root or root.startswith(("file:", "mlflow-artifacts:")):
            return root
        return (cwd / root).resolve().as_uri()
    uri = uri or resolve_uri(cfg, cwd)
    if uri.startswith("sqlite:"):
        db = sqlite_path(uri, cwd)
        base = db.parent if db is not None else cwd / DEFAULT_DIR
        return (base / "artifacts").resolve().as_uri()
    return None


def local_path(uri: str | None) -> Path | None:
    """Local folder of a `file://` (or plain path) artifact URI; None when remote."""
    if not uri:
        return None
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _what_to_do(uri: str, source: str) -> str:
    if source == "--store":  # `recsys ui`: there is nothing to run without tracking
        return "fix --store"
    fix = {
        "env MLFLOW_TRACKING_URI": "fix or unset MLFLOW_TRACKING_URI",
        "tracking.uri in the config": "fix tracking.uri in the config",
    }.get(source, "set tracking.uri in the config or MLFLOW_TRACKING_URI")
    return f"{fix} (from {source}); or set tracking.enabled: false to run without tracking"


def check_store(uri: str, *, source: str = "the tracking URI", timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail fast (UsageError) when `uri` cannot be used as a tracking store.

    sqlite: the folder is created and must be writable; http(s): one GET to
    `<uri>/health` (then the REST API) must answer within `timeout` seconds.
    Other SQL databases are checked when the store is opened.
    """
    scheme = urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()
    todo = _what_to_do(uri, source)
    if scheme == "sqlite":
        _check_sqlite(uri, todo)
    elif scheme in HTTP_SCHEMES:
        _check_http(uri, todo, timeout)
    elif scheme in SQL_SCHEMES:
        return
    elif scheme == "file" or scheme == "":
        raise UsageError(
            f"tracking URI {uri!r}: a filesystem store is not supported (MLflow 3 keeps it read-only); "
            f"use sqlite:///path/to/mlflow.db or http://127.0.0.1:5000 (`recsys ui`); {todo}"
        )
    else:
        raise UsageError(
            f"tracking URI {uri!r}: unknown scheme {scheme!r}; use sqlite:///path/to/mlflow.db (embedded store) "
            f"or http://127.0.0.1:5000 (a server started with `recsys ui`); {todo}"
        )


def _check_sqlite(uri: str, todo: str) -> None:
    db = sqlite_path(uri)
    if db is None:  # each MLflow client opens its own empty database: every run, metric and model is lost
        raise UsageError(f"tracking URI {uri!r} is an in-memory sqlite database, gone when the command ends (runs, "
                         f"metrics and registered models included); use a file, sqlite:///path/to/mlflow.db; {todo}")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        # Really write: os.access says yes to root on read-only mounts.
        probe = db.parent / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        if db.exists() and not os.access(db, os.W_OK):
            raise PermissionError(f"{db} is read-only")
    except OSError as e:
        raise UsageError(
            f"tracking URI {uri!r}: cannot write the store folder {db.parent}: {e.strerror or e}; "
            f"point it to a writable path; {todo}"
        ) from e


SQLITE_MAGIC = b"SQLite format 3\x00"
# Tables every MLflow sqlite store has; a database with other tables only is
# someone else's and is never touched (MLflow would add its tables to it).
MLFLOW_TABLES = {"experiments", "runs"}


@contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """Exclusive lock beside the database: two processes that first touch a
    fresh store would otherwise both run MLflow's migrations and one fails."""
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _refuse_foreign_sqlite(uri: str, db: Path, todo: str) -> None:
    """UsageError unless `db` is absent, empty, or an MLflow store. Read only."""
    import sqlite3

    if not db.exists() or db.stat().st_size == 0:
        return
    with open(db, "rb") as fh:
        magic = fh.read(len(SQLITE_MAGIC))
    if magic != SQLITE_MAGIC:
        raise UsageError(f"tracking URI {uri!r}: {db} is not a sqlite database; refusing to use it as a store; {todo}")
    def table_names(mode: str) -> set[str]:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode={mode}", uri=True)
        try:
            return {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        finally:
            con.close()

    try:
        tables = table_names("ro")
    except sqlite3.Error as e:
        journal = db.with_name(db.name + "-journal")
        if not (journal.is_file() and journal.stat().st_size and "readonly" in str(e)):
            raise UsageError(f"tracking URI {uri!r}: cannot read the sqlite database {db}: {e}; {todo}") from e
        # a hot journal: a process was killed while writing (a torchrun worker, say); a read-only connection
        # cannot roll it back, a read-write one does, as sqlite would on MLflow's own next write (a probe,
        # 2026-12-01: every later command refused the store as "a readonly database")
        try:
            tables = table_names("rw")
        except sqlite3.Error as e2:
            raise UsageError(f"tracking URI {uri!r}: cannot read the sqlite database {db} (an interrupted write left "
                             f"{journal.name}, which sqlite could not roll back: {e2}); {todo}") from e2
        print(f"note: {db}: rolled back a write a killed process left unfinished ({journal.name})", file=sys.stderr)
    if any(t.startswith("_alembic_tmp") for t in tables):  # a migration stopped half-way
        raise UsageError(
            f"tracking URI {uri!r}: {db} is a half-created MLflow store (its first creation was interrupted, before "
            f"this version created stores atomically): if it holds no runs you need, delete it and rerun; {todo}"
        )
    if tables and not MLFLOW_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise UsageError(
            f"tracking URI {uri!r}: {db} is a sqlite database but not an MLflow store (tables: {shown}); "
            f"refusing to add MLflow's tables to it; {todo}"
        )


@contextmanager
def _opening_store(uri: str, source: str) -> Iterator[None]:
    """Around the first use of a store: for sqlite, hold the store lock and
    refuse a foreign database (under the lock: a store being created by
    another process has only some of its tables)."""
    db = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is None:
        yield
        return
    with _store_lock(db):
        if not db.exists() or db.stat().st_size == 0:
            _create_sqlite_store(db)
        _refuse_foreign_sqlite(uri, db, _what_to_do(uri, source))
        yield


def _create_sqlite_store(db: Path) -> None:
    """Create a fresh sqlite store atomically: MLflow's migrations run on a
    temporary file beside it, which is renamed into place once they finish.
    Interrupted on the database itself, they left a half-migrated store that
    no later run could open ("table ... already exists"); now an interrupted
    creation leaves no store, and the next run creates it again."""
    import uuid

    # a new name each time: MLflow caches a store (and its engine) per URI
    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        mlflow = _mlflow()
        tmp_uri = f"sqlite:///{tmp}"
        client = mlflow.MlflowClient(tracking_uri=tmp_uri, registry_uri=tmp_uri)
        client.search_experiments(max_results=1)  # runs every migration (the registry's tables too)
        client.search_registered_models(max_results=1)
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def _http_get(url: str, timeout: float) -> int:
    # No proxies: the store is a local/intranet server, never reached through a proxy here.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _check_http(uri: str, todo: str, timeout: float) -> None:
    base = uri.rstrip("/")
    try:
        status = _http_get(f"{base}/health", timeout)
        if status >= 400:
            status = _http_get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(
            f"tracking server {uri!r} does not answer ({reason}); start it with `recsys ui --port PORT` "
            f"or point to a running server; {todo}"
        ) from e
    if status in (401, 403):
        return  # answers; credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN
    if status >= 400:
        raise UsageError(
            f"tracking server {uri!r} answered HTTP {status}: not an MLflow tracking server? "
            f"start one with `recsys ui`; {todo}"
        )


def _mlflow():
    """Import mlflow quietly (no telemetry, no progress bars)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    return mlflow


def prepare_store(uri: str, source: str = "the tracking URI") -> None:
    """Create (or check) a database store under its lock; UsageError when it
    cannot be used (a foreign sqlite file, a newer schema, ...)."""
    mlflow = _mlflow()
    try:
        with _opening_store(uri, source):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except RecsysError:
        raise
    except Exception as e:
        half = " (a half-created store: its first creation was interrupted; if it holds no runs you need, delete it " \
               "and rerun)" if "already exists" in str(e) and uri.startswith("sqlite:") else ""
        raise UsageError(f"tracking store {uri!r} (from {source}) cannot be opened: {e}{half}; "
                         f"{_what_to_do(uri, source)}") from e

