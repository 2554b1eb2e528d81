"""The small tracking protocol every stage logs through.

Only `recsys.tracking` imports mlflow; library code in every package takes an
object with these methods (or `NullTracker`) so it stays testable and free of
MLflow. Lives in `features`, the bottom layer, so `distill` can use it without
importing `recsys`.

The protocol is everything a stage calls: params, metrics (with a step),
files and folders, tags, a JSON artifact, where the stage wrote its outputs,
and the run's local artifact folder (None when remote or not tracked).
`ForwardingTracker` passes every call on to another tracker; an adapter
overrides only what it changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """`obj` as JSON at `artifact_file` (e.g. "eval/summary.json")."""
        ...

    def set_outputs(self, path: str | Path) -> None:
        """Record where the stage wrote its outputs."""
        ...

    @property
    def artifact_dir(self) -> Path | None:
        """Local folder of the run's artifacts; None when remote or untracked."""
        ...


class NullTracker:
    """Logs nothing (tests, library use without MLflow)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def set_outputs(self, path: str | Path) -> None:
        pass

    @property
    def artifact_dir(self) -> Path | None:
        return None


class RecordingTracker(NullTracker):
    """Keeps everything in memory (tests assert on what a stage logged)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[str, float, int | None]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}
        self.dicts: dict[str, Any] = {}  # artifact_file -> obj
        self.outputs: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.extend((k, float(v), step) for k, v in metrics.items())

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.dicts[artifact_file] = obj

    def set_outputs(self, path: str | Path) -> None:
        self.outputs = str(Path(path).resolve())


class ForwardingTracker:
    """Passes every call on to `self.tracker` (adapters override what they change)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tracker.set_tags(tags)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.tracker.log_dict(obj, artifact_file)

    def set_outputs(self, path: str | Path) -> None:
        self.tracker.set_outputs(path)

    @property
    def artifact_dir(self) -> Path | None:
        return self.tracker.artifact_dir
