"""Experiment specs: validation (exit 2 with a clear message), and the whole
chain on the debug config with a throwaway tracking store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from features.core.errors import ConfigError
from recsys.cli import main
from recsys.config import SECTIONS, PipelineConfig, field_docs
from recsys.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"


def _write(tmp_path: Path, spec: dict, baseline: dict | None = None) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    if baseline is not None:
        (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(baseline))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


GOOD = {
    "experiment": "t",
    "baseline": "configs/base.yaml",
    "arms": [{"name": "control", "delta": {}}, {"name": "b", "delta": {"ranker": {"history_encoder": "svd_compact"}}}],
}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s.update(arms=s["arms"] + [{"name": "b"}]), "duplicate arm name(s) ['b']"),
        (lambda s: s.pop("baseline"), "missing required key 'baseline'"),
        (lambda s: s.update(baseline="configs/nope.yaml"), "baseline 'configs/nope.yaml' not found"),
        (lambda s: s.update(armz=[]), "unknown key 'armz' (did you mean 'arms'?)"),
        (lambda s: s.update(seeds="zero"), "seeds: expected a list"),
        (lambda s: s.update(control="ctrl"), "arm 'ctrl' is not among the arms"),
        (lambda s: s["arms"][1]["delta"].update(ranker={"history_encoder": "lstm"}), "history_encoder: expected one of"),
        (lambda s: s["arms"][1]["delta"].update(ranker={"history_encoder": "svd_compact", "svd_rank": 64, "embedding_dim": 16}), "svd_rank must satisfy"),
        (lambda s: s["arms"][1]["delta"].update(rankr={}), "unknown section 'rankr' (did you mean 'ranker'?)"),
        (lambda s: s["arms"][1].update(model="xgboost"), "expected one of ['ranker', 'lightgbm']"),
        (lambda s: s.update(metrics=["auc", "ndcg"]), "unknown metric(s) ['ndcg']"),
        # accepted before 2026-11-30, each giving an empty, doubled or silently unchanged comparison
        (lambda s: s.update(metrics=[]), "at least one metric is needed"),
        (lambda s: s.update(metrics=["auc", "auc", "logloss"]), "metric(s) ['auc'] repeated"),
        (lambda s: s.update(arms=s["arms"][:1]), "needs a treatment arm beside the control"),
        (lambda s: s.update(seeds=[0, 2**32]), "seeds must be integers in 0..2**32-1"),
        (lambda s: s["arms"][1]["delta"].update(train={"seed": 3}), "delta key 'train.seed' cannot take effect: the experiment's `seeds`"),
        (lambda s: s["arms"][1]["delta"].update(seed=7), "delta key 'seed' cannot take effect"),
        (lambda s: s["arms"][1].update(model="lightgbm"), "delta key 'ranker.history_encoder' cannot take effect: a lightgbm arm"),
        (lambda s: s["arms"][1]["delta"].update(lightgbm={"num_leaves": 4}), "'lightgbm.num_leaves' cannot take effect: a ranker arm"),
        (lambda s: s["arms"][1]["delta"].update(distill={"epochs": 2}), "'distill.epochs' cannot take effect: a ranker arm with this config"),
        (lambda s: s["arms"][1]["delta"].update(tracking={"reuse": False}), "arm 'b' changes `tracking`"),
        # before 2026-12-01 it rebuilt the arm's inputs under the new root but wrote its outputs under the old one
        (lambda s: s["arms"][1]["delta"].update(paths={"root": "elsewhere"}), "arm 'b' changes `paths.root`"),
        # accepted before (a probe, 2026-12-01, second round): each arm equalled its control, read as "no effect"
        (lambda s: s["arms"][1].update(delta={"ranker": {"history_mean": True}}),
         "'ranker.history_mean' cannot take effect: it is not read when ranker.history_encoder is mean"),
        (lambda s: s["arms"][1].update(delta={"ranker": {"svd_rank": 4}}), "'ranker.svd_rank' cannot take effect"),
        (lambda s: s["arms"][1]["delta"].update(ranker={"history_encoder": "svd_truncated", "svd_normalize_tokens": False}),
         "'ranker.svd_normalize_tokens' cannot take effect: it is not read when ranker.history_encoder is not svd_compact"),
        (lambda s: s["arms"][1]["delta"].update(ranker={"history_encoder": "svd_compact", "dcn_layers": 5}),
         "'ranker.dcn_layers' cannot take effect: it is not read when ranker.over_arch is not dcn"),
        (lambda s: s["arms"][1]["delta"].update(data={"match_columns": ["mf_cos_mean"]}),
         "'data.match_columns' cannot take effect: it is not read when data.use_match_features is false"),
        (lambda s: s["arms"][1].update(model="lightgbm", delta={"lightgbm": {"bagging_fraction": 0.5, "bagging_freq": 0}}),
         "'lightgbm.bagging_fraction' cannot take effect: it is not read when lightgbm.bagging_freq is 0"),
        (lambda s: s.update(experiment="t\n"), "name 't\\n' may only hold"),
        (lambda s: s["arms"][1].update(model="lightgbm", delta={"lightgbm": {"bagging_fraction": 1.0, "bagging_freq": 3}}),
         "'lightgbm.bagging_freq' cannot take effect: it is not read when lightgbm.bagging_fraction is 1"),
        (lambda s: s["arms"][1]["delta"].update(distill={"geo_temperature": 0.5}, data={"use_match_features": True}),
         "'distill.geo_temperature' cannot take effect: it is not read when distill.w_geo is 0"),
        (lambda s: s["arms"][1]["delta"].update(distill={"use_id2i": False}, teachers={"id2item": {"lr": 0.1}},
                                                 data={"use_match_features": True}),
         "'teachers.id2item.lr' cannot take effect: it is not read when distill.use_id2i is false"),
        (lambda s: s["arms"][1]["delta"].update(teachers={"seq2item": {"n_heads": 4}}, data={"use_match_features": True}),
         "'teachers.seq2item.n_heads' cannot take effect: it is not read when teachers.seq2item.encoder is mean"),
        (lambda s: s["arms"][1]["delta"].update(ranker={"history_encoder": "svd_compact"}, paths={"embeddings": "nope.parquet"},
                                                 data={"use_match_features": True}),
         "arm 'b': paths.embeddings: nope.parquet does not exist"),
    ],
)
def test_bad_experiment_files_exit_2(tmp_path, capsys, mutate, needle):
    spec = json.loads(json.dumps(GOOD))
    mutate(spec)
    path = _write(tmp_path, spec, baseline={"seed": 0})
    assert main(["experiment", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert str(path) in err or "exp.yaml" in err


def test_duplicate_yaml_keys_in_an_experiment_exit_2(tmp_path, capsys):
    _write(tmp_path, GOOD, baseline={"seed": 0})
    (tmp_path / "exp.yaml").write_text("experiment: t\nbaseline: configs/base.yaml\nexperiment: u\narms: []\n")
    assert main(["experiment", "run", str(tmp_path / "exp.yaml")]) == 2
    assert "duplicate key 'experiment'" in capsys.readouterr().err


def test_arms_that_differ_in_nothing_are_found():
    """A probe (2026-12-01): a delta restating the baseline trained a copy of
    the control and reported +0.0000 [+0.0000, +0.0000] without a word."""
    import tempfile

    from recsys.experiment import identical_arms

    with tempfile.TemporaryDirectory() as tmp:
        spec = json.loads(json.dumps(GOOD))
        spec["arms"] += [{"name": "c", "delta": {"train": {"epochs": 1}}},  # the baseline's value
                         {"name": "d", "delta": {"name": "renamed"}},
                         {"name": "e", "model": "lightgbm", "delta": {}},  # same config, another model
                         {"name": "f", "delta": {"ranker": {"history_encoder": "svd_compact"}}}]
        path = _write(Path(tmp), spec, baseline={"seed": 0, "train": {"epochs": 1}})
        assert identical_arms(load_experiment(path)) == [("control", "c"), ("control", "d"), ("b", "f")]


def test_an_empty_section_in_a_delta_keeps_the_baseline(tmp_path):
    """`train:` with every key commented out parses as null: it replaced the
    baseline's whole section with the defaults before 2026-11-30 (epochs 1 -> 6)."""
    spec = json.loads(json.dumps(GOOD))
    spec["arms"][1]["delta"].update(train=None, features=None)
    path = _write(tmp_path, spec, baseline={"seed": 0, "train": {"epochs": 1}, "features": {"source": "synthetic"}})
    cfg = load_experiment(path).arm_configs["b"]
    assert cfg.train.epochs == 1 and cfg.features.source == "synthetic" and cfg.ranker.history_encoder == "svd_compact"


def test_a_home_relative_baseline_is_read_from_the_home_folder(tmp_path, monkeypatch):
    """A probe (2026-12-01): `baseline: ~/b.yaml` was looked for in a folder
    named `~` beside the experiment file."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "b.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    path = _write(tmp_path, {**GOOD, "baseline": "~/b.yaml"})
    loaded = load_experiment(path)
    assert loaded.baseline_path == tmp_path / "home" / "b.yaml" and loaded.arm_configs["b"].train.epochs == 1


def test_shipped_experiments_validate():
    for name in ("ab_match_features.yaml", "debug_ab.yaml", "ab_match_features_ml1m.yaml"):
        exp = load_experiment(EXPERIMENTS / name)
        assert [a.name for a in exp.spec.arms][:1] == ["control"]
    arms = {a.name: a for a in load_experiment(EXPERIMENTS / "ab_match_features.yaml").spec.arms}
    assert set(arms) == {"control", "match", "match_svd", "lightgbm"}
    exp = load_experiment(EXPERIMENTS / "ab_match_features.yaml")
    assert exp.arm_configs["control"].data.use_match_features is False
    assert exp.arm_configs["control"].ranker.history_encoder == "mean"
    assert exp.arm_configs["match_svd"].ranker.history_encoder == "svd_compact"
    assert exp.arm_configs["match_svd"].data.use_match_features is True
    assert arms["lightgbm"].model == "lightgbm"


def test_base_yaml_has_every_key_annotated():
    """base.yaml lists every key of every section, each with `# type: meaning`."""
    text = (EXPERIMENTS / "configs" / "base.yaml").read_text()
    data = yaml.safe_load(text)
    PipelineConfig.from_mapping(data)  # valid

    def keys(cls, prefix=""):
        import dataclasses

        for f in dataclasses.fields(cls):
            t = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(t):
                yield from keys(type(t), prefix + f.name + ".")
            else:
                yield prefix + f.name

    def has(d, dotted):
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return False
            d = d[part]
        return True

    for section in SECTIONS:
        cls = type(getattr(PipelineConfig(), section))
        missing = [k for k in keys(cls) if not has(data.get(section, {}), k)]
        assert not missing, f"base.yaml lacks {section}: {missing}"
        undocumented = [f for f in __import__("dataclasses").fields(cls) if f.name not in field_docs(cls)]
        assert not undocumented, f"{section}: fields without an inline comment: {[f.name for f in undocumented]}"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line and not line.rstrip().endswith(":"):
            assert "  # " in line, f"key without annotation: {line!r}"


@pytest.mark.slow
def test_debug_chain_end_to_end_with_throwaway_store(tmp_path, monkeypatch, capsys):
    """The whole chain on debug.yaml: run, rerun (reused), compare in every format."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    shutil.copytree(EXPERIMENTS, tmp_path / "experiments")
    # a repository as working directory: reuse must not depend on it (it keys on the plugin's code)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / ".gitignore").write_text("artifacts/\nstore/\n")
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "experiments"], check=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert main(["experiment", "run", "experiments/debug_ab.yaml", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "match_svd" in out.out and "95% CI" in out.out
    # the store comes from MLFLOW_TRACKING_URI, not the baseline: the hint needs no --config
    assert "compare again: recsys experiment compare debug_ab    open the UI: recsys ui\n" in out.out
    assert "seed: 0" not in out.err.splitlines()[:1]  # the experiment's seeds name themselves
    for arm in ("control", "match", "match_svd", "lightgbm"):
        folder = tmp_path / "artifacts" / "debug" / "experiments" / "debug_ab" / arm / "seed0"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert {"auc", "gauc", "logloss", "lt_auc", "lt_spearman"} <= set(metrics)
    # distilled embeddings and match features were produced for the match arms
    assert (tmp_path / "artifacts" / "debug" / "distill" / "item_embeddings.parquet").is_file()
    assert (tmp_path / "artifacts" / "debug" / "match" / "match_features.parquet").is_file()

    assert main(["experiment", "run", "experiments/debug_ab.yaml", "--quiet"]) == 0
    rerun = capsys.readouterr()
    assert "rank: outputs up to date" in rerun.out + rerun.err

    assert main(["experiment", "compare", "debug_ab", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["arm"], r["metric"]) for r in rows} >= {(a, "gauc") for a in ("control", "match", "match_svd", "lightgbm")}
    for r in rows:
        assert {"arm", "metric", "value", "delta", "ci_low", "ci_high", "segment", "sig_holm", "p_value"} <= set(r)
        if r["segment"] == "all" and r["arm"] != "control" and r["delta"] is not None:
            assert r["ci_low"] <= r["delta"] <= r["ci_high"]
            assert not r["sig_holm"] or r["ci_low"] > 0 or r["ci_high"] < 0 or r["p_value"] < 0.05
    segs = {r["segment"] for r in rows}
    assert {"all", "cold_item", "warm_item", "new_user", "returning_user"} <= segs, segs
    assert any(s.startswith("hist_len ") for s in segs)
    assert main(["experiment", "compare", "debug_ab", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| metric |")
    assert main(["experiment", "compare", "nope"]) == 2
    assert "no finished run of experiment 'nope'" in capsys.readouterr().err
    assert main(["experiment", "compare", "debug_ab", "--fail-on-regression", "bogus"]) == 2


def test_fail_on_regression_exit_status(monkeypatch, capsys):
    import numpy as np
    import polars as pl

    import recsys.experiment_run as P
    from recsys.compare import ArmPredictions

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(80), 5)
    y = rng.integers(0, 2, len(users))

    def frame(score):
        return pl.DataFrame({"user_id": users, "item_id": np.arange(len(users)), "timestamp": np.zeros(len(users), int),
                             "label": y, "score": score, "lt_score": score, "returned_1d": y, "active_days_7": y,
                             "lt_observed": np.ones(len(users), bool)})

    good = 1 / (1 + np.exp(-(y + 0.3 * rng.normal(size=len(y)))))
    bad = rng.random(len(y))
    preds = [ArmPredictions("control", 0, frame(good)), ArmPredictions("worse", 0, frame(bad))]
    parent = {"run_id": "x", "tags": {"control": "control"}, "params": {}}
    monkeypatch.setattr(P, "load_experiment_predictions", lambda _cfg, _name: (preds, parent))
    monkeypatch.setattr(P, "_parent_spec", lambda _cfg, _parent: {"n_boot": 200, "metrics": ["auc", "gauc"]})
    assert main(["experiment", "compare", "x"]) == 0
    assert main(["experiment", "compare", "x", "--fail-on-regression", "auc"]) == 1
    assert "regression on auc: worse" in capsys.readouterr().err
    # a gate on a metric outside the experiment's list is computed, not passed unseen
    assert main(["experiment", "compare", "x", "--fail-on-regression", "logloss"]) == 1
    assert "regression on logloss: worse" in capsys.readouterr().err
    preds.reverse()
    preds[:] = [ArmPredictions("control", 0, frame(good)), ArmPredictions("same", 0, frame(good))]
    assert main(["experiment", "compare", "x", "--fail-on-regression", "auc"]) == 0


def test_compare_on_a_missing_sqlite_store_creates_nothing(tmp_path, monkeypatch, capsys):
    """A mistyped tracking URI made `compare` create an empty store before saying "no finished run" (2026-11-30)."""
    db = tmp_path / "typo.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert main(["experiment", "compare", "debug_ab"]) == 2
    assert "does not exist" in capsys.readouterr().err and not db.exists()


def test_distill_keys_count_where_out_of_fold_match_features_train_students(tmp_path):
    """match.folds >= 2 trains a student per fold even when paths.embeddings names a file: a distill key is read there."""
    spec = json.loads(json.dumps(GOOD))
    spec["arms"][1]["delta"] = {"data": {"use_match_features": True}, "match": {"folds": 2}, "distill": {"epochs": 2}}
    path = _write(tmp_path, spec, baseline={"seed": 0, "paths": {"embeddings": "emb.parquet"}})
    assert load_experiment(path).arm_configs["b"].distill.epochs == 2
    spec["arms"][1]["delta"]["match"] = {"folds": 0}  # in-sample: the file's embeddings, no student
    path = _write(tmp_path, spec, baseline={"seed": 0, "paths": {"embeddings": "emb.parquet"}})
    with pytest.raises(ConfigError, match="'distill.epochs' cannot take effect"):
        load_experiment(path)


def test_the_compare_again_hint_names_the_baseline_whenever_its_tracking_differs(tmp_path):
    """A probe (2026-12-01): a baseline naming its own MLflow experiment got a
    hint without --config, which compared an older run of the same name."""
    from recsys.experiment_run import store_flag
    from recsys.tracking.config import TrackingConfig

    base = tmp_path / "my configs" / "base.yaml"
    assert store_flag(TrackingConfig(), base) == ""
    assert store_flag(TrackingConfig(reuse=False, enabled=True), base) == ""
    for changed in (TrackingConfig(experiment="abtests"), TrackingConfig(uri="sqlite:///x.db"),
                    TrackingConfig(artifact_root="/tmp/a")):
        assert store_flag(changed, base) == f" --config '{base}'"


def test_yaml_off_read_as_false_gets_a_hint(tmp_path, capsys):
    path = _write(tmp_path, GOOD, baseline={"seed": 0})
    (tmp_path / "configs" / "base.yaml").write_text("seed: 0\nranker:\n  use_distilled_embeddings: off\n")
    assert main(["experiment", "run", str(path)]) == 2
    assert "YAML reads an unquoted off as false: quote it, 'off'" in capsys.readouterr().err


def test_a_setting_an_arm_never_reads_needs_no_change_when_another_key_does(tmp_path):
    """A verification probe (2026-12-01): refusing svd_rank on a mean arm made
    an embedding_dim below the baseline's svd_rank impossible to test (the
    config check wanted svd_rank <= embedding_dim); the same held for the
    mean sequence teacher's n_heads."""
    from recsys.experiment import load_experiment

    spec = json.loads(json.dumps(GOOD))
    spec["arms"][1]["delta"] = {"ranker": {"embedding_dim": 4}}
    spec["arms"].append({"name": "c", "delta": {"teachers": {"seq2item": {"dim": 63}}, "data": {"use_match_features": True}}})
    exp = load_experiment(_write(tmp_path, spec, baseline={"seed": 0, "ranker": {"svd_rank": 8}}))
    assert exp.arm_configs["b"].ranker.embedding_dim == 4 and exp.arm_configs["c"].teachers.seq2item.dim == 63


def test_an_untracked_run_prints_no_compare_hint(tmp_path, capsys, monkeypatch):
    """A verification probe (2026-12-01): with tracking.enabled false the run
    printed `compare again: ...`, which then showed an older, tracked run."""
    from recsys import experiment_run
    from recsys.experiment_run import ExperimentOutcome

    monkeypatch.setattr(experiment_run, "run_experiment",
                        lambda *a, **k: ExperimentOutcome("t", "control", [], {}, 1.0, "", False))
    assert main(["experiment", "run", str(tmp_path / "x.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tracking is off" in out and "compare again" not in out
