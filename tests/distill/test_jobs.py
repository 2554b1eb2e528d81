"""End to end: the CLI contract on synthetic data, reuse of up-to-date
outputs, bad input, the planted-truth check, the import rule, the benchmark."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.distill.conftest import SMALL, run_cli
from tests.outputs import rewrite_output

MODELS_BOTH = ["content", "content_text", "popularity", "student", "two_tower", "student_no_s2i", "student_no_id2i", "student_no_i2i"]
MODELS_WARM = ["id_teacher", "seq_teacher", "student_known_items"]
ROOT = Path(__file__).resolve().parents[2]


def test_eval_writes_metrics_and_embeddings(syn_eval, synthetic_features):
    metrics = json.loads((syn_eval / "metrics.json").read_text())
    for key in ("recall@50_cold_student", "recall@50_cold_content", "recall@50_warm_student", "recall@50_warm_id_teacher"):
        assert isinstance(metrics[key], float)
    for k in (10, 50, 100):
        for m in MODELS_BOTH:
            assert {f"recall@{k}_warm_{m}", f"recall@{k}_cold_{m}", f"recall@{k}_all_{m}"} <= set(metrics), m
        for m in MODELS_WARM:
            assert f"recall@{k}_warm_{m}" in metrics and f"recall@{k}_cold_{m}" not in metrics
    for teacher in ("id_teacher", "seq_teacher"):
        for m in ("student", "student_no_s2i", "student_no_i2i", "content"):
            assert f"nmi_{m}_vs_{teacher}" in metrics
            assert f"kendall_tau_{m}_vs_{teacher}" in metrics
            assert f"topk_overlap_{m}_vs_{teacher}" in metrics
        assert f"bijective_acc_student_vs_{teacher}" in metrics
    reasons = metrics.pop("reasons")  # why each null metric is null
    assert all(v is None or np.isfinite(v) for v in metrics.values())
    assert set(reasons) == {k for k, v in metrics.items() if v is None}
    assert 0 <= metrics["recall@10_cold_student"] <= metrics["recall@50_cold_student"] <= metrics["recall@100_cold_student"] <= 1
    # the student learned something: well above a random ranking's 50/400
    assert metrics["recall@50_all_student"] > 1.6 * 50 / 400

    emb = pl.read_parquet(syn_eval / "item_embeddings.parquet")
    assert emb.schema == pl.Schema({"item_id": pl.Int64, "embedding": pl.List(pl.Float32)})
    items = pl.read_parquet(synthetic_features / "items.parquet")
    assert emb["item_id"].to_list() == items["item_id"].to_list()  # every item, warm and cold
    vecs = np.asarray(emb["embedding"].to_list())
    assert vecs.shape == (400, 64) and np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    manifest = json.loads((syn_eval / "manifest.json").read_text())
    assert manifest["job"] == "distill.eval" and "total_s" in manifest["timings"]
    for sub in ("teachers", "student", "ablations/no_s2i", "ablations/no_id2i", "ablations/no_i2i", "baselines/two_tower"):
        assert (syn_eval / sub / "manifest.json").is_file()


def test_rerun_is_reused(syn_eval, synthetic_features, capsys):
    from distill.jobs import evaluate
    from recsys.config import PipelineConfig

    pipe = PipelineConfig.from_mapping(SMALL)
    res = evaluate(synthetic_features, syn_eval, pipe.distill, teachers=pipe.teachers, seed=pipe.seed)
    assert res.skipped and res.metrics["recall@50_cold_student"] is not None
    # the teachers step alone: up to date in OUT/teachers
    assert run_cli(["teachers", "fit", "--features", str(synthetic_features), "--out", str(syn_eval / "teachers"), "--config", str(_cfg(syn_eval))]) == 0
    assert "up to date" in capsys.readouterr().out


def _cfg(out: Path) -> Path:
    import yaml

    p = out.parent / "small_again.yaml"
    p.write_text(yaml.safe_dump(SMALL))
    return p


def test_train_publishes_the_same_student(syn_eval, synthetic_features, tmp_path, monkeypatch, encoder_cache):
    out = tmp_path / "copy"
    shutil.copytree(syn_eval, out)
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(encoder_cache))
    assert run_cli(["distill", "train", "--features", str(synthetic_features), "--out", str(out), "--config", str(_cfg(out))]) == 0
    assert json.loads((out / "manifest.json").read_text())["job"] == "distill.train"
    a = pl.read_parquet(out / "item_embeddings.parquet")
    b = pl.read_parquet(syn_eval / "item_embeddings.parquet")
    assert a.equals(b)  # teachers and student were reused, not retrained
    # the eval's metrics and hits described the eval; they no longer sit beside a train's output (2026-11-30)
    assert not (out / "metrics.json").exists() and not (out / "test_hits.parquet").exists()
    assert (syn_eval / "metrics.json").exists()


def test_a_student_without_a_modality_the_catalog_has_exits_2_before_the_teachers(synthetic_features, tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"distill": {"student": {"use_text": False, "use_fields": False}}}))
    out = tmp_path / "o"
    assert run_cli(["distill", "train", "--features", str(synthetic_features), "--out", str(out), "--config", str(cfg)]) == 2
    assert not out.exists()  # refused before any teacher was fitted (it failed after them, exit 1, before)


def test_planted_truth_cold_neighbourhoods(syn_eval, synthetic_features, syn_data):
    """Held-out (cold) items: the student's top-10 neighbours overlap the
    planted factors' top-10 far more than chance (10 / 399)."""
    from distill.evaluate import neighbours, topk_overlap

    truth = pl.read_parquet(synthetic_features / "planted_truth.parquet").sort("item_id")
    factors = np.asarray(truth["factor"].to_list())
    emb = np.asarray(pl.read_parquet(syn_eval / "item_embeddings.parquet")["embedding"].to_list())
    cold = np.flatnonzero(syn_data.heldout)
    k = 10
    nb_truth, _ = neighbours(factors, cold, k)
    nb_student, _ = neighbours(emb, cold, k)
    overlap = topk_overlap(nb_student, nb_truth)
    chance = k / (len(factors) - 1)
    assert overlap >= 3 * chance, (overlap, chance)


def test_missing_or_bad_features_give_clear_errors(tmp_path, synthetic_features, capsys):
    out = str(tmp_path / "out")
    assert run_cli(["distill", "eval", "--features", str(tmp_path / "nope"), "--out", out]) == 2
    assert "nope" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["distill", "train", "--features", str(empty), "--out", out]) == 2
    assert "manifest" in capsys.readouterr().out
    # items.parquet without text: a data error naming the file and the column
    bad = tmp_path / "notext"
    shutil.copytree(synthetic_features, bad)
    rewrite_output(bad / "items.parquet", pl.read_parquet(bad / "items.parquet").drop("text"))
    assert run_cli(["teachers", "fit", "--features", str(bad), "--out", out]) == 1
    msg = capsys.readouterr().out
    assert "items.parquet" in msg and "'text'" in msg
    # a required column missing: a schema error naming it
    rewrite_output(bad / "interactions.parquet", pl.read_parquet(synthetic_features / "interactions.parquet").drop("pos_hist_end"))
    assert run_cli(["distill", "eval", "--features", str(bad), "--out", out]) == 1
    assert "pos_hist_end" in capsys.readouterr().out
    assert not Path(out).exists()  # nothing half-written


def test_distill_never_imports_recsys():
    for path in (ROOT / "distill").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "recsys" or n.startswith("recsys.") for n in names), f"{path} imports {names}"


def test_bench_quick(tmp_path):
    from recsys.bench import distill as bench

    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "distill.json").read_text())
    assert result["student_samples_per_s"] > 0 and result["encode_hit_items_per_s"] > result["encode_miss_items_per_s"]
    assert isinstance(result["default_cache_hit"], bool)


def test_cli_help_lists_commands():
    import argparse

    from recsys.cli import distill as cli_distill

    parser = argparse.ArgumentParser(prog="recsys")
    cli_distill.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "eval", "--help"])


def test_nmi_is_null_when_the_teacher_knows_no_more_items_than_clusters(syn_eval, small_config, encoder_cache, tmp_path,
                                                                        monkeypatch):
    """Found by a probe (2026-11-30): k-means clipped k to the items, so with
    9 known items and 20 clusters every NMI read 1.0 (perfect agreement)."""
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig

    monkeypatch.setenv("RECSYS_CACHE_DIR", str(encoder_cache))
    feats = tmp_path / "features"
    build_features(FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=100, items=12, max_events=40, seed=0)),
                   feats, log=lambda _m: None)
    out = tmp_path / "eval"
    assert run_cli(["distill", "eval", "--features", str(feats), "--out", str(out), "--config", str(small_config),
                    "--no-ablations", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    nmi_keys = [k for k in metrics if k.startswith("nmi_")]
    assert nmi_keys and all(metrics[k] is None for k in nmi_keys)
    assert all("not more than distill.diag_clusters=20" in metrics["reasons"][k] for k in nmi_keys)
    # a catalog with more items than clusters reports NMI beside its chance level
    full = json.loads((syn_eval / "metrics.json").read_text())
    for teacher in ("id_teacher", "seq_teacher"):
        chance = full[f"nmi_chance_vs_{teacher}"]
        assert 0 <= chance < 0.5 and full[f"nmi_student_vs_{teacher}"] > chance
