"""`RunStore`: one MLflow experiment in one store. Creates runs, finds a
reusable run of a stage, searches runs for comparisons, and marks KILLED the
RUNNING runs of processes on this host that died without closing them.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from features.core.errors import RecsysError, UsageError
from recsys.tracking.config import TrackingConfig
from recsys.tracking.runs import MLflowTracker, RunInfo, _check_name, _key, _run_info, _tag_str
from recsys.tracking.store import (
    Log,
    _mlflow,
    _opening_store,
    _resolve,
    _what_to_do,
    check_store,
    resolve_artifact_root,
)

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

    def find_origin(self, stage: str, reuse_key: str) -> RunInfo | None:
        """Newest FINISHED run of `stage` that computed (did not reuse) the
        outputs whose manifest key hashes to `reuse_key`: lineage of a reused
        stage. The manifest, not this lookup, decides reuse."""
        _check_name(stage, "stage name")
        runs = self._search(
            f"tags.reuse_key = '{_check_name(reuse_key, 'reuse key')}' and tags.stage = '{stage}' "
            "and tags.reused = 'false' and attributes.status = 'FINISHED'", max_results=1
        )
        return runs[0] if runs else None

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

