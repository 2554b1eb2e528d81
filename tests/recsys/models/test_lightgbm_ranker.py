"""LightGBM baseline: estimator contract, rate features, the ML-100K report
end to end (few trees), the lift comparison and the CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import schemas as S
from features.core.errors import DataError
from features.core.tracker import RecordingTracker
from features.schemas import MATCH_FILE
from recsys.baseline import PREDICTION_COLUMNS, match_lift, run_lightgbm
from recsys.models.lightgbm_ranker import LightGBMConfig, LightGBMRanker, add_rate_features

FEW_TREES = LightGBMConfig(n_estimators=25, early_stopping_rounds=5, learning_rate=0.2, num_threads=1)
METRIC_KEYS = {"auc", "gauc", "logloss", "lt_auc", "lt_spearman"}


def toy(seed=0, n=600):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    X[rng.random((n, 4)) < 0.1] = np.nan  # missing values are allowed
    y = (np.nan_to_num(X[:, 0]) + 0.5 * rng.standard_normal(n) > 0).astype(int)
    return X, y


def test_estimator_contract():
    cfg = dataclasses.replace(FEW_TREES, seed=3)
    m = LightGBMRanker(cfg)
    assert vars(m) == {"config": cfg}  # __init__ stores parameters only
    X, y = toy()
    assert m.fit(X[:400], y[:400], eval_set=(X[400:], y[400:])) is m
    learned = {k for k in vars(m) if k != "config"}
    assert learned and all(k.endswith("_") for k in learned)
    assert m.n_features_in_ == 4 and m.best_iteration_ >= 1
    p = m.predict_proba(X[400:])
    assert p.shape == (200, 2) and np.allclose(p.sum(1), 1) and ((p >= 0) & (p <= 1)).all()
    assert set(np.unique(m.predict(X[400:]))) <= {0, 1}
    assert m.get_params() == {"config": cfg}
    again = LightGBMRanker(cfg).fit(X[:400], y[:400], eval_set=(X[400:], y[400:]))
    np.testing.assert_array_equal(again.predict_proba(X[400:]), p)  # deterministic for a seed
    imp = m.feature_importance()
    assert set(imp) == {"f0", "f1", "f2", "f3"} and imp["f0"] == max(imp.values())


def test_lambdarank_groups_by_user():
    X, y = toy(1)
    users = np.repeat(np.arange(60), 10)
    cfg = dataclasses.replace(FEW_TREES, objective="lambdarank")
    with pytest.raises(ValueError, match="groups"):
        LightGBMRanker(cfg).fit(X, y)
    m = LightGBMRanker(cfg).fit(X[:400], y[:400], groups=users[:400], eval_set=(X[400:], y[400:]), eval_groups=users[400:])
    s = m.predict_proba(X[400:])[:, 1]
    assert np.isfinite(s).all()


def test_a_valid_set_that_cannot_rank_iterations_keeps_every_tree():
    """A probe (2026-12-01): a one-class valid split reads AUC 1.0 at every
    iteration, so early stopping kept 1 tree, silently."""
    X, y = toy(2)
    m = LightGBMRanker(FEW_TREES).fit(X[:400], y[:400], eval_set=(X[400:], np.zeros(200, int)))
    assert m.no_early_stop_ == "every valid label is 0" and m.best_iteration_ == FEW_TREES.n_estimators
    ok = LightGBMRanker(FEW_TREES).fit(X[:400], y[:400], eval_set=(X[400:], y[400:]))
    assert ok.no_early_stop_ is None
    users = np.repeat(np.arange(60), 10)
    one_label_each = np.repeat(np.arange(20) % 2, 10)  # every valid user has a single label value
    cfg = dataclasses.replace(FEW_TREES, objective="lambdarank")
    lr = LightGBMRanker(cfg).fit(X[:400], y[:400], groups=users[:400], eval_set=(X[400:], one_label_each),
                                 eval_groups=users[400:])
    assert lr.no_early_stop_ == "no valid user has impressions of two label values"
    assert lr.best_iteration_ == cfg.n_estimators


def test_config_validation():
    for bad in ({"num_leaves": 1}, {"learning_rate": 0.0}, {"n_estimators": 0}, {"bagging_fraction": 1.5}):
        with pytest.raises(ValueError):
            LightGBMConfig(**bad)
    assert LightGBMConfig().objective == "binary"
    assert LightGBMConfig(use_rates=False, use_popularity=False).base_features() == [S.HIST_END, S.HIST_LEN, S.POS_HIST_LEN]


def test_rate_features_use_only_strictly_earlier_events():
    df = pl.DataFrame(
        {
            S.USER_ID: [1, 1, 2, 2, 3],
            S.ITEM_ID: [7, 7, 7, 8, 7],
            S.TIMESTAMP: [10, 20, 20, 5, 30],  # item 7: t=10 (+), t=20 (-) and t=20 (+) tied, t=30
            S.LABEL: pl.Series([1, 0, 1, 1, 0], dtype=pl.Int8),
            S.ITEM_POP: pl.Series([0, 1, 1, 0, 3], dtype=pl.Int32),
            S.HIST_END: pl.Series([0, 1, 0, 1, 0], dtype=pl.Int32),
            S.POS_HIST_END: pl.Series([0, 1, 0, 1, 0], dtype=pl.Int32),
        }
    )
    out = df.lazy().pipe(add_rate_features).collect()
    # t=20 rows see only the t=10 positive (1 of 1), never each other; t=30 sees 2 positives of 3
    assert out["item_pos_rate"].to_list() == [None, 1.0, 1.0, None, pytest.approx(2 / 3)]
    assert out["user_pos_rate"].to_list() == [None, 1.0, None, 1.0, None]
    assert out.columns == [*df.columns, "item_pos_rate", "user_pos_rate"]


@pytest.fixture(scope="module")
def ml100k_match(ml100k_features, tmp_path_factory):
    from features.jobs import build_match_features
    from features.match import MatchConfig

    tmp = tmp_path_factory.mktemp("lgb_match")
    ids = pl.read_parquet(ml100k_features / "items.parquet")[S.ITEM_ID].to_numpy()
    vec = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    emb = tmp / "emb.parquet"
    pl.DataFrame({"item_id": ids, "embedding": pl.Series(vec.tolist(), dtype=pl.List(pl.Float32))}).write_parquet(emb)
    cfg = MatchConfig(faiss_k=20, sid_codebook_size=8, sid_niter=4, shards=1)
    build_match_features(ml100k_features, emb, tmp / "match", cfg, log=lambda _m: None, progress=False)
    return tmp / "match"


@pytest.fixture(scope="module")
def lift_run(ml100k_features, ml100k_match, tmp_path_factory):
    out = tmp_path_factory.mktemp("lgb") / "lift"
    tracker = RecordingTracker()
    report = match_lift(ml100k_features, ml100k_match, out, FEW_TREES, tracker, n_boot=200, log=lambda _m: None)
    return out, report, tracker


def test_report_files_metrics_and_predictions(ml100k_features, lift_run):
    out, report, tracker = lift_run
    inter = pl.read_parquet(ml100k_features / "interactions.parquet")
    test = inter.filter(pl.col(S.SPLIT) == "test")
    for arm in ("with_match", "no_match"):
        metrics = json.loads((out / arm / "metrics.json").read_text())
        assert METRIC_KEYS <= set(metrics)
        assert all(isinstance(metrics[k], float) for k in METRIC_KEYS)
        assert 0.6 < metrics["auc"] < 0.9 and 0.5 < metrics["gauc"] < 0.9 and 0.4 < metrics["logloss"] < 0.8
        preds = pl.read_parquet(out / arm / "predictions.parquet")
        assert preds.columns[: len(PREDICTION_COLUMNS)] == PREDICTION_COLUMNS
        assert preds.height == test.height == 10_000
        assert_frame_equal(preds.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP), test.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP))
        assert preds["score"].is_between(0, 1).all() and preds["lt_score"].is_between(0, 1).all()
        png = (out / arm / "feature_importance.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        manifest = json.loads((out / arm / "manifest.json").read_text())
        assert ("mf_cos_max" in manifest["features"]) == (arm == "with_match")
    lift = report["gauc_lift"]
    assert lift["ci_low"] <= lift["delta"] <= lift["ci_high"] and lift["n_users"] == 166
    assert json.loads((out / "lift.json").read_text())["gauc_lift"]["delta"] == pytest.approx(lift["delta"])
    # the tracker saw params, metrics and the three artifacts of the tracked arm
    assert tracker.params["lightgbm.n_estimators"] == 25 and tracker.params["n_features"] > 6
    assert {"auc", "gauc", "logloss", "lt_auc", "lt_spearman", "gauc_lift"} <= {k for k, _, _ in tracker.metrics}
    assert {p.split("/")[-1] for p, _ in tracker.artifacts} == {"metrics.json", "predictions.parquet", "feature_importance.png"}


def test_report_is_deterministic(ml100k_features, lift_run, tmp_path):
    out, _, _ = lift_run
    cfg = dataclasses.replace(FEW_TREES, use_match_features=False)
    again = run_lightgbm(ml100k_features, None, tmp_path / "again", cfg, log=lambda _m: None)
    first = json.loads((out / "no_match" / "metrics.json").read_text())
    assert again["auc"] == first["auc"] and again["gauc"] == first["gauc"]
    preds = [pl.read_parquet(d / "predictions.parquet") for d in (tmp_path / "again", out / "no_match")]
    assert_frame_equal(*preds)


def test_misaligned_match_features_are_rejected(ml100k_features, ml100k_match, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    pl.read_parquet(ml100k_match / MATCH_FILE).reverse().write_parquet(bad / MATCH_FILE)
    with pytest.raises(DataError, match="do not line up"):
        run_lightgbm(ml100k_features, bad, tmp_path / "out", FEW_TREES, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_cli(ml100k_features, ml100k_match, tmp_path, monkeypatch, capsys):
    import recsys.cli as cli
    from recsys.cli import baseline

    mod = types.ModuleType("_baseline_cli_for_test")
    mod.register = baseline.register
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (mod.__name__,))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("tracking:\n  enabled: false\nlightgbm:\n  n_estimators: 10\n  num_threads: 1\n")
    out = tmp_path / "cli"
    argv = ["baseline", "lightgbm", "--features", str(ml100k_features), "--out", str(out), "--config", str(cfg)]
    assert cli.main([*argv, "--match-features", str(ml100k_match)]) == 0
    assert METRIC_KEYS <= set(json.loads((out / "metrics.json").read_text()))
    assert cli.main([*argv, "--no-match"]) == 0
    assert "mf_cos_max" not in json.loads((out / "manifest.json").read_text())["features"]
    assert cli.main([*argv, "--lift"]) == 2  # needs --match-features
    with pytest.raises(SystemExit):
        cli.main(["baseline", "lightgbm", "--help"])
    assert "examples:" in capsys.readouterr().out
