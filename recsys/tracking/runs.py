"""One tracked run: `MLflowTracker` (the Tracker protocol on an MLflow run),
`StageRun` (what a pipeline stage logs through, or the earlier run it
reuses) and `RunInfo` (a run as plain data).

Params are the flattened config; a value longer than MLflow's 6000-char
limit is logged truncated and in full in the run's `params_full.json`
artifact. Keys and tag values are cut to MLflow's limits.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.core.config import flatten
from features.core.errors import UsageError
from features.core.tracker import ForwardingTracker, NullTracker, Tracker
from features.core.provenance import as_mapping
from recsys.tracking.store import local_path

# MLflow's limits (mlflow.utils.validation); copied so this module imports mlflow lazily.
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 8000
KEY_LIMIT = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAMS_FULL_ARTIFACT = "params_full.json"

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
        for raw_key, raw_value in flatten(as_mapping(params)).items():
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

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """`obj` as JSON at `artifact_file` (e.g. "eval/summary.json")."""
        rel = Path(artifact_file)
        with tempfile.TemporaryDirectory(prefix="recsys-artifact-") as tmp:
            p = Path(tmp) / rel.name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            parent = str(rel.parent) if str(rel.parent) not in ("", ".") else None
            self.client.log_artifact(self.run_id, str(p), artifact_path=parent)

    def set_outputs(self, path: str | Path) -> None:
        """Record where the run's outputs are (the `outputs` tag)."""
        self.set_tags({"outputs": str(Path(path).resolve())})


@dataclass
class StageRun(ForwardingTracker):
    """What `PipelineRun.stage(...)` yields. It is a Tracker: when the stage
    runs, logging goes to its child run; when `reused`, logging is a no-op and
    `run_id`/`outputs`/`info` describe the earlier run."""

    name: str
    run_id: str | None
    reused: bool
    tracker: Tracker = field(default_factory=NullTracker)
    info: RunInfo | None = None  # the reused run
    outputs: str | None = None
    owner: Any = None  # the PipelineRun that opened it (None untracked)

    def record_key(self, key: Mapping[str, Any], *, reused: bool) -> None:
        """Tag this stage run with its job's manifest key and whether the job
        reused its outputs (`PipelineRun.record_key`); untracked: nothing."""
        if self.owner is not None:
            self.owner.record_key(self, key, reused=reused)

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
        return self.tracker.artifact_dir

