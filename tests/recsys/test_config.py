"""The pipeline config is read once, strictly, and each stage's rules are
applied once, by its planner (recsys.plan)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from features.core.errors import ConfigError, UsageError
from recsys.config import RENAMED, PipelineConfig, load_pipeline_config
from recsys.plan import check_inputs, plan_distill, plan_lightgbm, plan_match, plan_rank

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_base_yaml_equals_the_defaults():
    """Single source of truth: the dataclass defaults; base.yaml is their dump."""
    base = load_pipeline_config(EXPERIMENTS / "configs" / "base.yaml")
    assert base == dataclasses.replace(PipelineConfig(), name="ml100k-base")


def test_config_modules_import_no_heavy_library():
    """Loading and planning a config imports neither torch nor the model libraries."""
    code = ("import sys, recsys.config, recsys.plan, distill.config;"
            "recsys.plan.plan_rank(recsys.config.load_pipeline_config(None));"
            "print(','.join(m for m in ('torch', 'torchrec', 'lightgbm', 'mlflow', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_a_moved_key_is_refused_with_its_new_place(old):
    *parents, leaf = old.split(".")
    data: dict = {leaf: 1}
    for p in reversed(parents):
        data = {p: data}
    with pytest.raises(ConfigError, match=f"{old}: this key was renamed {RENAMED[old]}"):
        PipelineConfig.from_mapping(data)


def test_none_is_no_longer_a_match_switch():
    with pytest.raises(ConfigError, match="data.use_match_features: false"):
        PipelineConfig.from_mapping({"paths": {"match_features": "none"}})


def test_unknown_section_and_key_name_the_place():
    with pytest.raises(ConfigError, match="unknown section 'rankr'.*did you mean 'ranker'"):
        PipelineConfig.from_mapping({"rankr": {}})
    with pytest.raises(ConfigError, match="an A/B experiment file, not a pipeline config.*pass its baseline, 'configs/b.yaml'"):
        PipelineConfig.from_mapping({"experiment": "x", "baseline": "configs/b.yaml", "arms": []})
    with pytest.raises(ConfigError, match=r"config.data: unknown key 'history'"):
        PipelineConfig.from_mapping({"data": {"history": 3}})
    with pytest.raises(ConfigError, match=r"ranker.history_encoder: expected one of"):
        PipelineConfig.from_mapping({"ranker": {"history_encoder": "svd"}})


def test_the_config_is_frozen_and_hashable():
    cfg = PipelineConfig.from_mapping({"seed": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 5  # type: ignore[misc]
    assert hash(plan_rank(cfg)) == hash(plan_rank(cfg))
    assert cfg.hash == PipelineConfig.from_mapping({"seed": 4}).hash != PipelineConfig().hash
    json.dumps(cfg.to_dict())


def test_seed_rules_are_applied_by_the_planners():
    cfg = PipelineConfig.from_mapping({"seed": 7, "teachers": {"seed": 2}})
    d = plan_distill(cfg)
    assert (d.teachers.seed, d.distill.seed) == (2, 7)
    assert plan_rank(cfg).seed == plan_rank(cfg).train.seed == 7
    assert plan_lightgbm(cfg).config.seed == 7
    # the experiment runner's per-seed override wins over both
    assert plan_rank(cfg, seed=3).train.seed == plan_lightgbm(cfg, seed=3).config.seed == 3
    fixed = PipelineConfig.from_mapping({"seed": 7, "train": {"seed": 1}})
    assert plan_rank(fixed).seed == 1


def test_match_features_are_decided_by_one_key_per_model():
    off = PipelineConfig.from_mapping({"paths": {"root": "r"}})
    on = PipelineConfig.from_mapping({"paths": {"root": "r"}, "data": {"use_match_features": True}})
    assert plan_rank(off).match is None
    assert plan_rank(on).match == Path("r/match")
    assert plan_rank(on, match="elsewhere").match == Path("elsewhere")
    assert plan_rank(off, match="elsewhere").match is None  # not asked for: never read
    assert plan_lightgbm(off).match == Path("r/match")  # lightgbm.use_match_features defaults to true
    no_lgb = PipelineConfig.from_mapping({"lightgbm": {"use_match_features": False}})
    assert plan_lightgbm(no_lgb).match is None
    assert plan_rank(PipelineConfig.from_mapping({"ranker": {"use_distilled_embeddings": "init"}})).embeddings \
        == Path("artifacts/ml100k/distill/item_embeddings.parquet")
    assert plan_match(on).embeddings == Path("r/distill/item_embeddings.parquet")


def test_requested_inputs_that_are_missing_exit_2(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    cfg = PipelineConfig.from_mapping({"paths": {"features": str(features), "match_features": str(tmp_path / "m")},
                                       "data": {"use_match_features": True}})
    with pytest.raises(UsageError, match="not a features folder"):
        check_inputs(plan_rank(cfg))
    (features / "interactions.parquet").write_bytes(b"")
    with pytest.raises(UsageError, match=r"paths.match_features: .*m does not exist.*data.use_match_features: false"):
        check_inputs(plan_rank(cfg))
    with pytest.raises(UsageError, match="lightgbm.use_match_features: false"):
        check_inputs(plan_lightgbm(cfg))


def test_an_experiment_seed_reruns_the_whole_chain():
    """The per-seed override reaches every seeded stage of an arm: teachers,
    student, match k-means and the model; the features have no seed."""
    cfg = PipelineConfig.from_mapping({"seed": 0, "teachers": {"seed": 5}, "match": {"seed": 9}})
    d = plan_distill(cfg, seed=3)
    assert (d.teachers.seed, d.distill.seed) == (3, 3)
    assert plan_match(cfg, seed=3).config.seed == 3 and plan_match(cfg).config.seed == 9
    assert plan_rank(cfg, seed=3).seed == plan_lightgbm(cfg, seed=3).config.seed == 3
    assert plan_distill(cfg, seed=3) != plan_distill(cfg, seed=4)  # distinct jobs: distinct folders


def test_config_faults_found_by_a_probe_exit_2(tmp_path, capsys):
    """Each of these exited 0 with a setting ignored or mis-read, or crashed
    late, before 2026-11-30."""
    from recsys.cli import main

    cases = {
        "dup.json": ('{"train": {"epochs": 2, "epochs": 3}}', "duplicate key 'epochs'"),
        "seed.yaml": ("train:\n  seed: -5\n", "train.seed: a seed must be an integer in 0..2**32-1"),
        "bigseed.yaml": ("seed: 4294967296\n", "seed: a seed must be an integer in 0..2**32-1"),
        "enc.yaml": ("ranker:\n  history_encoder: [mean]\n", "history_encoder"),
        "octal.yaml": ("train:\n  epochs: 010\n", "number '010' at line 2: YAML reads it as 8"),
        "base60.yaml": ("train:\n  epochs: 2:00\n", "YAML reads it as 120"),
        "listkey.yaml": ("[a, b]: 1\n", "keys must be plain names"),
        "files.yaml": ("features:\n  source: synthetic\n  interactions: /nonexistent/events.csv\n",
                       "interactions applies to the files source only"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["config", "show", "--config", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (name, err)
    assert main(["config", "show", "--config", ""]) == 2
    assert "config file '': empty path" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["run #2", "yes", "123", "a: b"])
def test_config_show_quotes_the_name_so_its_output_reads_back(tmp_path, capsys, name):
    from recsys.cli import main

    (tmp_path / "c.yaml").write_text(json.dumps({"name": name}))
    assert main(["config", "show", "--config", str(tmp_path / "c.yaml")]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    assert load_pipeline_config(shown).name == name


def test_yaml_merge_keys_are_read(tmp_path):
    """`<<: *anchor` is valid YAML; the duplicate-key check refused it before 2026-11-30."""
    (tmp_path / "m.yaml").write_text("ranker: {<<: {embedding_dim: 8, svd_rank: 4}, svd_rank: 2}\n")
    cfg = load_pipeline_config(tmp_path / "m.yaml")
    assert (cfg.ranker.embedding_dim, cfg.ranker.svd_rank) == (8, 2)


def test_match_missing_items_takes_yaml_null_as_documented(tmp_path):
    """`match.missing_items: null`, as the help writes it, is YAML's null: it was refused before 2026-11-30."""
    (tmp_path / "c.yaml").write_text("match:\n  missing_items: null\n")
    assert load_pipeline_config(tmp_path / "c.yaml").match.missing_items == "null"
    assert PipelineConfig.from_mapping({"match": {"missing_items": "null"}}).match.missing_items == "null"


@pytest.mark.parametrize(("section", "key", "value", "needle"), [
    ("train", "sparse_lr", -0.1, "sparse_lr must be > 0, got -0.1"),
    ("train", "eval_batch_size", 0, "eval_batch_size must be >= 1, got 0"),
    ("lightgbm", "early_stopping_rounds", 0, "early_stopping_rounds must be >= 1, got 0"),
    ("lightgbm", "lambda_l2", -1.0, "lambda_l2 must be >= 0, got -1.0"),
    ("lightgbm", "bagging_fraction", 1.5, "bagging_fraction must be in (0, 1], got 1.5"),
])
def test_a_range_error_names_its_key_and_value(tmp_path, section, key, value, needle):
    # the messages once named every key of a group ("lr and sparse_lr must be > 0") and no value
    from features.core.errors import ConfigError

    path = tmp_path / "cfg.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_pipeline_config(path)


def test_the_rank_key_holds_the_world_size(monkeypatch):
    # a torchrun run writes per-rank checkpoints and other numbers: a single-process run
    # into the same --out reused it (reporting world_size 2, registering no model)
    from recsys.stages import rank_key

    job = plan_rank(PipelineConfig())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = rank_key(job)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_key(job)["params_hash"] != single["params_hash"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_key(job) == single


def test_distill_configs_refuse_nan_and_name_the_key():
    # DistillConfig(lr=nan) passed (nan <= 0 is False) and failed in torch after the teachers trained
    from distill import DistillConfig
    from distill.config import ID2ItemConfig, Seq2ItemConfig

    for cls, key in ((DistillConfig, "lr"), (ID2ItemConfig, "lr"), (Seq2ItemConfig, "init_std")):
        with pytest.raises(ValueError, match=f"^{key} must be > 0, got nan$"):
            cls(**{key: float("nan")})


def test_config_paths_expand_home_and_refuse_environment_variables(monkeypatch, tmp_path):
    """A probe (2026-12-01): `train.checkpoint_dir: ~/ckpt` wrote into a folder
    named `~` in the working directory, `features.interactions: ~/x.csv` was
    "missing", and `${HOME}/runs` was taken literally."""
    from features.core.errors import ConfigError
    from recsys.config import PipelineConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = PipelineConfig.from_mapping({
        "features": {"source": "files", "interactions": "~/x.csv", "items": "~/items.csv"},
        "train": {"checkpoint_dir": "~/ck"}, "paths": {"root": "~/runs", "embeddings": "none"},
        "distill": {"cache_dir": "~/cache"},
    })
    assert cfg.features.interactions == str(tmp_path / "x.csv") and cfg.features.items == str(tmp_path / "items.csv")
    assert cfg.train.checkpoint_dir == str(tmp_path / "ck") and cfg.paths.root == str(tmp_path / "runs")
    assert cfg.distill.cache_dir == str(tmp_path / "cache") and cfg.paths.embeddings == "none"
    for key, section in (("root", "paths"), ("checkpoint_dir", "train")):
        with pytest.raises(ConfigError, match="environment variables are not expanded"):
            PipelineConfig.from_mapping({section: {key: "${HOME}/runs"}})
    for value in ("$HOME/runs", "/data/$USER/runs", "runs/${X}"):
        with pytest.raises(ConfigError, match="environment variables are not expanded"):
            PipelineConfig.from_mapping({"paths": {"root": value}})
    # a `$` inside a name is no variable (a probe: `a$bc` was refused)
    assert PipelineConfig.from_mapping({"paths": {"root": "runs/a$bc"}}).paths.root == "runs/a$bc"


def test_history_cap_beyond_int32_is_a_config_error():
    """A probe (2026-12-01): 2**31 passed and the build crashed converting hist_len to Int32."""
    from features.core.errors import ConfigError
    from recsys.config import PipelineConfig

    with pytest.raises(ConfigError, match="history_cap must be in 1..2147483647"):
        PipelineConfig.from_mapping({"features": {"history_cap": 2**31}})
    assert PipelineConfig.from_mapping({"features": {"history_cap": 2**31 - 1}}).features.history_cap == 2**31 - 1
    # a probe (2026-12-01): data.history_cap 2**63 crashed the ranker's data path; LightGBM
    # reads its integer keys as C ints (2**32 + 5 rows per leaf silently became 5)
    for section, key in (("data", "history_cap"), ("lightgbm", "min_child_samples"), ("lightgbm", "num_leaves")):
        with pytest.raises(ConfigError, match=f"{key} must be"):
            PipelineConfig.from_mapping({section: {key: 2**32 + 5}})
    assert PipelineConfig.from_mapping({"lightgbm": {"min_child_samples": 2**31 - 1}}).lightgbm.min_child_samples == 2**31 - 1


def test_tracking_store_paths_expand_home(monkeypatch, tmp_path):
    """A probe (2026-12-01): `sqlite:///~/s/mlflow.db` and `artifact_root: ~/a` made a folder named `~`."""
    from recsys.tracking.config import TrackingConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrackingConfig(uri="sqlite:///~/s/mlflow.db", artifact_root="~/a")
    assert cfg.uri == f"sqlite:///{tmp_path}/s/mlflow.db" and cfg.artifact_root == str(tmp_path / "a")
