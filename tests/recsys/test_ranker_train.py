"""recsys.train + `recsys rank train`: contract files, determinism, checkpoint
resume == uninterrupted run, early stopping, tracker, CLI exit codes, bench smoke."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features import schemas as S
from features.core.config import from_dict
from features.core.errors import ConfigError
from features.core.fingerprint import file_fingerprint
from features.core.tracker import RecordingTracker
from recsys.config import PipelineConfig
from recsys.config.sections import TrainConfig
from recsys.plan import RankJob, plan_rank
from recsys.train import PREDICTION_COLUMNS, train_ranker
from tests.recsys.test_ranker_data import make_match_standin

CONTRACT_KEYS = {"auc", "gauc", "logloss", "lt_auc", "lt_spearman"}


def config(features: Path, match: str | None = None, ranker: dict | None = None, train: dict | None = None,
           seed: int = 0) -> PipelineConfig:
    train = dict(train or {})
    data = {"history_cap": 50, "use_match_features": match is not None,
            "negatives_per_request": train.pop("negatives_per_request", 0)}
    return PipelineConfig.from_mapping({
        "seed": seed,
        "paths": {"features": str(features), "match_features": match or ""},
        "data": data,
        "ranker": {"embedding_dim": 8, "svd_rank": 4, "history_encoder": "mean",
                   "dense_arch_layer_sizes": [8], "over_arch_layer_sizes": [16, 8], **(ranker or {})},
        "train": {"epochs": 2, "batch_size": 128, "progress": False, "patience": 0, **train},
    })


def pipeline(features: Path, match: str | None = None, ranker: dict | None = None, train: dict | None = None,
             seed: int = 0) -> RankJob:
    return plan_rank(config(features, match, ranker, train, seed))


def _losses(metrics: dict) -> list[dict]:
    """Per-epoch history without wall times."""
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in metrics["history"]]


def test_contract_files(synthetic_features, tmp_path):
    make_match_standin(synthetic_features, tmp_path / "match")
    cfg = pipeline(synthetic_features, str(tmp_path / "match"), ranker={"history_encoder": "svd_compact"},
                   train={"epochs": 1})
    metrics = train_ranker(cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(saved)
    for k in CONTRACT_KEYS:
        assert saved[k] == pytest.approx(metrics[k])
        assert np.isfinite(metrics[k])
    assert 0.5 < metrics["auc"] <= 1.0  # planted preferences are learnable
    assert set(saved["valid"]) >= CONTRACT_KEYS
    assert saved["match_features"] == ["mf_pop_hist", "mf_noise"]
    assert saved["auc_by_activity"]
    pred = pl.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert tuple(pred.columns) == PREDICTION_COLUMNS
    inter = pl.read_parquet(synthetic_features / S.FILES["interactions"])
    test = inter.filter(pl.col(S.SPLIT) == "test")
    assert pred.height == test.height == metrics["n_test"]
    # one epoch over every train impression: the samples of samples/s
    assert saved["train_samples"] == inter.filter(pl.col(S.SPLIT) == "train").height
    assert saved["train_samples_per_s"] == pytest.approx(saved["train_samples"] / saved["train_seconds"])
    assert pred.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL).equals(
        test.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL))
    for col in ("score", "lt_score"):
        v = pred[col].to_numpy()
        assert ((v > 0) & (v < 1)).all()


def test_same_seed_same_metrics_and_predictions(synthetic_features, tmp_path):
    cfg = pipeline(synthetic_features, ranker={"history_encoder": "svd_compact"},
                   train={"negatives_per_request": 1, "resume": False})
    a = train_ranker(cfg, tmp_path / "a")
    b = train_ranker(cfg, tmp_path / "b")
    for k in CONTRACT_KEYS:
        assert a[k] == b[k], k
    assert _losses(a) == _losses(b)
    pa = pl.read_parquet(tmp_path / "a" / "predictions.parquet")
    pb = pl.read_parquet(tmp_path / "b" / "predictions.parquet")
    assert pa.equals(pb)
    c = train_ranker(pipeline(synthetic_features, ranker={"history_encoder": "svd_compact"},
                              train={"negatives_per_request": 1}, seed=1), tmp_path / "c")
    assert c["logloss"] != a["logloss"]


def test_resume_continues_and_equals_uninterrupted(synthetic_features, tmp_path):
    full = train_ranker(pipeline(synthetic_features, train={"epochs": 3}), tmp_path / "full")
    # "interrupted" after 1 epoch, then the same run asked for 3 epochs resumes from the checkpoint
    first = train_ranker(pipeline(synthetic_features, train={"epochs": 1}), tmp_path / "resumed")
    assert first["epochs_run"] == 1
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert json.loads(ckpt["state"])["epoch"] == 1
    tracker = RecordingTracker()
    resumed = train_ranker(pipeline(synthetic_features, train={"epochs": 3}), tmp_path / "resumed", tracker)
    assert resumed["epochs_run"] == 3
    assert [s for k, _, s in tracker.metrics if k == "train_loss"] == [2, 3]  # epoch 1 not retrained
    for k in CONTRACT_KEYS:
        assert resumed[k] == full[k], k
    assert _losses(full) == _losses(resumed)
    # a finished run resumed again trains nothing more and reports the same
    again = train_ranker(pipeline(synthetic_features, train={"epochs": 3}), tmp_path / "resumed")
    assert again["auc"] == full["auc"]


def test_a_checkpoint_past_the_configured_epochs_is_not_resumed(synthetic_features, tmp_path, capsys):
    """Before (2026-12-01, a probe) lowering train.epochs resumed the longer
    run's checkpoint: it trained nothing and reported that model, exit 0."""
    train_ranker(pipeline(synthetic_features, train={"epochs": 2}), tmp_path / "out")
    one = train_ranker(pipeline(synthetic_features, train={"epochs": 1}), tmp_path / "fresh")
    tracker = RecordingTracker()
    lowered = train_ranker(pipeline(synthetic_features, train={"epochs": 1}), tmp_path / "out", tracker)
    assert "is past train.epochs (2 > 1); starting fresh" in capsys.readouterr().err
    assert lowered["epochs_run"] == 1 and [s for k, _, s in tracker.metrics if k == "train_loss"] == [1]
    for k in CONTRACT_KEYS:
        assert lowered[k] == one[k], k


def test_a_finished_checkpoint_trained_on_other_inputs_is_not_resumed(synthetic_features, tmp_path):
    """Same config, other match features (a rerun after the embeddings changed): train afresh."""
    make_match_standin(synthetic_features, tmp_path / "match", seed=0)
    job = pipeline(synthetic_features, str(tmp_path / "match"), train={"epochs": 1})
    first = train_ranker(job, tmp_path / "out")
    make_match_standin(synthetic_features, tmp_path / "match", seed=1)  # same columns, other values
    tracker = RecordingTracker()
    second = train_ranker(pipeline(synthetic_features, str(tmp_path / "match"), train={"epochs": 1}),
                          tmp_path / "out", tracker)
    assert [s for k, _, s in tracker.metrics if k == "train_loss"] == [1]  # trained, not resumed
    assert second["auc"] != first["auc"]


def test_early_stopping_stops(synthetic_features, tmp_path):
    tracker = RecordingTracker()
    m = train_ranker(pipeline(synthetic_features, train={"epochs": 6, "patience": 1, "min_delta": 1.0}),
                     tmp_path / "es", tracker)
    assert m["stopped_early"] and m["epochs_run"] == 2 and m["best_epoch"] == 1
    steps = sorted({s for k, _, s in tracker.metrics if k == "valid_gauc"})
    assert steps == [1, 2]
    assert {"train_loss", "train_click_loss", "train_lt_loss", "valid_auc", "valid_gauc"} <= {k for k, _, _ in tracker.metrics}
    assert {"test_auc", "test_gauc"} <= {k for k, _, s in tracker.metrics if s is None}
    assert any(p.endswith("metrics.json") for p, _ in tracker.artifacts)


def test_cli_rank_train_and_exit_codes(synthetic_features, tmp_path):
    import argparse

    import yaml

    from recsys.cli import rank

    cfg = {"seed": 0, "paths": {"features": str(synthetic_features)},
           "ranker": {"embedding_dim": 8, "svd_rank": 4, "history_encoder": "mean"},
           "train": {"epochs": 1, "progress": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # register() on our own parser (the lead wires it into `recsys`)
    parser = argparse.ArgumentParser()
    rank.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rank", "train", "--config", str(path), "--out", str(tmp_path / "o1")])
    assert args.handler(args) == 0
    assert (tmp_path / "o1" / "metrics.json").exists() and (tmp_path / "o1" / "predictions.parquet").exists()
    manifest = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert manifest["job"] == "rank.train" and "predictions.parquet" in manifest["outputs"]
    # the same config, inputs and code: the rerun is skipped (the manifest key decides)
    before = (tmp_path / "o1" / "predictions.parquet").stat().st_mtime_ns
    assert args.handler(args) == 0
    assert (tmp_path / "o1" / "predictions.parquet").stat().st_mtime_ns == before
    # main(): exit 2 on an impossible config, 1 on missing data
    bad = dict(cfg, ranker={"embedding_dim": 8, "svd_rank": 16, "history_encoder": "svd_compact"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert rank.main(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o2")]) == 2
    missing = dict(cfg, paths={"features": str(tmp_path / "nowhere")})
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    assert rank.main(["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o3")]) == 2


@pytest.mark.parametrize(
    "kw, match",
    [({"epochs": 0}, "epochs"), ({"optimizer": "lbfgs"}, "optimizer"), ({"lr": 0}, "lr"),
     ({"patience": -1}, "patience"), ({"device": "tpu"}, "device")],
)
def test_train_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, kw, where="train")


def test_bench_quick(tmp_path):
    from recsys.bench import ranker as bench

    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "ranker.json").read_text())
    rows = payload["rows"]
    assert {r["encoder"] for r in rows} == {"mean", "reference", "truncated", "compact"}
    for r in rows:
        assert {"L", "C", "encoder", "samples_per_s", "peak_mb"} <= set(r)
        assert r["samples_per_s"] > 0


def test_results_pair_is_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing the new pair leaves the previous predictions and
    metrics exactly as they were, and no temp file behind."""
    from recsys.train.evaluate import write_results

    old = pl.DataFrame({"a": [1]})
    write_results(tmp_path, old, {k: 0.5 for k in CONTRACT_KEYS}, RecordingTracker())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"predictions.parquet", "metrics.json"}

    def broken(self, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError):
        write_results(tmp_path, pl.DataFrame({"a": [2]}), {k: 0.9 for k in CONTRACT_KEYS}, RecordingTracker())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before



def test_leave_last_out_stops_on_valid_auc(tmp_path):
    """Found by a probe (2026-11-30): one valid impression per user leaves
    valid GAUC n/a on every epoch, so early stopping never chose a model, no
    best.pt was written and the ranker was not registered."""
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig

    feats = tmp_path / "features"
    build_features(FeaturesConfig(source="synthetic", split="leave_last_out",
                                  synthetic=SyntheticConfig(users=150, items=240, max_events=80, seed=0)),
                   feats, log=lambda _m: None)
    m = train_ranker(pipeline(feats, train={"epochs": 6, "patience": 1, "min_delta": 1.0}), tmp_path / "r")
    assert m["early_stop_metric"] == "auc" and m["stopped_early"] and m["epochs_run"] == 2 and m["best_epoch"] == 1
    assert (tmp_path / "r" / "checkpoints" / "best.pt").is_file()


def test_without_a_valid_score_the_last_epoch_is_kept(synthetic_features, tmp_path, monkeypatch):
    from recsys.train import loop

    real = loop.evaluate_predictions

    def no_score(pred):
        out = real(pred)
        return out | {"auc": float("nan"), "gauc": float("nan")}

    monkeypatch.setattr(loop, "evaluate_predictions", no_score)
    m = train_ranker(pipeline(synthetic_features, train={"epochs": 3, "patience": 1}), tmp_path / "r")
    assert m["early_stop_metric"] is None and not m["stopped_early"]
    assert m["epochs_run"] == m["best_epoch"] == 3
    assert (tmp_path / "r" / "checkpoints" / "best.pt").is_file()  # the scorer and the MLflow model read it


def test_a_folder_whose_best_checkpoint_another_run_replaced_is_retrained(synthetic_features, tmp_path):
    """A probe (2026-12-01): a run of another config into the same --out,
    interrupted, replaced checkpoints/best.pt and left the outputs; the rerun
    of the first config then reused its outputs and registered (and served)
    the other run's model beside them."""
    import shutil

    from recsys.stages import run_rank

    a, b = pipeline(synthetic_features, train={"epochs": 1}), pipeline(synthetic_features, train={"epochs": 1}, seed=3)
    said: list[str] = []
    assert not run_rank(a, None, tmp_path / "a", log=said.append).reused
    assert run_rank(a, None, tmp_path / "a", log=said.append).reused
    run_rank(b, None, tmp_path / "b", log=said.append)
    best = tmp_path / "a" / "checkpoints" / "best.pt"
    own = file_fingerprint(best)
    shutil.copyfile(tmp_path / "b" / "checkpoints" / "best.pt", best)
    said.clear()
    assert not run_rank(a, None, tmp_path / "a", log=said.append).reused
    assert any("is no longer the model of" in m for m in said), said
    # trained afresh: a probe (2026-12-01) found it "resumed" from last.pt, already at train.epochs, trained
    # nothing and evaluated (and recorded) the foreign best.pt
    assert file_fingerprint(best) == own
    assert run_rank(a, None, tmp_path / "a", log=said.append).reused  # retrained: its own model again
    best.unlink()  # a failed run of another config removes it
    assert not run_rank(a, None, tmp_path / "a", log=said.append).reused
    metrics = tmp_path / "a" / "metrics.json"  # a side file the manifest fingerprints (a probe, 2026-12-01:
    metrics.unlink()  # a deleted one stayed missing after a "reused" rerun)
    assert not run_rank(a, None, tmp_path / "a", log=said.append).reused and metrics.is_file()
    assert run_rank(a, None, tmp_path / "a", log=said.append).reused


def test_checkpoint_dir_holds_the_model_the_stage_records_and_exports(synthetic_features, tmp_path):
    """A probe (2026-12-01): with train.checkpoint_dir set, the manifest and
    the registered model took OUT/checkpoints/best.pt, a stale file of an
    earlier run (or none)."""
    import shutil

    from recsys.serving.ranker import RankerScorer, export_ranker
    from recsys.serving import requests_from_features
    from recsys.stages import run_rank

    out, ck = tmp_path / "r", tmp_path / "ck"
    stale = pipeline(synthetic_features, train={"epochs": 1}, seed=3)
    run_rank(stale, None, out, log=lambda _m: None)  # leaves OUT/checkpoints/best.pt of another model
    job = pipeline(synthetic_features, train={"epochs": 1, "checkpoint_dir": str(ck)})
    assert not run_rank(job, None, out, log=lambda _m: None).reused
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["best_checkpoint"] == file_fingerprint(ck / "best.pt")
    scorer = RankerScorer.load(export_ranker(job, out, tmp_path / "bundle"))
    got = scorer.score(requests_from_features(synthetic_features, "test"))
    want = pl.read_parquet(out / "predictions.parquet")
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-6)
    shutil.rmtree(ck)  # its best.pt gone: the outputs are not reused
    assert not run_rank(job, None, out, log=lambda _m: None).reused


def test_outputs_that_recorded_no_best_checkpoint_register_no_model(synthetic_features, tmp_path, monkeypatch):
    """A probe (2026-12-01): a single-process best.pt copied beside a
    distributed run's outputs (which record none) was registered on reuse."""
    import recsys.tracking.models as models
    from recsys.stages import _register_ranker, run_rank

    job = pipeline(synthetic_features, train={"epochs": 1})
    res = run_rank(job, None, tmp_path / "r", log=lambda _m: None)
    registered: list = []
    monkeypatch.setattr(models, "log_ranker", lambda *a, **k: registered.append(a))
    said: list[str] = []
    _register_ranker(job, None, tmp_path / "r", res.key, said.append)
    assert len(registered) == 1  # its own model
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(manifest | {"best_checkpoint": None}))  # as torchrun's
    _register_ranker(job, None, tmp_path / "r", res.key, said.append)
    assert len(registered) == 1 and "recsys-ranker not registered" in said[-1]


def test_a_ranker_on_capped_histories_serves_its_own_predictions(tmp_path):
    """A probe (2026-12-01): with features.history_cap below a user's history,
    hist_len = min(events before, cap), and serving required hist_len ==
    len(history): registration failed ("request rows: hist_len disagrees")
    and no request could reproduce the job's scores (the activity features
    count every event, the encoders the last min(hist_len, cap))."""
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig
    from recsys.serving import requests_from_features
    from recsys.serving.ranker import RankerScorer, export_ranker

    feats = tmp_path / "features"
    build_features(FeaturesConfig(source="synthetic", history_cap=5,
                                  synthetic=SyntheticConfig(users=60, items=80, max_events=40, seed=1)),
                   feats, log=lambda _m: None)
    job = pipeline(feats, train={"epochs": 1})
    train_ranker(job, tmp_path / "r")
    bundle = export_ranker(job, tmp_path / "r", tmp_path / "bundle")
    # the window a serving state needs: the events the encoders read (a probe: the data cap alone was recorded)
    assert json.loads((bundle / "ranker.json").read_text())["serving_window"] == 5 < job.data.history_cap
    scorer = RankerScorer.load(bundle)
    req = requests_from_features(feats, "test")
    assert (req["history"].list.len() > req["hist_len"]).any()  # the cap bites
    got = scorer.score(req)
    want = pl.read_parquet(tmp_path / "r" / "predictions.parquet")
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["lt_score"].to_numpy(), want["lt_score"].to_numpy(), rtol=0, atol=1e-6)
    row = req.filter(pl.col("history").list.len() > 5).head(1)
    with pytest.raises(Exception, match="features.history_cap 5"):  # uncapped hist_len: not what training read
        scorer.score(row.with_columns(hist_len=pl.col("history").list.len().cast(pl.Int64)))
