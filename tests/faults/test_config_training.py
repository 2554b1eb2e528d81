"""Faults of config validation, ranker training, metrics and the LightGBM
baseline: every case asserts the exit code, the message (file,
column, key or step where they apply) and that no output (or the old output)
is under the final name. Data: a 20-user files-source dataset built once per
module with `recsys features build`; configs are experiments/configs/debug.yaml
pointed at tmp folders, one epoch, tracking off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from features import schemas as S
from features.core.config import deep_merge, from_dict
from features.core.errors import ConfigError
from tests.faults.conftest import snapshot, write_tiny_dataset
from tests.outputs import rewrite_output

DEBUG_YAML = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "debug.yaml"
RANK_OUTPUTS = ("metrics.json", "predictions.parquet")


def _build_features(root: Path, **dataset) -> Path:
    from recsys.cli import main

    data = write_tiny_dataset(root / "data", **dataset)
    out = root / "features"
    rc = main(["features", "build", "--source", "files", "--interactions", str(data.interactions),
               "--items", str(data.items), "--out", str(out), "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory) -> Path:
    return _build_features(tmp_path_factory.mktemp("tiny20"))


@pytest.fixture
def features_copy(features_dir, tmp_path) -> Path:
    """A private copy of the features folder, for tests that damage it."""
    return Path(shutil.copytree(features_dir, tmp_path / "features"))


def rank_config(tmp_path: Path, features: Path, delta: dict | None = None, name: str = "cfg.yaml") -> Path:
    """debug.yaml, pointed at `features`, one epoch, tracking off, + `delta`."""
    base = yaml.safe_load(DEBUG_YAML.read_text())
    base = deep_merge(base, {
        "data": {"history_cap": 50},
        "train": {"epochs": 1, "progress": False},
        "tracking": {"enabled": False},
        "paths": {"root": str(tmp_path / "root"), "features": str(features)},
    })
    path = tmp_path / name
    path.write_text(yaml.safe_dump(deep_merge(base, delta or {})))
    return path


def no_rank_output(out: Path) -> bool:
    return not any((out / f).exists() for f in RANK_OUTPUTS)


def set_labels(features: Path, label: pl.Expr, split: str | None = None) -> None:
    """Rewrite the click label of interactions.parquet (all rows, or one split)."""
    path = features / S.FILES["interactions"]
    frame = pl.read_parquet(path)
    cond = pl.lit(True) if split is None else pl.col(S.SPLIT) == split
    rewrite_output(path, frame.with_columns(pl.when(cond).then(label).otherwise(pl.col(S.LABEL)).cast(frame[S.LABEL].dtype)
                                            .alias(S.LABEL)))


# --- config: finite floats, ranges, PyYAML strings, encoding ------------------------------


@pytest.mark.parametrize(
    "section, key, value",
    [("train", "lr", float("inf")), ("train", "lr", float("nan")), ("train", "sparse_lr", float("-inf")),
     ("ranker", "lt_weight", float("nan")), ("lightgbm", "learning_rate", float("inf")),
     ("features", "label_threshold", float("nan"))],
)
def test_non_finite_float_key_exits_2_naming_the_key(cli, features_dir, tmp_path, section, key, value):
    cfg = rank_config(tmp_path, features_dir, {section: {key: value}})
    assert any(t in cfg.read_text() for t in (".inf", ".nan"))  # YAML's own spelling
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", tmp_path / "out")
    assert rc == 2
    assert f"{section}.{key}" in err and "finite" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "delta, key",
    [({"train": {"weight_decay": -0.1}}, "weight_decay"), ({"train": {"min_delta": 2.0}}, "min_delta"),
     ({"lightgbm": {"feature_fraction": 1.5}}, "feature_fraction"), ({"ranker": {"init_std": 0.0}}, "init_std")],
)
def test_out_of_range_float_exits_2(cli, features_dir, tmp_path, delta, key):
    rc, _, err = cli("rank", "train", "--config", rank_config(tmp_path, features_dir, delta), "--out", tmp_path / "out")
    assert rc == 2 and key in err
    assert not (tmp_path / "out").exists()


def test_float_written_without_a_dot_is_a_float_and_only_for_float_keys():
    from recsys.config.sections import RankerConfig, TrainConfig

    # PyYAML reads `lr: 1e-3` as the string "1e-3"
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"
    assert from_dict(TrainConfig, {"lr": "1e-3", "sparse_lr": " 5e-2 "}).lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        from_dict(TrainConfig, {"epochs": "1e1"}, where="train")
    with pytest.raises(ConfigError, match="ranker.use_user_id: expected bool"):
        from_dict(RankerConfig, {"use_user_id": "1e0"}, where="ranker")
    with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
        from_dict(TrainConfig, {"lr": "inf"}, where="train")
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        from_dict(TrainConfig, {"lr": True}, where="train")


def test_non_utf8_config_exits_2_naming_the_file(cli, features_dir, tmp_path):
    cfg = rank_config(tmp_path, features_dir)
    cfg.write_bytes(cfg.read_bytes() + "\nname: caf\xe9\n".encode("latin-1"))
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", tmp_path / "out")
    assert rc == 2
    assert str(cfg) in err and "UTF-8" in err
    assert not (tmp_path / "out").exists()


# --- training: divergence, checkpoints, launch environment ----------------------------


def test_huge_lr_stops_with_exit_1_naming_epoch_and_step(cli, features_dir, tmp_path):
    cfg = rank_config(tmp_path, features_dir, {"train": {"lr": 1e30, "sparse_lr": 1e30, "batch_size": 8},
                                               "ranker": {"history_encoder": "svd_compact"}})
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", tmp_path / "out")
    assert rc == 1
    assert "epoch 1" in err and "step" in err and "NaN or inf" in err and "lr" in err
    assert no_rank_output(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no empty folder either (left behind before 2026-11-30)


def test_svd_attention_on_non_finite_history_is_a_clear_error():
    from features.core.errors import RecsysError
    from recsys.modules.svd_attention import SVDFactorizationError, svd_factors

    history = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))  # (B, L, D)
    history[0, 1, 2] = float("inf")
    with pytest.raises(SVDFactorizationError, match="NaN or inf") as e:
        svd_factors(history, torch.tensor([5, 5]), 2)
    assert isinstance(e.value, RecsysError) and e.value.exit_code == 1


def test_nan_score_in_evaluation_is_refused(features_dir):
    from recsys.config.sections import DataConfig
    from recsys.data import RankingData
    from recsys.train import TrainingDiverged, predict

    data = RankingData.load(features_dir, DataConfig(history_cap=20))

    class NaNModel(torch.nn.Module):
        def forward(self, batch):
            n = batch.n_candidates
            logits = type("L", (), {"click": torch.full((n,), float("nan")), "lt": torch.zeros(n)})()
            return None, type("P", (), {"logits": logits})()

    with pytest.raises(TrainingDiverged, match="evaluation on valid: .* NaN or inf"):
        predict(NaNModel(), data, "valid", 64)


def test_corrupt_checkpoint_exits_1_suggesting_no_resume(cli, features_dir, tmp_path):
    cfg = rank_config(tmp_path, features_dir)
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"not a torch file")
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", out)
    assert rc == 1
    assert "--no-resume" in err and "last.pt" in err
    assert no_rank_output(out)
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", out, "--no-resume")
    assert rc == 0, err
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize(
    "env, needle",
    [({"WORLD_SIZE": "2"}, "MASTER_ADDR"), ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
     ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK=1")],
)
def test_world_size_without_torchrun_exits_2_at_once(cli, features_dir, tmp_path, monkeypatch, env, needle):
    import time

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    rc, _, err = cli("rank", "train", "--config", rank_config(tmp_path, features_dir), "--out", tmp_path / "out")
    assert rc == 2 and needle in err and "torchrun" in err
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "out").exists()


# --- match features: requested and absent is exit 2 ---------------------------------------


@pytest.mark.parametrize("where", ["nowhere", "empty_dir", "nowhere.parquet"])
def test_rank_missing_match_features_exits_2(cli, features_dir, tmp_path, where):
    (tmp_path / "empty_dir").mkdir()
    path = tmp_path / where
    cfg = rank_config(tmp_path, features_dir, {"data": {"use_match_features": True},
                                               "paths": {"match_features": str(path)}})
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", tmp_path / "out")
    assert rc == 2
    assert "paths.match_features" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_lightgbm_match_features_requested_but_absent_exits_2(cli, features_dir, tmp_path):
    out = tmp_path / "lgb"
    rc, _, err = cli("baseline", "lightgbm", "--features", features_dir, "--out", out)
    assert rc == 2 and "--match-features" in err and "--no-match" in err
    (tmp_path / "match").mkdir()
    rc, _, err = cli("baseline", "lightgbm", "--features", features_dir, "--match-features", tmp_path / "match",
                     "--out", out)
    assert rc == 2 and "match_features.parquet" in err
    cfg = tmp_path / "off.yaml"
    cfg.write_text("lightgbm: {use_match_features: false}\ntracking: {enabled: false}\n")
    rc, _, err = cli("baseline", "lightgbm", "--features", features_dir, "--match-features", tmp_path / "match",
                     "--out", out, "--config", cfg)
    assert rc == 2 and "use_match_features is false" in err
    rc, _, err = cli("baseline", "lightgbm", "--features", features_dir, "--no-match", "--lift", "--out", out)
    assert rc == 2
    assert not out.exists()


# --- metrics: NaN with a reason, never a crash -------------------------------------------


def test_full_rank_run_on_20_users_writes_null_with_reasons(cli, features_dir, tmp_path):
    # also: lr written as "1e-3"
    cfg = rank_config(tmp_path, features_dir, {"train": {"lr": "1e-3"}})
    out = tmp_path / "out"
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", out)
    assert rc == 0, err
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics = json.loads(text)
    inter = pl.read_parquet(features_dir / S.FILES["interactions"])
    observed_test = inter.filter((pl.col(S.SPLIT) == "test") & pl.col(S.LT_OBSERVED)).height
    for m in ("auc", "gauc", "logloss"):
        assert isinstance(metrics[m], float)
    for m in ("lt_auc", "lt_spearman"):
        if metrics[m] is None:
            assert m in metrics["reasons"]
            if observed_test == 0:
                assert "no observed LT rows" in metrics["reasons"][m]
    if metrics["lt_auc"] is None:
        assert "lt_auc n/a" in err
    assert metrics["match_features"] == []
    assert pl.read_parquet(out / "predictions.parquet").height == metrics["n_test"]


def test_all_negative_labels_exit_1_naming_label_column(cli, features_copy, tmp_path):
    set_labels(features_copy, pl.lit(0))
    interactions = str(features_copy / S.FILES["interactions"])
    rc, _, err = cli("rank", "train", "--config", rank_config(tmp_path, features_copy), "--out", tmp_path / "out")
    assert rc == 1 and interactions in err and "'label'" in err and "nothing to learn" in err and "not clicked, label 0" in err
    assert not (tmp_path / "out").exists()
    rc, _, err = cli("baseline", "lightgbm", "--features", features_copy, "--no-match", "--out", tmp_path / "lgb")
    assert rc == 1 and interactions in err and "'label'" in err and "train" in err
    assert not (tmp_path / "lgb").exists()


def test_single_user_dataset_trains_and_reports(cli, tmp_path):
    features = _build_features(tmp_path / "one", users=1, events_per_user=30)
    rc, _, err = cli("rank", "train", "--config", rank_config(tmp_path, features), "--out", tmp_path / "out")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["reasons"]) == {k for k in ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")
                                       if metrics[k] is None}


def test_lightgbm_single_class_test_split_gives_null_auc_with_reason(cli, features_copy, tmp_path):
    set_labels(features_copy, pl.lit(0), split="test")
    out = tmp_path / "lgb"
    rc, stdout, err = cli("baseline", "lightgbm", "--features", features_copy, "--no-match", "--out", out)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc"] is None and metrics["gauc"] is None
    assert "one class" in metrics["reasons"]["auc"]
    assert isinstance(metrics["logloss"], float) and np.isfinite(metrics["logloss"])
    assert "auc n/a" in stdout


def test_metrics_on_empty_or_single_class_rows_are_nan_with_reasons():
    from recsys.eval.metrics import auc, format_metric, gauc, logloss, nan_reason, spearman

    empty = np.zeros(0)
    for value in (auc(empty, empty), gauc(empty, empty, empty), logloss(empty, empty), spearman(empty, empty)):
        assert np.isnan(value)
    assert nan_reason("auc", empty, empty) == "no rows"
    assert "one class" in nan_reason("auc", [0, 0, 0], [0.1, 0.2, 0.3], "returned_1d")
    assert "no user has both" in nan_reason("gauc", [0, 1], [0.1, 0.2])
    assert np.isnan(auc([0, 1], [0.5, float("nan")])) and "non-finite" in nan_reason("auc", [0, 1], [0.5, np.nan])
    assert format_metric(float("nan")) == "n/a" and format_metric(None) == "n/a" and format_metric(0.5) == "0.5000"


# --- output guards and odd inputs ------------------------------------------------------------


@pytest.mark.parametrize("target", ["features", "inside_features", "config"])
def test_rank_out_overlapping_an_input_exits_2_inputs_untouched(cli, features_copy, tmp_path, target):
    cfg = rank_config(tmp_path, features_copy)
    out = {"features": features_copy, "inside_features": features_copy / "rank", "config": cfg}[target]
    before, cfg_before = snapshot(features_copy), cfg.read_bytes()
    rc, _, err = cli("rank", "train", "--config", cfg, "--out", out)
    assert rc == 2 and "--out" in err and "input" in err
    assert snapshot(features_copy) == before and cfg.read_bytes() == cfg_before


def test_lightgbm_out_equal_to_features_or_a_file_exits_2(cli, features_copy, tmp_path):
    before = snapshot(features_copy)
    rc, _, err = cli("baseline", "lightgbm", "--features", features_copy, "--no-match", "--out", features_copy)
    assert rc == 2 and "--features" in err
    assert snapshot(features_copy) == before
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    rc, _, err = cli("baseline", "lightgbm", "--features", features_copy, "--no-match", "--out", a_file)
    assert rc == 2 and "existing file" in err
    assert a_file.read_text() == "keep me"


def test_features_folder_missing_a_file_exits_1_naming_it(cli, features_copy, tmp_path):
    (features_copy / S.FILES["sequences"]).unlink()
    rc, _, err = cli("rank", "train", "--config", rank_config(tmp_path, features_copy), "--out", tmp_path / "out")
    assert rc == 1 and S.FILES["sequences"] in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_lightgbm_wrong_schema_or_garbage_parquet_exits_1_naming_file_and_column(cli, features_copy, tmp_path):
    path = features_copy / S.FILES["interactions"]
    rewrite_output(path, pl.read_parquet(path).drop(S.HIST_END))
    rc, _, err = cli("baseline", "lightgbm", "--features", features_copy, "--no-match", "--out", tmp_path / "lgb")
    assert rc == 1 and str(path) in err and f"'{S.HIST_END}'" in err
    path.write_bytes(b"garbage, not parquet")  # unlike its manifest: named as changed, with the build to rerun
    rc, _, err = cli("baseline", "lightgbm", "--features", features_copy, "--no-match", "--out", tmp_path / "lgb")
    assert rc == 1 and str(path) in err and "parquet" in err
    rc, _, err = cli("rank", "train", "--config", rank_config(tmp_path, features_copy), "--out", tmp_path / "out")
    assert rc == 1 and str(path) in err and "parquet" in err
    assert not (tmp_path / "lgb").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("n_boot", ["1", "2", "99", "10001"])
def test_lightgbm_n_boot_out_of_range_exits_2(cli, features_dir, tmp_path, n_boot):
    # as `experiment compare`: 2 replicates once marked a noise-level lift significant
    (tmp_path / "m").mkdir()
    rc, _, err = cli("baseline", "lightgbm", "--features", features_dir, "--match-features", tmp_path / "m",
                     "--lift", "--n-boot", n_boot, "--out", tmp_path / "lgb")
    assert rc == 2 and f"--n-boot {n_boot}: need 100 to 10000" in err
    assert not (tmp_path / "lgb").exists()


def test_lambdarank_reports_no_logloss(cli, features_dir, tmp_path):
    """Found by a probe (2026-11-30): logloss was taken of sigmoid(ranking
    score), which looks like a probability and is not one."""
    cfg = tmp_path / "rank.yaml"
    cfg.write_text("lightgbm: {objective: lambdarank}\ntracking: {enabled: false}\n")
    rc, out, err = cli("baseline", "lightgbm", "--features", features_dir, "--no-match", "--out", tmp_path / "lgb",
                       "--config", cfg)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "lgb" / "metrics.json").read_text())
    assert metrics["logloss"] is None and metrics["valid_logloss"] is None and metrics["auc"] is not None
    assert "not probabilities" in metrics["reasons"]["logloss"]
    assert "logloss n/a" in out + err
    # an A/B with such an arm and a probability metric is refused before any work
    exp = tmp_path / "ab.yaml"
    (tmp_path / "base.yaml").write_text(f"paths: {{features: {features_dir}}}\ntracking: {{enabled: false}}\n")
    exp.write_text("experiment: rank_ab\nbaseline: base.yaml\ncontrol: c\nmetrics: [auc, logloss]\narms:\n"
                   "  - {name: c, model: lightgbm}\n"
                   "  - {name: t, model: lightgbm, delta: {lightgbm: {objective: lambdarank}}}\n")
    rc, _, err = cli("experiment", "run", exp)
    assert rc == 2 and "arm 't' (lightgbm.objective lambdarank)" in err and "['logloss']" in err


def test_rank_train_runs_carry_their_reuse_key_and_data_fingerprint(cli, features_dir, tmp_path):
    # the command's MLflow runs once had no reuse_key / reused tags and data_fingerprint "none"
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = rank_config(tmp_path, features_dir, {"tracking": {"enabled": True, "uri": uri}})
    for _ in range(2):
        rc, _, err = cli("rank", "train", "--config", cfg, "--out", tmp_path / "out")
        assert rc == 0, err
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.stage = 'rank'", order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    first, second = (r.data.tags for r in runs)
    assert first["reused"] == "false" and second["reused"] == "true"
    assert first["reuse_key"] == second["reuse_key"] and second["reused_from"] == runs[0].info.run_id
    assert first["data_fingerprint"] != "none" and "upstream.features" in first


def test_lambdarank_trains_the_lt_model_binary(cli, features_dir, tmp_path):
    """Found by a probe (2026-11-30): the LT model used lambdarank too, which
    ranks within a user where the LT proxy is mostly one class (lt_auc 0.48
    vs 0.55 binary): the LT model is now binary whatever the click objective."""
    scores = {}
    for objective in ("binary", "lambdarank"):
        cfg = tmp_path / f"{objective}.yaml"
        cfg.write_text(f"lightgbm: {{objective: {objective}}}\ntracking: {{enabled: false}}\n")
        rc, _, err = cli("baseline", "lightgbm", "--features", features_dir, "--no-match", "--out", tmp_path / objective,
                         "--config", cfg)
        assert rc == 0, err
        scores[objective] = pl.read_parquet(tmp_path / objective / "predictions.parquet")
    assert scores["binary"]["lt_score"].equals(scores["lambdarank"]["lt_score"])  # one LT model
    assert not scores["binary"]["score"].equals(scores["lambdarank"]["score"])  # two click models
