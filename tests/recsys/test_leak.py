"""Stacking leak of the match features (issue 13): the train-minus-test AUC
gap of an mf_* feature must not depend on whether the student saw the item
(recsys.eval.leak). Out-of-fold features (match.folds 2) pass that check, and
the in-sample ones (match.folds 0) are measurably leakier than them on the
same users and items (paired), which shows the check can fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import schemas as S
from recsys.eval.leak import LeakDelta, leak_gaps, leak_reduction
from recsys.eval.metrics import auc

DEBUG = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "debug.yaml"

# --- the statistic on planted data (fast) -----------------------------------


def _frame(leak: float, n_users: int = 600, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """Rows of n_users users, half of them train, half test, over 200 items
    (items 0..59 hidden); x separates the labels with AUC ~0.6, and train
    positives of seen items get `leak` added (what an in-sample model does)."""
    rng = np.random.default_rng(seed)
    n = n_users * 40
    users = np.repeat(np.arange(n_users), 40)
    items = rng.integers(0, 200, n)
    split = np.where(rng.random(n) < 0.5, "train", "test")
    y = rng.integers(0, 2, n)
    x = 0.35 * y + rng.normal(0, 1, n) + rng.normal(0, 0.5, n_users)[users]  # a user-level offset
    hidden = np.arange(60)
    x = x + leak * ((split == "train") & (y == 1) & ~np.isin(items, hidden))
    frame = pl.DataFrame({S.USER_ID: users, S.ITEM_ID: items, S.SPLIT: split, S.LABEL: y, "x": x})
    return frame, hidden


def test_point_values_are_the_aucs_of_the_four_groups():
    frame, hidden = _frame(0.3)
    g = leak_gaps(frame, ["x"], hidden, n_boot=50)["x"]
    held = frame[S.ITEM_ID].is_in(hidden.tolist())
    for name, split, h in (("train_seen", "train", False), ("test_seen", "test", False),
                           ("train_held", "train", True), ("test_held", "test", True)):
        part = frame.filter((pl.col(S.SPLIT) == split) & (held == h))
        assert getattr(g, f"auc_{name}") == pytest.approx(auc(part[S.LABEL].to_numpy(), part["x"].to_numpy()))
        assert g.rows[name] == part.height
    assert g.diff == pytest.approx((g.auc_train_seen - g.auc_test_seen) - (g.auc_train_held - g.auc_test_held))
    assert g.ci_low <= g.diff <= g.ci_high


def test_a_planted_leak_is_detected_and_its_absence_is_not():
    (leaky_frame, hidden), (clean_frame, _) = _frame(0.3), _frame(0.0)
    leaky = leak_gaps(leaky_frame, ["x"], hidden, n_boot=300)["x"]
    clean = leak_gaps(clean_frame, ["x"], hidden, n_boot=300)["x"]
    assert leaky.diff > 0.03 and leaky.leaks and not leaky.agrees
    assert clean.agrees and not clean.leaks


def test_a_leak_on_held_out_items_only_is_not_a_leak():
    frame, hidden = _frame(0.0)
    boost = (pl.col(S.SPLIT) == "train") & (pl.col(S.LABEL) == 1) & pl.col(S.ITEM_ID).is_in(hidden.tolist())
    g = leak_gaps(frame.with_columns(pl.when(boost).then(pl.col("x") + 0.3).otherwise(pl.col("x"))), ["x"], hidden,
                  n_boot=300)["x"]
    assert g.diff < 0 and not g.leaks


def test_nulls_valid_rows_and_never_trained_items_are_dropped():
    frame, hidden = _frame(0.0, n_users=100)
    extra = pl.DataFrame({S.USER_ID: [0, 1, 2], S.ITEM_ID: [5, 999, 150], S.SPLIT: ["valid", "test", "train"],
                          S.LABEL: [1, 1, 0], "x": [9.0, 9.0, None]})  # valid; item 999 has no train row; null
    a = leak_gaps(frame, ["x"], hidden, n_boot=20)["x"]
    b = leak_gaps(pl.concat([frame, extra]), ["x"], hidden, n_boot=20)["x"]
    assert a == b
    with pytest.raises(ValueError, match="lacks columns"):
        leak_gaps(frame.drop(S.SPLIT), ["x"], hidden)


def test_the_interval_resamples_users_not_rows():
    """20 users whose train rows of seen items are tilted, each its own way:
    noise across users, however many rows each has. Resampling users, the
    interval is much wider than when every row is its own user."""
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(20), 400)
    split = np.tile(np.repeat(["train", "test"], 200), 20)
    items = np.tile(np.arange(400) % 100, 20)
    y = rng.integers(0, 2, len(users))
    tilt = rng.normal(0, 1, 20)[users] * (split == "train") * (items >= 30)  # (n,) per user, train rows of seen items
    x = y * (0.5 + 0.5 * tilt) + rng.normal(0, 1, len(users))
    frame = pl.DataFrame({S.USER_ID: users, S.ITEM_ID: items, S.SPLIT: split, S.LABEL: y, "x": x})
    by_user = leak_gaps(frame, ["x"], np.arange(30), n_boot=300)["x"]
    by_row = leak_gaps(frame.with_columns(pl.int_range(pl.len()).alias(S.USER_ID)), ["x"], np.arange(30), n_boot=300)["x"]
    assert by_user.n_users == 20 and by_row.n_users == 8000 and by_user.diff == by_row.diff
    assert by_user.ci_high - by_user.ci_low > 1.4 * (by_row.ci_high - by_row.ci_low)


def test_a_planted_extra_leak_in_table_a_is_a_paired_reduction():
    """Same rows, same noise: table a only adds the planted leak, so the
    paired interval is far narrower than that of either diff."""
    (leaky, hidden), (clean, _) = _frame(0.3), _frame(0.0)
    r = leak_reduction(leaky, clean, ["x"], hidden, n_boot=300)["x"]
    ga, gb = (leak_gaps(f, ["x"], hidden, n_boot=300)["x"] for f in (leaky, clean))
    assert (r.a, r.b) == (ga, gb) and r.delta > 0.05  # no nulls: the same rows as leak_gaps
    assert r.removes_leak and r.ci_low <= r.delta <= r.ci_high
    assert r.ci_high - r.ci_low < 0.2 * (ga.ci_high - ga.ci_low)
    back = leak_reduction(clean, leaky, ["x"], hidden, n_boot=300)["x"]
    assert back.delta == pytest.approx(-r.delta) and back.ci_high < 0 and not back.removes_leak


def test_identical_tables_give_a_zero_delta_and_an_interval_at_zero():
    """The replicates of both tables resample the same users: every replicate delta is exactly 0."""
    frame, hidden = _frame(0.3)
    r = leak_reduction(frame, frame.clone(), ["x"], hidden, n_boot=100)["x"]
    assert r.delta == 0 and r.ci_low == 0 == r.ci_high and not r.removes_leak


def test_a_a_tables_rarely_look_like_a_reduction():
    """Two features of the same rows with independent noise and no leak: the
    interval excludes 0 about 5% of the time (5 of 150 draws of 600 users)."""
    hits = 0
    for i in range(20):
        frame, hidden = _frame(0.0, n_users=300, seed=100 + i)
        rng = np.random.default_rng(i)
        users, y = frame[S.USER_ID].to_numpy(), frame[S.LABEL].to_numpy()
        other = frame.with_columns(x=0.35 * y + rng.normal(0, 1, frame.height) + rng.normal(0, 0.5, 300)[users])
        r = leak_reduction(frame, other, ["x"], hidden, n_boot=200, seed=i)["x"]
        hits += not r.ci_low <= 0 <= r.ci_high
    assert hits <= 3


def test_a_row_null_in_either_table_is_dropped_from_both():
    (a, hidden), (b, _) = _frame(0.3, n_users=200), _frame(0.0, n_users=200)
    gone = pl.Series(np.random.default_rng(2).random(a.height) < 0.1)
    b_nulls = b.with_columns(pl.when(gone).then(None).otherwise(pl.col("x")).alias("x"))
    r = leak_reduction(a, b_nulls, ["x"], hidden, n_boot=20)["x"]
    ga, gb = (leak_gaps(f.filter(~gone), ["x"], hidden, n_boot=20)["x"] for f in (a, b))
    assert (r.a, r.b) == (ga, gb) and sum(r.b.rows.values()) == int((~gone).sum())
    with pytest.raises(ValueError, match="same rows"):
        leak_reduction(a, b.reverse(), ["x"], hidden, n_boot=20)
    with pytest.raises(ValueError, match="lacks columns"):
        leak_reduction(a, b.drop("x"), ["x"], hidden, n_boot=20)


# --- the pipeline's own student on MovieLens-100K (slow) ---------------------

# A student that fits its train pairs hard (no dropout of any kind, lr 5x the
# default, i2i pairs twice as far apart and weighted 4x) and cheaper teachers
# (~20 s a distillation here). The in-sample diff on ML-100K stays +0.02 to
# +0.045 AUC (1.3 to 3 bootstrap standard errors) with every student tried.
OVERRIDES = {
    "tracking": {"enabled": False},
    "teachers": {"id2item": {"epochs": 10, "patience": 0, "dim": 32},
                 "seq2item": {"epochs": 10, "patience": 0, "dim": 32}},
    "distill": {"epochs": 8, "lr": 0.01, "patience": 0, "two_tower": False, "w_i2i": 2.0, "i2i_window": 10,
                "student": {"dim": 64, "hidden_dim": 128, "modality_dropout": 0.0, "dropout": 0.0}},
}
COSINES = ("mf_cos_mean", "mf_cos_recency", "mf_cos_max", "mf_cos_top5", "mf_cos_last")


def hidden_items(features: Path, job) -> np.ndarray:
    """The items the distill job `job` never trains on (its heldout | pseudo_cold draw)."""
    from distill.evaluate.cold_start import draw_cold_items

    items = pl.read_parquet(features / S.FILES["items"]).sort(S.ITEM_ID)
    d = job.distill
    heldout, pseudo = draw_cold_items(items[S.N_TRAIN].fill_null(0).to_numpy() > 0, d.holdout_frac,
                                      d.pseudo_cold_frac, d.seed)
    return items[S.ITEM_ID].to_numpy()[heldout | pseudo]


def measure(features: Path, root: Path, seed: int, folds: int = 2) -> dict[str, LeakDelta]:
    """In-sample (a) vs out-of-fold (b) LeakDeltas of the COSINES for one
    pipeline seed: one student on all of train, its match features with
    match.folds 0 (a) and match.folds `folds` (b: train rows from a student
    refitted per fold without their users; valid and test rows from the
    student of all of train, as in a)."""
    from recsys.config import load_pipeline_config
    from recsys.plan import plan_distill, plan_match
    from recsys.stages import run_distill, run_match

    quiet = lambda _m: None  # noqa: E731
    cfg = {k: load_pipeline_config(DEBUG, OVERRIDES | {"seed": seed, "match": {"folds": k}}) for k in (0, folds)}
    job = plan_distill(cfg[0], features=features, ablations=False)
    emb = run_distill(job, None, root / "distill", log=quiet).out / "item_embeddings.parquet"
    inter = pl.read_parquet(features / S.FILES["interactions"], columns=[*S.MATCH_KEYS, S.SPLIT, S.LABEL])
    hidden = hidden_items(features, job)
    frames = []
    for k in (0, folds):
        res = run_match(plan_match(cfg[k], features=features, embeddings=emb), None, root / f"match_k{k}", log=quiet,
                        progress=False)
        match = pl.read_parquet(res.out / S.MATCH_FILE)
        frames.append(inter.join(match, on=list(S.MATCH_KEYS), how="left", maintain_order="left"))
    return leak_reduction(*frames, COSINES, hidden, seed=seed)


@pytest.fixture(scope="module")
def leak(ml100k_features, tmp_path_factory):
    return measure(ml100k_features, tmp_path_factory.mktemp("leak"), seed=0)


@pytest.mark.slow
def test_out_of_fold_match_features_pass_the_leak_check(leak):
    """The issue's criterion. Measured at pipeline seeds 0/1/2, the closest
    an interval end comes to 0 is 0.014 / 0.004 (mf_cos_last: +0.025
    [-0.004, +0.058]) / 0.017."""
    for col in COSINES:
        assert leak[col].b.agrees, str(leak[col].b)


@pytest.mark.slow
def test_in_sample_diffs_exceed_out_of_fold_ones_on_the_same_users(leak):
    """The half that shows the check can fail: it fails if the out-of-fold
    diff were as large as the in-sample one. Either diff alone is within
    noise at most seeds (mf_cos_mean in-sample +0.045 / +0.021 / +0.023 at
    pipeline seeds 0/1/2, +-0.03), but test rows carry the same features in
    both tables, so the paired delta is tight: mf_cos_mean +0.031 [+0.025,
    +0.036] / +0.018 [+0.013, +0.024] / +0.018 [+0.012, +0.023]; the lowest
    interval end of the four columns at the three seeds is +0.012. Left
    out: mf_cos_last, +0.007 [-0.001, +0.014] at seed 1.

    Read it as "b's diff is smaller", not as "a memorises its train rows":
    b's train rows come from fold students (half the users), its test rows
    from the full student. Features with every row from its user's fold
    student give mf_cos_mean diff +0.025 / +0.026 / +0.024, and in-sample
    minus those +0.020 [+0.007, +0.034] / -0.004 [-0.020, +0.011] / -0.001
    [-0.017, +0.013]: past seed 0, this delta is the fold students being
    weaker on seen items than the full student, not a removed leak."""
    for col in ("mf_cos_mean", "mf_cos_recency", "mf_cos_max", "mf_cos_top5"):
        assert leak[col].removes_leak, str(leak[col])
