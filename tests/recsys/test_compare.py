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


# --- Holm, hierarchical bootstrap, segments, A/A calibration --------------------------


def test_holm_step_down():
    from recsys.eval.bootstrap import holm

    assert holm([0.01, 0.04, 0.03, 0.5]) == [True, False, False, False]  # 0.01 <= .05/4; 0.03 > .05/3
    assert holm([0.001, 0.012, 0.02]) == [True, True, True]  # .001<=.0167, .012<=.025, .02<=.05
    assert holm([float("nan"), 0.01]) == [False, True]  # NaN is never rejected nor counted


def test_bootstrap_p_value_tails():
    from recsys.eval.bootstrap import bootstrap_p_value

    assert bootstrap_p_value(np.full(999, 0.1)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.r_[np.full(500, -1.0), np.full(500, 1.0)]) == pytest.approx(1.0)


def _aa_frames(rng, n_users=150, per_user=6, seeds=(0, 1, 2), seed_noise=0.0):
    """Two arms drawn from the same model: label = signal + noise; each seed adds
    its own training noise (seed_noise) to every score of the arm."""
    users = np.repeat(np.arange(n_users), per_user)
    signal = rng.normal(size=len(users))
    y = (signal + rng.normal(size=len(users)) > 0).astype(np.int64)
    out = []
    for arm in ("control", "a"):
        for s in seeds:
            shift = rng.normal(scale=seed_noise, size=len(users))
            score = 1 / (1 + np.exp(-(signal + rng.normal(scale=1.0, size=len(users)) + shift)))
            out.append(ArmPredictions(arm, s, pl.DataFrame({
                "user_id": users, "item_id": np.arange(len(users)), "timestamp": np.zeros(len(users), np.int64),
                "label": y, "score": score, "lt_score": score, "returned_1d": y, "active_days_7": y,
                "lt_observed": np.ones(len(users), bool)})))
    return out


def test_aa_experiments_are_significant_at_about_the_nominal_rate():
    """60 simulated A/A experiments (3 seeds, same model in both arms): the
    GAUC interval excludes 0 in no more than binomial noise around 5% allows
    (P[X >= 8 | n=60, p=.05] ~ 0.02)."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(60):
        rows = compare_arms(_aa_frames(rng), control="control", metrics=["gauc"], n_boot=200, by_segment=False)
        hits += next(r for r in rows if r.arm == "a").significant
    assert hits <= 7, hits


def test_seed_noise_widens_the_interval():
    """With training noise that differs per seed, resampling the seeds makes
    the interval wider than a users-only bootstrap would."""
    from recsys.eval.bootstrap import paired_bootstrap
    from recsys.eval.metrics import METRICS

    rng = np.random.default_rng(3)
    frames = _aa_frames(rng, seed_noise=1.5)
    st = np.stack([p.frame["score"].to_numpy() for p in frames if p.arm == "a"])
    sc = np.stack([p.frame["score"].to_numpy() for p in frames if p.arm == "control"])
    users, y = frames[0].frame["user_id"].to_numpy(), frames[0].frame["label"].to_numpy()
    both = paired_bootstrap(METRICS["auc"], users, y, st, sc, n_boot=300, rng=np.random.default_rng(0))
    widths = []
    for k in range(3):
        one = paired_bootstrap(METRICS["auc"], users, y, st[k], sc[k], n_boot=300, rng=np.random.default_rng(0))
        widths.append(one.ci_high - one.ci_low)
    # averaging 3 seeds would shrink a users-only interval by ~sqrt(3); resampling seeds keeps it wide
    assert both.ci_high - both.ci_low > np.mean(widths) / np.sqrt(3) * 1.2


def test_segments_and_holm_in_rows():
    rng = np.random.default_rng(1)
    frames = []
    for p in _aa_frames(rng, seeds=(0,)):
        n = p.frame.height
        frames.append(ArmPredictions(p.arm, p.seed, p.frame.with_columns(
            pl.Series("cold_item", np.arange(n) % 4 == 0), pl.Series("new_user", p.frame["user_id"].to_numpy() < 30),
            pl.Series("hist_len", np.arange(n) % 300))))
    rows = compare_arms(frames, control="control", metrics=["auc", "gauc"], n_boot=100)
    segs = {r.segment for r in rows}
    assert segs == {"all", "cold_item", "warm_item", "new_user", "returning_user", "hist_len 0", "hist_len 1-9",
                    "hist_len 10-49", "hist_len 50-199", "hist_len 200+"}
    cold = next(r for r in rows if r.segment == "cold_item" and r.arm == "a" and r.metric == "auc")
    allr = next(r for r in rows if r.segment == "all" and r.arm == "a" and r.metric == "auc")
    assert cold.n_users <= allr.n_users and cold.value != allr.value
    assert all(not r.sig_holm or r.significant or r.p_value < 0.05 for r in rows)
    assert all(np.isnan(r.p_value) for r in rows if r.arm == "control")
    text = format_rows(rows, "table", control="control")
    assert "By segment" in text and "Holm" in text and "hist_len 200+" in text


def test_holm_resolution_note_names_the_replicates_needed():
    from recsys.compare import CompareRow, holm_resolution_note
    from recsys.eval.bootstrap import bootstrap_p_value, holm

    def rows(n_tests):
        return [CompareRow(arm=f"a{i}", metric="auc", value=0.6, delta=0.1, ci_low=0.05, ci_high=0.15,
                           control_value=0.5, significant=True, regression=False, higher_is_better=True,
                           n_users=10, seeds=1, p_value=0.001) for i in range(n_tests)]

    # the premise: with every replicate on one side, 1,000 replicates give p = 2/1001,
    # which Holm rejects in a family of 25 tests and not in one of 30
    p = bootstrap_p_value(np.ones(1000))
    assert holm([p] * 25) == [True] * 25 and holm([p] * 30) == [False] * 30
    assert holm_resolution_note(rows(25), 1000) is None
    note = holm_resolution_note(rows(30), 1000)
    assert note and "--n-boot 1200" in note
    assert holm_resolution_note(rows(30), 1200) is None


def test_an_empty_segment_says_so_for_long_term_metrics_too():
    """An empty segment's lt_auc read "no test impression has an observed
    long-term label" (a labelling problem that is not there), 2026-11-30."""
    import numpy as np

    from recsys.compare import why_not_computable
    from recsys.eval.metrics import METRICS

    none = np.zeros(0)
    assert why_not_computable(METRICS["lt_auc"], none, none, 0) == "no test impressions"
    assert "observed long-term label" in why_not_computable(METRICS["lt_auc"], none, none, 12)
    assert why_not_computable(METRICS["auc"], none, none, 0) == "no test impressions"


def test_an_arm_without_an_lt_model_gets_n_a_lt_metrics_not_an_error(tmp_path):
    """A probe (2026-12-01): LightGBM trains no LT model when valid has no
    observed LT rows and writes lt_score NaN on every row; `experiment run`
    then failed at its compare ("150 NaN score(s)", exit 1)."""
    from recsys.experiment_run import read_predictions

    users = np.repeat(np.arange(20), 2)
    labels = np.tile([1, 0], 20)
    rng = np.random.default_rng(0)
    ctrl = _preds(rng.random(40), labels, users)
    lgb = _preds(rng.random(40), labels, users, lt=np.full(40, np.nan))
    lgb.write_parquet(tmp_path / "p.parquet")
    assert read_predictions(tmp_path / "p.parquet", "lgb", 0).height == 40
    rows = compare_arms([ArmPredictions("control", 0, ctrl), ArmPredictions("lgb", 0, lgb)], control="control",
                        metrics=["auc", "lt_auc", "lt_spearman"], n_boot=100, by_segment=False)
    got = {(r.arm, r.metric): r for r in rows}
    assert np.isfinite(got[("lgb", "auc")].delta) and np.isfinite(got[("control", "lt_auc")].value)
    for metric in ("lt_auc", "lt_spearman"):
        r = got[("lgb", metric)]
        assert np.isnan(r.value) and np.isnan(r.delta) and not r.significant and "no model for lt_score" in r.reason
    unobserved = lgb.with_columns(pl.Series("lt_score", np.r_[np.nan, rng.random(39)]),
                                  pl.Series("lt_observed", np.r_[False, np.ones(39, bool)]))
    compare_arms([ArmPredictions("control", 0, ctrl), ArmPredictions("lgb", 0, unobserved)], control="control",
                 metrics=["lt_auc"], n_boot=100, by_segment=False)  # a NaN the LT metrics never read is fine
    unobserved.write_parquet(tmp_path / "u.parquet")
    assert read_predictions(tmp_path / "u.parquet", "lgb", 0).height == 40
    partly = lgb.with_columns(pl.Series("lt_score", np.r_[np.nan, rng.random(39)]))
    with pytest.raises(Exception, match="NaN or infinite score"):  # a NaN among scores is still an error
        compare_arms([ArmPredictions("control", 0, ctrl), ArmPredictions("lgb", 0, partly)], control="control",
                     metrics=["lt_auc"], n_boot=100, by_segment=False)
    partly.write_parquet(tmp_path / "q.parquet")
    with pytest.raises(Exception, match="1 NaN score"):
        read_predictions(tmp_path / "q.parquet", "lgb", 0)
