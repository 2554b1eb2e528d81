"""Experiment tracking on MLflow. The ONLY package in the project that imports mlflow.

Everything else logs through the small `features.core.tracker.Tracker` protocol
(`log_params`, `log_metrics(step=)`, `log_artifact`, `set_tags`, `log_dict`,
`set_outputs`, `artifact_dir`). mlflow is imported lazily, inside functions,
so `recsys --help` stays fast.

    config        `TrackingConfig`, the `tracking:` section (no mlflow import)
    store         where runs go: URI precedence, store checks, the sqlite lock
    provenance    code version, git state, stage reuse keys
    runs          `MLflowTracker`, `StageRun`, `RunInfo`
    runstore      `RunStore`: create, search, find reusable runs, mark dead ones
    pipeline_run  `open_pipeline_run` (parent + stage runs), `tracked_command`
    server        `recsys ui`: the MLflow server tied to our process
"""

from __future__ import annotations

from recsys.tracking.config import TrackingConfig
from recsys.tracking.pipeline_run import NullPipelineRun, PipelineRun, open_pipeline_run, tracked_command
from recsys.tracking.provenance import CodeVersion, GitInfo, code_version, fingerprint, git_info, key_hash, stage_key
from recsys.tracking.runs import PARAM_VALUE_LIMIT, MLflowTracker, RunInfo, StageRun
from recsys.tracking.runstore import RunStore, connect
from recsys.tracking.server import MlflowServer, serve, server_for
from recsys.tracking.store import check_store, resolve_artifact_root, resolve_uri

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
    "PARAM_VALUE_LIMIT",
    "RunInfo",
    "MLflowTracker",
    "StageRun",
    "RunStore",
    "PipelineRun",
    "NullPipelineRun",
    "connect",
    "open_pipeline_run",
    "tracked_command",
    "MlflowServer",
    "server_for",
    "serve",
]
