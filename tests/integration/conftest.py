"""A finished debug experiment (experiments/debug_ab.yaml, the whole chain in
about a minute) in a throwaway folder with its own tracking store, run once
per session and shared by the registry, serving and browser tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DebugExperiment:
    root: Path  # the working directory the experiment ran in (its paths are relative to it)
    uri: str  # its tracking store

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts" / "debug"

    def arm(self, name: str, seed: int = 0) -> Path:
        return self.artifacts / "experiments" / "debug_ab" / name / f"seed{seed}"


@pytest.fixture(scope="session")
def debug_experiment(tmp_path_factory) -> DebugExperiment:
    from recsys.cli import main

    root = tmp_path_factory.mktemp("debug_experiment")
    shutil.copytree(REPO / "experiments", root / "experiments")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        assert main(["experiment", "run", "experiments/debug_ab.yaml", "--quiet"]) == 0
    return DebugExperiment(root, uri)


@pytest.fixture
def in_experiment(debug_experiment, monkeypatch) -> DebugExperiment:
    """The debug experiment's folder as working directory and its store as
    the tracking (and registry) URI of this test."""
    monkeypatch.chdir(debug_experiment.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", debug_experiment.uri)  # mlflow reads it on every call
    return debug_experiment
