"""Compare arithmetic on hand-made predictions with known deltas."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from recsys.compare import ArmPredictions, compare_arms, format_rows, regressions
from recsys.eval.metrics import auc


def _preds(scores, labels, users, lt=None):
    n = len(scores)
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": np.arange(n),
            "timestamp": np.full(n, 100),
            "label": labels,
            "score": scores,
            "lt_score": scores if lt is None else lt,
            "returned_1d": labels,
            "active_days_7": labels * 3,
            "lt_observed": np.ones(n, dtype=bool),
        }
    )


def test_hand_made_delta_and_interval():
    # 4 users x 2 rows. control ranks every user's pair wrongly, treatment right:
    # AUC 0 -> 1, delta exactly +1, and every bootstrap replicate is +1 too.
    users = np.repeat([1, 2, 3, 4], 2)
    labels = np.tile([1, 0], 4)
    ctrl = _preds(np.tile([0.2, 0.8], 4), labels, users)
    treat = _preds(np.tile([0.8, 0.2], 4), labels, users)
    rows = compare_arms(
        [ArmPredictions("control", 0, ctrl), ArmPredictions("t", 0, treat)], control="control", metrics=["gauc", "auc"], n_boot=200
    )
    got = {(r.arm, r.metric): r for r in rows}
    assert got[("t", "gauc")].delta == pytest.approx(1.0)
    assert got[("t", "gauc")].ci_low == pytest.approx(1.0) and got[("t", "gauc")].ci_high == pytest.approx(1.0)
    assert got[("t", "auc")].value == pytest.approx(1.0) and got[("control", "auc")].value == pytest.approx(0.0)
    assert got[("control", "auc")].delta == 0 and not got[("control", "auc")].significant
    assert got[("t", "auc")].significant and not got[("t", "auc")].regression


def test_regression_flag_and_formats():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(100), 6)
    labels = rng.integers(0, 2, len(users))
    good = labels + 0.5 * rng.normal(size=len(users))
    bad = rng.normal(size=len(users))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    preds = [
        ArmPredictions("control", 0, _preds(sig(good), labels, users)),
        ArmPredictions("worse", 0, _preds(sig(bad), labels, users)),
    ]
    rows = compare_arms(preds, control="control", metrics=["auc", "logloss"], n_boot=300)
    assert [r.arm for r in regressions(rows, "auc", "control")] == ["worse"]
    assert [r.arm for r in regressions(rows, "logloss", "control")] == ["worse"]  # logloss up = worse
    data = json.loads(format_rows(rows, "json", control="control"))
    assert {"arm", "metric", "value", "delta", "ci_low", "ci_high"} <= set(data[0])
    worse_auc = next(d for d in data if d["arm"] == "worse" and d["metric"] == "auc")
    assert worse_auc["value"] == pytest.approx(auc(labels, sig(bad)))
    assert worse_auc["ci_high"] < 0
    table = format_rows(rows, "table", control="control")
    assert "WORSE *" in table and "(control)" in table
    assert format_rows(rows, "markdown", control="control").startswith("| metric |")
    assert format_rows(rows, "csv", control="control").splitlines()[0].startswith("arm,metric,value,delta,ci_low,ci_high")


def test_pairs_on_common_impressions_only():
    users = np.repeat([1, 2, 3], 2)
    labels = np.tile([1, 0], 3)
    ctrl = _preds(np.tile([0.6, 0.4], 3), labels, users)
    treat = _preds(np.tile([0.6, 0.4], 3), labels, users).head(4)  # user 3 missing
    rows = compare_arms([ArmPredictions("control", 0, ctrl), ArmPredictions("t", 0, treat)], control="control", metrics=["gauc"], n_boot=100)
    assert next(r for r in rows if r.arm == "t").n_users == 2
