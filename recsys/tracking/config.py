"""`TrackingConfig`: the `tracking:` section of the pipeline config (no mlflow import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.core.config import expand_home


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
        expand_home(self, ("artifact_root",))  # a leading ~ as a shell would (it made a folder named ~)
        if self.uri.startswith("sqlite:///~"):
            object.__setattr__(self, "uri", "sqlite:///" + str(Path(self.uri[len("sqlite:///"):]).expanduser()))
        if not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name")
