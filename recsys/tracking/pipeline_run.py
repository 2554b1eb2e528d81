"""One parent run per pipeline invocation, one nested child run per stage:

    with open_pipeline_run(cfg.tracking, "ml100k", tags={"experiment": "ab1", "arm": "svd"},
                           params=cfg.to_dict()) as run:
        with run.stage("distill", params=distill_params, upstream={"features": fp}, outputs=out) as st:
            result = run_distill(job, st, out)   # st is a Tracker; the job skips up-to-date outputs
            run.record_key(st, result.key, reused=result.reused)

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

Reuse is decided by the job alone: its output folder's manifest key
(`features.core.provenance.stage_key`). `record_key` tags the stage run with
`reuse_key` (the key's hash) and `reused`, and a reused stage names the run
that computed its outputs (`reused_from`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from features.core.config import config_hash
from features.core.tracker import NullTracker
from recsys.tracking.config import TrackingConfig
from recsys.tracking.provenance import CodeVersion, as_mapping, code_version, fingerprint, key_hash
from recsys.tracking.runs import MLflowTracker, StageRun, _check_name, _tag_str
from recsys.tracking.runstore import RunStore
from recsys.tracking.store import Log, _stderr, local_path, resolve_artifact_root, sqlite_path

PIPELINE_STAGE = "pipeline"


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
    ) -> None:
        super().__init__(store.client, tracker.run_id, tracker.artifact_uri)
        self.store = store
        self.code = code
        self.inherited = dict(inherited)
        self.log = log

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
    ) -> Iterator[StageRun]:
        """A nested run for stage `name` (a Tracker).

        `params`: the stage's resolved config (mapping or dataclass);
        `upstream`: {input name: content fingerprint}; `outputs`: where the
        stage writes (or call `st.set_outputs(path)` later). Whether the
        stage's work is reused is the job's decision (its manifest key); tell
        the run with `record_key`.
        """
        _check_name(name, "stage name")
        params = as_mapping(params)
        upstream = {str(k): str(v) for k, v in (upstream or {}).items()}
        run_tags: dict[str, Any] = {
            **self.inherited,
            **(tags or {}),
            **self.code.tags(),
            "stage": name,
            "config_hash": config_hash(params),
            "data_fingerprint": fingerprint(upstream),
            "mlflow.parentRunId": self.run_id,
            **{f"upstream.{k}": v for k, v in upstream.items()},
        }
        if outputs is not None:
            run_tags["outputs"] = str(Path(outputs).resolve())
        tracker = self.store.create_run(name, run_tags)
        self.set_tags({f"stage.{name}.run_id": tracker.run_id})
        st = StageRun(name, tracker.run_id, False, tracker, None, run_tags.get("outputs"), owner=self)
        with _terminate_on_exit(self.client, tracker.run_id):
            tracker.log_params(params)
            yield st

    def record_key(self, st: StageRun, key: Mapping[str, Any], *, reused: bool) -> None:
        """Tag stage run `st` with its job's manifest key (`reuse_key` =
        `key_hash(key)`) and whether the job reused up-to-date outputs; a
        reused stage also names the run that computed them (`reused_from`),
        when the store still has it."""
        h = key_hash(key)
        tags = {"reuse_key": h, "reused": str(reused).lower()}
        if reused:
            origin = self.store.find_origin(st.name, h)
            if origin is not None:
                tags["reused_from"] = origin.run_id
                self.set_tags({f"stage.{st.name}.reused_from": origin.run_id})
            self.log(f"{st.name}: outputs up to date (same key {h[:12]}: params, inputs, code); reused"
                     + (f" from run {origin.run_id}" if origin is not None else ""))
        st.tracker.set_tags(tags)
        self.set_tags({f"stage.{st.name}.reused": str(reused).lower()})


class NullPipelineRun(NullTracker):
    """`tracking.enabled: false`: same API, logs nothing, never reuses."""

    run_id = None

    def search_runs(self, experiment_tag: str, **kwargs: Any) -> list[dict[str, Any]]:
        return []

    @contextmanager
    def stage(self, name: str, params: Any = None, upstream: Mapping[str, str] | None = None, *,
              outputs: str | Path | None = None, tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
        yield StageRun(name, None, False, NullTracker(), None, str(outputs) if outputs is not None else None)

    def record_key(self, st: StageRun, key: Mapping[str, Any], *, reused: bool) -> None:
        pass


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
    params = as_mapping(params)
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
    run = PipelineRun(store, tracker, code, caller, log=log)
    with _terminate_on_exit(store.client, run.run_id):
        run.log_params(params)
        yield run


@contextmanager
def tracked_command(
    cfg: TrackingConfig,
    stage: str,
    params: Any,
    *,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
    outputs: str | Path | None = None,
    upstream: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """One CLI command = a parent run (holding the command's params) with one
    stage run (`upstream`: {input: fingerprint}, its data fingerprint). The
    stage run's params are left to the library code it is passed to; the
    command tags it with its job's key (`st.record_key(key, reused=...)`).
    `enabled=False` (e.g. torchrun ranks > 0) logs nothing."""
    if not enabled:
        cfg = dataclasses.replace(cfg, enabled=False)
    with open_pipeline_run(cfg, stage, tags=tags, params=params, upstream=upstream) as run:
        with run.stage(stage, outputs=outputs, upstream=upstream) as st:
            yield st
