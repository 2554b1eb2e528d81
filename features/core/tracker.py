"""The small tracking protocol every stage logs through.

Only `recsys.tracking` imports mlflow; library code in every package takes an
object with these methods (or `NullTracker`) so it stays testable and free of
MLflow. Lives in `features`, the bottom layer, so `distill` can use it without
importing `recsys`.
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


class RecordingTracker(NullTracker):
    """Keeps everything in memory (tests assert on what a stage logged)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[str, float, int | None]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.extend((k, float(v), step) for k, v in metrics.items())

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)
