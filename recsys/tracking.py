"""Experiment tracking on MLflow. The ONLY module in the project that imports mlflow.

Everything else logs through the small `features.core.tracker.Tracker` protocol
(`log_params`, `log_metrics(step=)`, `log_artifact`, `set_tags`). mlflow is
imported lazily, inside functions, so `recsys --help` stays fast.

Where runs go (`TrackingConfig`, section `tracking:` of the pipeline config)
----------------------------------------------------------------------------
Precedence: the config key `tracking.uri` > env `MLFLOW_TRACKING_URI` > the
embedded default, a sqlite store under the working directory:

    sqlite:///<cwd>/mlflow/mlflow.db        runs, params, metrics, tags
    <cwd>/mlflow/artifacts/<experiment>/    artifacts (files, figures, parquet)

For any sqlite store the artifacts default to `<folder of the .db>/artifacts`
(override with `tracking.artifact_root`); for an http(s) server the server
decides (start one with `recsys ui`). `tracking.enabled: false` logs nothing
(every tracker is a `NullTracker`). The store is checked before any work:
an unknown scheme, a sqlite folder that cannot be written, or a server that
does not answer within 3 s raises `UsageError` (exit 2) naming the URI.

Runs
----
One parent run per pipeline invocation, one nested child run per stage:

    with open_pipeline_run(cfg.tracking, "ml100k", tags={"experiment": "ab1", "arm": "svd"},
                           params=cfg.to_dict()) as run:
        with run.stage("distill", params=distill_params, upstream={"features": fp}) as st:
            if not st.reused:
                train(..., tracker=st)          # st is a Tracker
                st.set_outputs(out_dir)
        emb_dir = st.outputs                     # this run's outputs or the reused run's

Every run is tagged `code_version` and `code_hash` (the plugin's version and
a hash of its own source files), `git_commit` and `git_dirty` when the plugin
itself lives in a git checkout, `process.pid`/`process.host`, `config_hash` (hash of its
params), `data_fingerprint` (hash of its upstream fingerprints), `stage`
("pipeline" for the parent) plus the caller's tags (children inherit the
parent's caller tags: experiment, arm, seed). Params are the flattened config;
a value longer than MLflow's 6000-char limit is logged truncated and in full in
the run's `params_full.json` artifact. A run whose body raises is marked FAILED
(KILLED on Ctrl-C). A process killed outright (SIGKILL, OOM, power) cannot
mark its runs: the next `open_pipeline_run` on the same host marks RUNNING runs
whose process is gone as KILLED.

A sqlite store is created under a file lock beside the database (two first
runs would otherwise race on MLflow's migrations), and a sqlite file that is
not an MLflow store is refused, never migrated.

Stage reuse
-----------
A stage is not recomputed when an earlier run of the same stage FINISHED with
the same key: (stage name, params hash, plugin version + hash of the plugin's
installed source files, upstream fingerprints). The key's hash is the run's
`reuse_key` tag. The code is the plugin's own (the `.py` files of `recsys`,
`features` and `distill`, wherever they are installed), never the repository
of the working directory: running from inside another repository, or outside
any, changes nothing; editing one source file changes every key. When the
source files cannot be found the code version is unknown and nothing is
reused. A FAILED or KILLED run is never reused, nor
one whose recorded `outputs` folder no longer exists. Put everything that
changes a stage's output (seed included) in its params or upstream.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.core.config import config_hash, flatten, to_dict
from features.core.errors import RecsysError, UsageError
from features.core.tracker import NullTracker

DEFAULT_DIR = "mlflow"  # the embedded store lives in <cwd>/mlflow/
CHECK_TIMEOUT_S = 3.0
# MLflow's limits (mlflow.utils.validation); copied so this module imports mlflow lazily.
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 8000
KEY_LIMIT = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAMS_FULL_ARTIFACT = "params_full.json"
PIPELINE_STAGE = "pipeline"
REUSE_KEY_VERSION = 2  # 2: keyed on the plugin's own code, not the working directory's git
DIST_NAME = "recsys-plugin"
PACKAGES = ("recsys", "features", "distill")  # the plugin's code: what a reuse key covers
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
HTTP_SCHEMES = ("http", "https")
# Untracked files of these kinds make the tree dirty (new code or config);
# other untracked files (outputs, notebooks' checkpoints) do not.
CODE_SUFFIXES = (".py", ".pyx", ".yaml", ".yml", ".toml", ".cfg", ".ini")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stdout(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class TrackingConfig:
    """Where and whether runs are tracked. Precedence for the store:
    `uri` > env MLFLOW_TRACKING_URI > `sqlite:///<cwd>/mlflow/mlflow.db`."""

    uri: str = ""  # "" -> MLFLOW_TRACKING_URI if set, else the embedded sqlite store
    experiment: str = "recsys"  # MLflow experiment name (an A/B experiment is a tag)
    artifact_root: str = ""  # "" -> <folder of the sqlite db>/artifacts; servers decide for http(s)
    enabled: bool = True  # false -> NullTracker, nothing logged, no store touched
    reuse: bool = True  # false -> always recompute stages (like --force)

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name")


# --------------------------------------------------------------------------- store URIs


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
    if db is None:
        return
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
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        raise UsageError(f"tracking URI {uri!r}: cannot read the sqlite database {db}: {e}; {todo}") from e
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
        _refuse_foreign_sqlite(uri, db, _what_to_do(uri, source))
        yield


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


# --------------------------------------------------------------------------- git, keys


@dataclass(frozen=True)
class GitInfo:
    """Code version of a run. `commit` is "unknown" outside a git repository."""

    commit: str = "unknown"
    dirty: bool | None = None  # None: unknown
    diff_hash: str = ""  # hash of the uncommitted changes ("" when clean)

    def tags(self) -> dict[str, str]:
        dirty = "unknown" if self.dirty is None else str(self.dirty).lower()
        out = {"git_commit": self.commit, "git_dirty": dirty}
        if self.diff_hash:
            out["git_diff_hash"] = self.diff_hash
        if self.commit != "unknown":
            out["mlflow.source.git.commit"] = self.commit
        return out


def git_info(path: str | Path | None = None, *, ignore: tuple[str | Path, ...] = ()) -> GitInfo:
    """Commit of the repository holding `path` (default: the working directory),
    whether the tree is dirty, and a hash of the uncommitted changes."""
    cwd = Path(path or Path.cwd())

    def git(*args: str, at: Path = cwd) -> bytes:
        return subprocess.run(
            ["git", "-C", str(at), *args], capture_output=True, timeout=30, check=True
        ).stdout

    try:
        top = Path(git("rev-parse", "--show-toplevel").decode().strip())
        commit = git("rev-parse", "HEAD", at=top).decode().strip()
        diff = git("diff", "HEAD", "--binary", at=top)
        listing = git("ls-files", "--others", "--exclude-standard", "-z", at=top)
        others = [Path(os.fsdecode(f)) for f in listing.split(b"\0") if f]
    except (OSError, subprocess.SubprocessError):
        return GitInfo()
    ignored = [Path(p).resolve() for p in ignore]
    untracked = sorted(
        f for f in others
        if f.suffix in CODE_SUFFIXES and not any((top / f).resolve().is_relative_to(i) for i in ignored)
    )
    if not diff and not untracked:
        return GitInfo(commit, False, "")
    h = hashlib.sha256(diff)
    for f in untracked:
        h.update(b"\0" + os.fsencode(f) + b"\0")
        try:
            h.update(hashlib.sha256((top / f).read_bytes()).digest())
        except OSError:
            h.update(b"<unreadable>")
    return GitInfo(commit, True, h.hexdigest()[:16])


def source_files() -> list[tuple[str, Path]]:
    """(name, path) of every `.py` file of the plugin's packages, wherever
    they are installed (found without importing them)."""
    import importlib.util

    out: list[tuple[str, Path]] = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            base = Path(loc)
            out += [(f"{pkg}/{f.relative_to(base).as_posix()}", f) for f in base.rglob("*.py") if "__pycache__" not in f.parts]
    return sorted(out)


def hash_sources(files: list[tuple[str, Path]]) -> str:
    """Hash of (name, content) of `files`; "" when there are none."""
    if not files:
        return ""
    h = hashlib.sha256()
    for name, path in sorted(files):
        h.update(name.encode() + b"\0")
        try:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _plugin_code() -> tuple[str, str]:
    """(version, source hash) of the plugin, once per process."""
    import importlib.metadata

    try:
        version = importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return version, hash_sources(source_files())


def _package_git(ignore: tuple[str | Path, ...] = ()) -> GitInfo:
    """Git state of the checkout the plugin's own files live in (tags only);
    unknown when the package is not a tracked file of a repository (e.g. a
    site-packages folder inside some project's ignored .venv)."""
    pkg = Path(__file__).resolve().parent
    try:
        subprocess.run(["git", "-C", str(pkg), "ls-files", "--error-unmatch", "__init__.py"],
                       capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return GitInfo()
    return git_info(pkg, ignore=ignore)


@dataclass(frozen=True)
class CodeVersion:
    """The code that made a run. Reuse keys on `version` + `source_hash` (the
    plugin's own source files); `git` is informational (tags), known only when
    the plugin lives in a git checkout."""

    version: str = "unknown"
    source_hash: str = ""  # "" -> unknown: nothing is reused
    git: GitInfo = field(default_factory=GitInfo)

    @property
    def known(self) -> bool:
        return bool(self.source_hash)

    def tags(self) -> dict[str, str]:
        out = {"code_version": self.version, "code_hash": self.source_hash or "unknown"}
        if self.git.commit != "unknown":
            out |= self.git.tags()
        return out


def code_version(*, ignore: tuple[str | Path, ...] = ()) -> CodeVersion:
    """The plugin's version, source hash (cached per process) and the git
    state of its own checkout; `ignore`: folders (the store) that must not make
    that checkout dirty. Never looks at the working directory."""
    version, source_hash = _plugin_code()
    return CodeVersion(version, source_hash, _package_git(ignore))


def fingerprint(upstream: Mapping[str, str] | None) -> str:
    """One fingerprint for a stage's inputs: hash of its upstream fingerprints."""
    if not upstream:
        return "none"
    return config_hash({str(k): str(v) for k, v in upstream.items()})


def _as_mapping(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return to_dict(params)
    if isinstance(params, Mapping):
        return {k: _as_mapping(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v for k, v in params.items()}
    raise TypeError(f"params must be a mapping or a config dataclass, got {type(params).__name__}")


def stage_key(stage: str, params: Any, upstream: Mapping[str, str] | None, code: CodeVersion) -> dict[str, Any]:
    """What must match for a stage to be reused (see the module docstring)."""
    return {
        "v": REUSE_KEY_VERSION,
        "stage": stage,
        "params_hash": config_hash(_as_mapping(params)),
        "code_version": code.version,
        "code_hash": code.source_hash,
        "upstream": {str(k): str(v) for k, v in sorted((upstream or {}).items())},
    }


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


_NAME_RE = re.compile(r"^[\w.\-/: ]+$")
_KEY_BAD = re.compile(r"[^\w.\-/ :]")


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UsageError(f"{what} {value!r}: use letters, digits, '_', '-', '.', '/', ':' or spaces")
    return value


def _key(key: str) -> str:
    key = _KEY_BAD.sub("_", str(key))
    if len(key) > KEY_LIMIT:
        key = f"{key[: KEY_LIMIT - 17]}~{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return key


def _value_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, Path):
        return str(v)
    return json.dumps(v, default=str)


def _tag_str(v: Any) -> str:
    s = _value_str(v)
    return s if len(s) <= TAG_VALUE_LIMIT else s[: TAG_VALUE_LIMIT - 15] + "...[truncated]"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunInfo:
    """A tracked run as plain data (not mlflow's RunInfo)."""

    run_id: str
    run_name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    stage: str
    parent_id: str | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    artifact_uri: str
    artifact_dir: Path | None  # local folder of the artifacts, None when remote
    outputs: str | None  # the stage's recorded outputs path
    start_time: int | None = None  # ms since epoch

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "status": self.status,
            "stage": self.stage,
            "parent_id": self.parent_id,
            "experiment": self.tags.get("experiment"),
            "arm": self.tags.get("arm"),
            "seed": self.tags.get("seed"),
            "tags": dict(self.tags),
            "params": dict(self.params),
            "metrics": dict(self.metrics),
            "artifact_uri": self.artifact_uri,
            "artifact_dir": str(self.artifact_dir) if self.artifact_dir else None,
            "outputs": self.outputs,
            "start_time": self.start_time,
        }


def _run_info(run: Any) -> RunInfo:
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return RunInfo(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        status=run.info.status,
        stage=tags.get("stage", ""),
        parent_id=run.data.tags.get("mlflow.parentRunId"),
        tags=tags,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        artifact_uri=run.info.artifact_uri,
        artifact_dir=local_path(run.info.artifact_uri),
        outputs=tags.get("outputs"),
        start_time=run.info.start_time,
    )


def _mlflow():
    """Import mlflow quietly (no telemetry, no progress bars)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    return mlflow


# --------------------------------------------------------------------------- trackers


class MLflowTracker:
    """The Tracker protocol on one MLflow run (by id, no global active run)."""

    def __init__(self, client: Any, run_id: str, artifact_uri: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.artifact_uri = artifact_uri
        self._params: dict[str, str] = {}
        self._long_params: dict[str, str] = {}

    @property
    def artifact_dir(self) -> Path | None:
        return local_path(self.artifact_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened; values over MLflow's 6000-char limit are truncated and
        kept whole in the `params_full.json` artifact. MLflow params are
        immutable: a key logged again with another value (a library resolving
        a default, e.g. seed null -> 0) is kept as `<key>.resolved`."""
        from mlflow.entities import Param

        batch: list[Any] = []
        long_changed = False
        for raw_key, raw_value in flatten(_as_mapping(params)).items():
            key, value = _key(raw_key), _value_str(raw_value)
            if len(value) > PARAM_VALUE_LIMIT:
                self._long_params[key] = value
                long_changed = True
                value = value[: PARAM_VALUE_LIMIT - 40] + f"...[truncated, see {PARAMS_FULL_ARTIFACT}]"
            if key in self._params:
                if self._params[key] == value:
                    continue
                key = _key(f"{raw_key}.resolved")
                if self._params.get(key, value) != value:
                    raise ValueError(f"param {raw_key!r} resolved twice to different values; MLflow params are immutable")
                if key in self._params:
                    continue
            self._params[key] = value
            batch.append(Param(key, value))
        for i in range(0, len(batch), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch[i : i + PARAMS_PER_BATCH])
        if long_changed:
            self.log_dict(self._long_params, PARAMS_FULL_ARTIFACT)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), ts, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file goes under `artifact_path`; a folder's contents go under
        `artifact_path` (default: the folder's name)."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path=artifact_path or p.name)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path=artifact_path)
        else:
            raise UsageError(f"cannot log artifact {p}: no such file or folder")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(_key(k) if not k.startswith("mlflow.") else k, _tag_str(v)) for k, v in tags.items()]
        for i in range(0, len(batch), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch[i : i + PARAMS_PER_BATCH])

    def log_figure(self, png_path: str | Path, artifact_path: str = "figures") -> None:
        """A PNG written by `recsys.plots`, under `figures/` by default."""
        self.log_artifact(png_path, artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """`obj` as JSON at `artifact_file` (e.g. "eval/summary.json")."""
        rel = Path(artifact_file)
        with tempfile.TemporaryDirectory(prefix="recsys-artifact-") as tmp:
            p = Path(tmp) / rel.name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            parent = str(rel.parent) if str(rel.parent) not in ("", ".") else None
            self.client.log_artifact(self.run_id, str(p), artifact_path=parent)


@dataclass
class StageRun:
    """What `PipelineRun.stage(...)` yields. It is a Tracker: when the stage
    runs, logging goes to its child run; when `reused`, logging is a no-op and
    `run_id`/`outputs`/`info` describe the earlier run."""

    name: str
    run_id: str | None
    reused: bool
    tracker: Any = field(default_factory=NullTracker)
    info: RunInfo | None = None  # the reused run
    outputs: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tracker.set_tags(tags)

    def log_figure(self, png_path: str | Path, artifact_path: str = "figures") -> None:
        if hasattr(self.tracker, "log_figure"):
            self.tracker.log_figure(png_path, artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if hasattr(self.tracker, "log_dict"):
            self.tracker.log_dict(obj, artifact_file)

    def set_outputs(self, path: str | Path) -> None:
        """Record where this stage wrote its outputs (the `outputs` tag), so a
        later run that reuses this stage finds them."""
        if self.reused:
            raise RuntimeError(f"stage {self.name!r} was reused; its outputs are {self.outputs}")
        self.outputs = str(Path(path).resolve())
        self.tracker.set_tags({"outputs": self.outputs})

    @property
    def artifact_dir(self) -> Path | None:
        if self.info is not None:
            return self.info.artifact_dir
        return getattr(self.tracker, "artifact_dir", None)


# --------------------------------------------------------------------------- processes

PROCESS_TAGS = ("process.pid", "process.host", "process.start")


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks since boot; Linux), "" if unknown:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Tags naming the process that creates a run (see `mark_dead_runs`)."""
    pid = os.getpid()
    return {"process.pid": str(pid), "process.host": socket.gethostname(), "process.start": _start_ticks(pid)}


def process_alive(pid: int, start: str = "") -> bool:
    """Is process `pid` (started at `start`, when known) still running here?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    if start and Path("/proc").is_dir():
        now = _start_ticks(pid)
        return now in ("", start)
    return True


# --------------------------------------------------------------------------- the store


@contextmanager
def _terminate_on_exit(client: Any, run_id: str) -> Iterator[None]:
    """FINISHED on success, FAILED on an exception, KILLED on Ctrl-C: never RUNNING."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status)
        except Exception as e:  # never mask the original error
            _stderr(f"warning: could not mark run {run_id} {status}: {e}")


class RunStore:
    """One MLflow experiment in one store: create runs, find reusable ones,
    search for comparisons. `RunStore.connect(cfg)` checks the store first."""

    def __init__(self, client: Any, uri: str, experiment_id: str, experiment: str) -> None:
        self.client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.experiment = experiment

    @classmethod
    def connect(cls, cfg: TrackingConfig, cwd: str | Path | None = None) -> RunStore:
        uri, source = _resolve(cfg, Path(cwd) if cwd else None)
        check_store(uri, source=source)
        root = resolve_artifact_root(cfg, uri, cwd)
        mlflow = _mlflow()
        try:
            with _opening_store(uri, source):
                client = mlflow.MlflowClient(tracking_uri=uri)
                exp = client.get_experiment_by_name(cfg.experiment)  # creates a fresh store
            if exp is None:
                location = f"{root.rstrip('/')}/{_safe_dirname(cfg.experiment)}" if root else None
                try:
                    exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
                except mlflow.exceptions.MlflowException:  # created concurrently
                    exp = client.get_experiment_by_name(cfg.experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
        except RecsysError:
            raise
        except Exception as e:
            raise UsageError(
                f"tracking store {uri!r} (from {source}) cannot be opened: {e}; {_what_to_do(uri, source)}"
            ) from e
        return cls(client, uri, exp_id, cfg.experiment)

    def create_run(self, name: str, tags: Mapping[str, Any]) -> MLflowTracker:
        tags = {**tags, **process_tags()}
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={(k if k.startswith("mlflow.") else _key(k)): _tag_str(v) for k, v in tags.items()},
        )
        return MLflowTracker(self.client, run.info.run_id, run.info.artifact_uri)

    def mark_dead_runs(self, *, log: Log | None = None) -> list[str]:
        """Mark KILLED the RUNNING runs of this experiment started on this host
        by a process that is gone (killed outright, it could not mark them).
        Runs of other hosts are left alone: their processes cannot be seen."""
        host = socket.gethostname().replace("'", "")
        f = f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'"
        killed = []
        for r in self._search(f):
            pid, start = r.tags.get("process.pid", ""), r.tags.get("process.start", "")
            if not pid.isdigit() or process_alive(int(pid), start):
                continue
            try:
                self.client.set_tag(r.run_id, "killed_reason", f"process {pid} on {host} ended without closing the run")
                self.client.set_terminated(r.run_id, "KILLED")
            except Exception as e:  # noqa: BLE001 - housekeeping must never stop a run
                if log:
                    log(f"warning: could not mark run {r.run_id} KILLED: {e}")
                continue
            killed.append(r.run_id)
        if killed and log:
            log(f"marked {len(killed)} run(s) KILLED whose process is gone: {', '.join(killed)}")
        return killed

    def get_run(self, run_id: str) -> RunInfo:
        return _run_info(self.client.get_run(run_id))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """[(step, value), ...] sorted by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def _search(
        self, filter_string: str, max_results: int | None = None, order_by: list[str] | None = None
    ) -> list[RunInfo]:
        out: list[RunInfo] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                max_results=min(max_results or 1000, 1000),
                order_by=order_by or ["attributes.start_time DESC"],
                page_token=token,
            )
            out.extend(_run_info(r) for r in page)
            token = page.token
            if not token or (max_results and len(out) >= max_results):
                return out[:max_results] if max_results else out

    def find_reusable(self, stage: str, key: Mapping[str, Any], *, log: Log | None = None) -> RunInfo | None:
        """Newest FINISHED run of `stage` whose `reuse_key` tag is the hash of
        `key` (see `stage_key`) and whose recorded outputs still exist."""
        _check_name(stage, "stage name")
        h = key_hash(key)
        runs = self._search(
            f"tags.reuse_key = '{h}' and tags.stage = '{stage}' and attributes.status = 'FINISHED'", max_results=10
        )
        for r in runs:
            out = r.outputs
            if out and local_path(out) is not None and not local_path(out).exists():
                if log:
                    log(f"{stage}: not reusing run {r.run_id}: its outputs {out} are gone")
                continue
            return r
        return None

    def search_runs(
        self, experiment_tag: str, *, stage: str | None = None, finished_only: bool = True
    ) -> list[dict[str, Any]]:
        """Runs tagged `experiment=<experiment_tag>` (newest first) as dicts:
        run_id, experiment, arm, seed, stage, tags, params, metrics,
        artifact_uri, artifact_dir (local folder or None), outputs, status."""
        _check_name(experiment_tag, "experiment tag")
        f = f"tags.experiment = '{experiment_tag}'"
        if stage is not None:
            f += f" and tags.stage = '{_check_name(stage, 'stage name')}'"
        if finished_only:
            f += " and attributes.status = 'FINISHED'"
        return [r.as_dict() for r in self._search(f)]

    def artifact_path(self, run_id: str, path: str, dst: str | Path | None = None) -> Path:
        """Local path of a run's artifact (e.g. "predictions.parquet"):
        in place for a local store, downloaded for a remote one."""
        run = self.get_run(run_id)
        if run.artifact_dir is not None and dst is None:
            p = run.artifact_dir / path
            if not p.exists():
                raise UsageError(f"run {run_id} has no artifact {path!r} (looked in {run.artifact_dir})")
            return p
        return Path(self.client.download_artifacts(run_id, path, dst_path=str(dst) if dst else None))


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


def connect(cfg: TrackingConfig, cwd: str | Path | None = None) -> RunStore:
    """The configured store and experiment, checked (UsageError when unusable)."""
    return RunStore.connect(cfg, cwd)


def search_runs(cfg: TrackingConfig, experiment_tag: str, **kwargs: Any) -> list[dict[str, Any]]:
    """`RunStore.search_runs` on the configured store."""
    return connect(cfg).search_runs(experiment_tag, **kwargs)


class PipelineRun(MLflowTracker):
    """The parent run (a Tracker) that opens nested stage runs."""

    def __init__(
        self,
        store: RunStore,
        tracker: MLflowTracker,
        code: CodeVersion,
        inherited: Mapping[str, str],
        *,
        log: Log,
        reuse: bool,
    ) -> None:
        super().__init__(store.client, tracker.run_id, tracker.artifact_uri)
        self.store = store
        self.code = code
        self.inherited = dict(inherited)
        self.log = log
        self.reuse = reuse

    def find_reusable(self, stage: str, key: Mapping[str, Any]) -> RunInfo | None:
        return self.store.find_reusable(stage, key, log=self.log)

    def search_runs(self, experiment_tag: str, **kwargs: Any) -> list[dict[str, Any]]:
        return self.store.search_runs(experiment_tag, **kwargs)

    @contextmanager
    def stage(
        self,
        name: str,
        params: Any = None,
        upstream: Mapping[str, str] | None = None,
        *,
        outputs: str | Path | None = None,
        tags: Mapping[str, str] | None = None,
        reuse: bool = True,
    ) -> Iterator[StageRun]:
        """A nested run for stage `name`, or the earlier run it reuses.

        `params`: the stage's resolved config (mapping or dataclass);
        `upstream`: {input name: content fingerprint}; `outputs`: where the
        stage writes (or call `st.set_outputs(path)` later).
        """
        _check_name(name, "stage name")
        params = _as_mapping(params)
        upstream = {str(k): str(v) for k, v in (upstream or {}).items()}
        key = stage_key(name, params, upstream, self.code)
        if reuse and self.reuse:
            if not self.code.known:
                self.log(f"{name}: not looking for a reusable run: code version unknown (plugin source files not found)")
            else:
                found = self.find_reusable(name, key)
                if found is not None:
                    why = f"same params, code {self.code.version}+{self.code.source_hash}, inputs"
                    self.log(f"{name}: reusing run {found.run_id} ({why})")
                    self.set_tags({f"stage.{name}.run_id": found.run_id, f"stage.{name}.reused": "true"})
                    yield StageRun(name, found.run_id, True, NullTracker(), found, found.outputs)
                    return
        run_tags: dict[str, Any] = {
            **self.inherited,
            **(tags or {}),
            **self.code.tags(),
            "stage": name,
            "config_hash": config_hash(params),
            "data_fingerprint": fingerprint(upstream),
            "reuse_key": key_hash(key),
            "mlflow.parentRunId": self.run_id,
            **{f"upstream.{k}": v for k, v in upstream.items()},
        }
        if outputs is not None:
            run_tags["outputs"] = str(Path(outputs).resolve())
        tracker = self.store.create_run(name, run_tags)
        self.set_tags({f"stage.{name}.run_id": tracker.run_id, f"stage.{name}.reused": "false"})
        st = StageRun(name, tracker.run_id, False, tracker, None, run_tags.get("outputs"))
        with _terminate_on_exit(self.client, tracker.run_id):
            tracker.log_params(params)
            yield st


class NullPipelineRun(NullTracker):
    """`tracking.enabled: false`: same API, logs nothing, never reuses."""

    run_id = None
    artifact_dir = None

    def log_figure(self, png_path: str | Path, artifact_path: str = "figures") -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def find_reusable(self, stage: str, key: Mapping[str, Any]) -> RunInfo | None:
        return None

    def search_runs(self, experiment_tag: str, **kwargs: Any) -> list[dict[str, Any]]:
        return []

    @contextmanager
    def stage(self, name: str, params: Any = None, upstream: Mapping[str, str] | None = None, *,
              outputs: str | Path | None = None, tags: Mapping[str, str] | None = None,
              reuse: bool = True) -> Iterator[StageRun]:
        yield StageRun(name, None, False, NullTracker(), None, str(outputs) if outputs is not None else None)


@contextmanager
def open_pipeline_run(
    cfg: TrackingConfig,
    name: str,
    tags: Mapping[str, Any] | None = None,
    params: Any = None,
    *,
    upstream: Mapping[str, str] | None = None,
    code: CodeVersion | None = None,
    log: Log | None = None,
) -> Iterator[PipelineRun | NullPipelineRun]:
    """The parent run of one pipeline invocation (see the module docstring).

    Checks the store first (UsageError before any work). `tags`: the caller's
    tags (experiment, arm, seed, ...), inherited by every stage run; `params`:
    the resolved config (flattened into params; its hash is `config_hash`);
    `upstream`: input fingerprints of the whole pipeline; `code`: defaults to
    `code_version()` (the plugin's own code, never the working directory's
    repository); `log`: where reuse lines go (stderr).
    """
    log = log or _stderr
    if not cfg.enabled:
        yield NullPipelineRun()
        return
    store = RunStore.connect(cfg)
    store.mark_dead_runs(log=log)
    if code is None:
        # The store's own files (a store inside the checkout) must not make it dirty.
        db = sqlite_path(store.uri) if store.uri.startswith("sqlite:") else None
        art = local_path(resolve_artifact_root(cfg, store.uri))
        code = code_version(ignore=tuple(p for p in (db.parent if db else None, art) if p is not None))
    params = _as_mapping(params)
    caller = {str(k): _tag_str(v) for k, v in (tags or {}).items()}
    run_tags = {
        "config_hash": config_hash(params),
        "data_fingerprint": fingerprint(upstream),
        **caller,
        **code.tags(),
        "stage": PIPELINE_STAGE,
        **{f"upstream.{k}": v for k, v in (upstream or {}).items()},
    }
    tracker = store.create_run(name, run_tags)
    run = PipelineRun(store, tracker, code, caller, log=log, reuse=cfg.reuse)
    with _terminate_on_exit(store.client, run.run_id):
        run.log_params(params)
        yield run


# --------------------------------------------------------------------------- `recsys ui`


LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def check_port(port: int) -> int:
    """UsageError unless `port` is a TCP port a server can listen on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: a TCP port is 1..65535")
    return port


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _port_free(host: str, port: int) -> bool:
    """True when `port` on `host` can be bound; UsageError when `host` itself
    is not an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r}: cannot resolve it ({e.strerror})") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            if e.errno == errno.EACCES:
                raise UsageError(f"--port {port}: permission denied (ports below 1024 need privileges)") from e
            raise UsageError(f"--host {host!r}: cannot listen on it ({e.strerror})") from e
    return True


def _die_with_parent() -> None:
    """preexec_fn of the server: SIGTERM it when `recsys ui` dies, even by
    SIGKILL (Linux). mlflow forwards SIGTERM to its uvicorn child."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# Runs beside the server: when `recsys ui` dies (its pipe closes, whatever
# killed it), SIGTERM then SIGKILL the server's whole process group, so no
# worker is left listening. Own session: a terminal's Ctrl-C does not reach it.
WATCHDOG = """\
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pgid = int(sys.argv[1])
sys.stdin.buffer.read()
for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        break
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            sys.exit(0)
        time.sleep(0.1)
"""


class MlflowServer:
    """`mlflow server` as a child process in its own process group, so that
    stopping it (SIGTERM, then SIGKILL after `timeout`) takes its workers too.
    Its life is tied to ours: it gets SIGTERM when we die (PR_SET_PDEATHSIG),
    and a watchdog kills its group when our end of a pipe closes."""

    def __init__(self, store_uri: str, artifact_root: str | None, host: str = "127.0.0.1", port: int = 5000) -> None:
        self.store_uri = store_uri
        self.artifact_root = artifact_root
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store_uri]
        if self.artifact_root:
            cmd += ["--default-artifact-root", self.artifact_root, "--artifacts-destination", self.artifact_root]
        return cmd + ["--host", self.host, "--port", str(self.port), "--workers", "1"]

    def start(self, **popen: Any) -> MlflowServer:
        check_port(self.port)
        if not _port_free(self.host, self.port):
            raise UsageError(f"port {self.port} on {self.host} is in use; pick another with --port")
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: ~5 s start, 1 process
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        self.proc = subprocess.Popen(
            self.command(), env=env, start_new_session=True, preexec_fn=_die_with_parent, **popen
        )
        if os.name == "posix":
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(self.proc.pid)], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /health until it answers; RecsysError if the server exits or
        `timeout` passes."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RecsysError(f"mlflow server exited with status {self.proc.returncode} before it was ready")
            try:
                if _http_get(f"{self.url}/health", 1.0) == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RecsysError(f"mlflow server at {self.url} not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server's process group; SIGKILL it after `timeout` s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
        self._signal_group(signal.SIGKILL)  # stragglers of the group, if any
        if self.watchdog is not None:
            self.watchdog.stdin.close()  # the group is gone: it finds nothing to kill
            try:
                self.watchdog.wait(10)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # the group we created (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> MlflowServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _Stop(Exception):
    pass


def server_for(cfg: TrackingConfig, host: str = "127.0.0.1", port: int = 5000, *, warn: Log = _stderr) -> MlflowServer:
    """An (unstarted) UI server over the configured embedded store; checks
    the port and host first, and creates the store (under its lock) so the
    server never races a pipeline on a fresh one."""
    check_port(port)
    if not is_loopback(host):
        warn(
            f"WARNING: --host {host} exposes the MLflow UI and its REST API beyond this machine WITHOUT "
            f"authentication: anyone who can reach port {port} can read, change and delete every run and "
            "artifact. Use --host 127.0.0.1 (and an SSH tunnel) unless this network is trusted."
        )
    uri, source = _resolve(cfg)
    if not uri.startswith("sqlite:") and urllib.parse.urlparse(uri).scheme not in SQL_SCHEMES:
        raise UsageError(
            f"`recsys ui` serves a database store; {uri!r} (from {source}) is not one "
            "(a server URI is already a UI: open it in a browser); pass --store sqlite:///path/mlflow.db"
        )
    if not _port_free(host, port):
        raise UsageError(f"port {port} on {host} is in use; pick another with --port")
    check_store(uri, source=source)
    prepare_store(uri, source)
    return MlflowServer(uri, resolve_artifact_root(cfg, uri), host, port)


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
        raise UsageError(f"tracking store {uri!r} (from {source}) cannot be opened: {e}; {_what_to_do(uri, source)}") from e


def serve(cfg: TrackingConfig, host: str = "127.0.0.1", port: int = 5000, *, out: Log = _stdout,
          ready_timeout: float = 60.0) -> int:
    """Run the MLflow UI over the configured store until Ctrl-C or SIGTERM."""
    server = server_for(cfg, host, port)

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        server.start()
        try:
            server.wait_ready(ready_timeout)
            out(f"MLflow UI: {server.url}  (server pid {server.proc.pid})")
            out(f"store: {server.store_uri}   artifacts: {server.artifact_root or '(store default)'}")
            out(f"log to it with MLFLOW_TRACKING_URI={server.url}; Ctrl-C stops it")
            code = server.proc.wait()
            raise RecsysError(f"mlflow server exited on its own with status {code}")
        except (KeyboardInterrupt, _Stop):
            out("stopping the MLflow UI")
            return 0
        finally:
            # A second Ctrl-C/SIGTERM must not cut the cleanup short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            server.stop()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


__all__ = [
    "TrackingConfig",
    "resolve_uri",
    "resolve_artifact_root",
    "check_store",
    "GitInfo",
    "git_info",
    "CodeVersion",
    "code_version",
    "fingerprint",
    "stage_key",
    "key_hash",
    "RunInfo",
    "MLflowTracker",
    "StageRun",
    "RunStore",
    "PipelineRun",
    "NullPipelineRun",
    "connect",
    "search_runs",
    "open_pipeline_run",
    "MlflowServer",
    "server_for",
    "serve",
]


@contextmanager
def tracked_command(
    cfg: TrackingConfig,
    stage: str,
    params: Any,
    *,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
    outputs: str | Path | None = None,
) -> Iterator[StageRun]:
    """One CLI command = a parent run (holding the command's params) with one
    stage run, never reused (the command was asked to run). The stage run's
    params are left to the library code it is passed to. `enabled=False`
    (e.g. torchrun ranks > 0) logs nothing."""
    if not enabled:
        cfg = dataclasses.replace(cfg, enabled=False)
    with open_pipeline_run(cfg, stage, tags=tags, params=params) as run:
        with run.stage(stage, outputs=outputs, reuse=False) as st:
            yield st
