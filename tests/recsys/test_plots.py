"""recsys.plots: every helper writes a real PNG atomically and returns its path."""

from __future__ import annotations

import numpy as np
import pytest

from recsys import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, expected):
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []  # no temp left behind


def test_training_curves(tmp_path):
    out = tmp_path / "figs" / "curves.png"  # the folder is created
    history = {"train_loss": [0.7, 0.5, 0.45], "val_loss": [0.72, 0.6, 0.62], "val_auc": [0.6, 0.68, 0.67]}
    _check_png(plots.training_curves(history, out, best_epoch=2), out)
    with pytest.raises(ValueError, match="2 values for 3 epochs"):
        plots.training_curves({"loss": [1.0, 0.5]}, tmp_path / "bad.png", epochs=[1, 2, 3])


def test_roc_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    arms = {"control": (y, y * 0.5 + rng.normal(size=500)), "svd": (y, y + rng.normal(size=500))}
    _check_png(plots.roc_curves(arms, tmp_path / "roc.png"), tmp_path / "roc.png")


def test_roc_points_hand_computed():
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > both): 3 of 4 -> AUC 0.75
    fpr, tpr, auc = plots.roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert auc == pytest.approx(0.75)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    # all scores tied: one diagonal step, AUC 0.5
    assert plots.roc_points([0, 1, 0, 1], [0.3] * 4)[2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both positive and negative"):
        plots.roc_points([1, 1], [0.1, 0.2])


def test_arm_deltas(tmp_path):
    deltas = {
        "auc": {"svd": (0.012, 0.004, 0.020), "mean_pool": (-0.003, -0.011, 0.005)},
        "ndcg@10": {"svd": (0.010, -0.002, 0.022), "mean_pool": (-0.020, -0.030, -0.010)},
    }
    _check_png(plots.arm_deltas(deltas, tmp_path / "d.png", control="din"), tmp_path / "d.png")
    # a percentile interval that misses its point delta still draws (no negative error bar)
    _check_png(plots.arm_deltas({"auc": {"a": (0.5, 0.6, 0.7)}}, tmp_path / "off.png"), tmp_path / "off.png")


def test_singular_spectrum(tmp_path):
    s = np.exp(-np.arange(64) / 10.0)
    _check_png(plots.singular_spectrum(s, tmp_path / "s.png", rank=16), tmp_path / "s.png")
    with pytest.raises(ValueError, match="rank 65"):
        plots.singular_spectrum(s, tmp_path / "bad.png", rank=65)


def test_feature_importance(tmp_path):
    imp = {f"feat_{i}": float(i) for i in range(40)}
    _check_png(plots.feature_importance(imp, tmp_path / "imp.png", top=10), tmp_path / "imp.png")


def test_cost_vs_size(tmp_path):
    rows = [
        {"engine": "polars", "events": 1e6, "seconds": 1.4},
        {"engine": "spark", "events": 1e6, "seconds": 37.7, "startup_s": 13.3},
        {"engine": "polars", "events": 1e7, "seconds": 19.0},
        {"engine": "spark", "events": 1e7, "seconds": 116.5, "startup_s": 13.3},
    ]
    _check_png(plots.cost_vs_size(rows, tmp_path / "cost.png"), tmp_path / "cost.png")
    with pytest.raises(ValueError, match="no rows"):
        plots.cost_vs_size([{"engine": "polars", "events": 0, "seconds": None}], tmp_path / "none.png")


def test_overwrite_is_atomic_replace(tmp_path):
    out = tmp_path / "imp.png"
    out.write_bytes(b"old")
    plots.feature_importance({"a": 1.0, "b": 2.0}, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
