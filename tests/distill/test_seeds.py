"""Multi-seed reporting: the paired bootstrap on hand-made cases, and the
CLI's --seed (deterministic) and --seeds (seeds.json) on synthetic data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distill.evaluate.seeds import bootstrap_ratio, cell_sums, spread
from tests.distill.conftest import run_cli


def test_cell_sums_and_spread_golden():
    c = cell_sums(np.array([1, 0, 1, 1]), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 0]), 2, 2)
    np.testing.assert_array_equal(c, [[1, 2], [0, 0]])
    s = spread([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}


def test_bootstrap_ratio_point_and_interval():
    rng = np.random.default_rng(0)
    n = 4000
    users, seeds = rng.integers(0, 400, n), rng.integers(0, 3, n)
    b = rng.random(n) < 0.2
    a = b | (rng.random(n) < 0.1)  # a hits wherever b does, and more: ratio > 1 for sure
    r = bootstrap_ratio(a, b, users, seeds, rng=np.random.default_rng(1))
    assert r["ratio"] == pytest.approx(a.sum() / b.sum())
    assert 1 < r["lo"] < r["ratio"] < r["hi"] and r["p_le_1"] == 0
    same = bootstrap_ratio(b, b, users, seeds, rng=np.random.default_rng(1))
    assert same["ratio"] == same["lo"] == same["hi"] == 1.0  # paired: identical arms never differ
    assert np.isnan(bootstrap_ratio(a, np.zeros(n, bool), users, seeds, rng=np.random.default_rng(1))["ratio"])


def test_bootstrap_aa_false_positive_rate():
    """A/A: two arms with the same hit rate, drawn independently; the 95%
    interval of their ratio should exclude 1 in about 5% of experiments."""
    rng = np.random.default_rng(0)
    excluded = 0
    for _ in range(100):
        users, seeds = rng.integers(0, 200, 1500), rng.integers(0, 3, 1500)
        a, b = rng.random(1500) < 0.2, rng.random(1500) < 0.2
        r = bootstrap_ratio(a, b, users, seeds, n_boot=400, rng=rng, resample_seeds=False)
        excluded += not (r["lo"] <= 1 <= r["hi"])
    assert excluded <= 12


@pytest.fixture
def cache_env(encoder_cache):
    old = os.environ.get("RECSYS_CACHE_DIR")
    os.environ["RECSYS_CACHE_DIR"] = str(encoder_cache)
    yield
    if old is None:
        os.environ.pop("RECSYS_CACHE_DIR")
    else:
        os.environ["RECSYS_CACHE_DIR"] = old


def test_seed_is_deterministic_and_seeds_report(synthetic_features, small_config, syn_content, cache_env, tmp_path, capsys):
    f, cfg = str(synthetic_features), str(small_config)
    for name in ("a", "b"):
        assert run_cli(["distill", "eval", "--features", f, "--out", str(tmp_path / name), "--config", cfg, "--no-ablations", "--seed", "1", "--quiet"]) == 0
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert ma == mb and "recall@50_cold_two_tower" in ma
    capsys.readouterr()
    out = tmp_path / "seeds"
    assert run_cli(["distill", "eval", "--features", f, "--out", str(out), "--config", cfg, "--no-ablations", "--seeds", "1,2"]) == 0
    table = capsys.readouterr().out
    assert "student_vs_content" in table and "95% CI" in table
    rep = json.loads((out / "seeds.json").read_text())
    assert rep["seeds"] == [1, 2] and rep["k"] == 50
    # the seed-1 run inside equals the --seed 1 run
    assert json.loads((out / "seed_1" / "metrics.json").read_text()) == ma
    r = rep["ratios"]["student_vs_content"]
    assert r["per_seed"]["1"] == pytest.approx(ma["recall@50_cold_student"] / ma["recall@50_cold_content"])
    ci = r["pooled_ci_users_seeds"]
    assert ci["lo"] <= ci["ratio"] <= ci["hi"]
    assert set(rep["summary"]["recall@50_cold_student"]) == {"mean", "std", "min", "max"}
    for bad in ("1,1", "0,", "1_0", "4294967296"):  # the last three ran before 2026-11-30 (as [0], 10, 0)
        with pytest.raises(SystemExit) as e:  # a usage error: exit 2
            run_cli(["distill", "eval", "--features", f, "--out", str(tmp_path / "x"), "--seeds", bad])
        assert e.value.code == 2
    for bad in ("-1", "4294967296"):  # --seed: "unexpected ValueError", exit 1, before 2026-11-30
        assert run_cli(["distill", "eval", "--features", f, "--out", str(tmp_path / "x"), "--seed", bad]) == 2
        assert "--seed: seeds must be integers in 0..2**32-1" in capsys.readouterr().out
