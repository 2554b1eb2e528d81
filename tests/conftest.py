"""Shared fixtures. Every test runs offline and on CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _throwaway_tracking_store(tmp_path_factory):
    """Every test that tracks runs without naming a store logs into a
    throwaway sqlite store, never the project's ./mlflow."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def ml100k_features(tmp_path_factory):
    """MovieLens-100K built once per session with the default config."""
    from features.jobs import FeaturesConfig, build_features

    out = tmp_path_factory.mktemp("ml100k") / "features"
    build_features(FeaturesConfig(), out, log=lambda _m: None)
    return out


@pytest.fixture(scope="session")
def synthetic_features(tmp_path_factory):
    """A small synthetic set (planted factors) built once per session."""
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig

    out = tmp_path_factory.mktemp("synthetic") / "features"
    cfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=300, items=400, max_events=120, seed=3))
    build_features(cfg, out, log=lambda _m: None)
    return out
