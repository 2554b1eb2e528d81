"""The planted-interest synthetic source (`SyntheticConfig(kind="interests")`):
deterministic, its signal planted far from the end of long histories, and
accepted by the features job; kind "uniform" unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import schemas as S
from features.core.errors import ConfigError
from features.core.config import from_dict
from features.jobs import FeaturesConfig, build_features
from features.sources import SyntheticConfig, generate_synthetic

WINDOW = 256  # the truncation the long-history experiment compares against
LONG = SyntheticConfig(kind="interests", users=24, items=400, max_events=10_000, min_events=9_000, days=365,
                       topics=16, interests=4, interest_share=0.05, session_size=50, seed=1)


def _frames(cfg: SyntheticConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, str]:
    source, truth = generate_synthetic(cfg)
    return source.interactions.frame.collect(), source.items.frame.collect(), truth, source.interactions.fingerprint


def _per_user(inter: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """One row per event, oldest first per user, with `in_interest` (the item's
    topic is one of the user's interests) and `from_end` (0 = last event)."""
    topics = truth.filter(pl.col(S.ITEM_ID).is_not_null()).select(S.ITEM_ID, "topic")
    interests = truth.filter(pl.col(S.USER_ID).is_not_null()).select(S.USER_ID, "interests")
    return (
        inter.join(topics, on=S.ITEM_ID).join(interests, on=S.USER_ID)
        .sort(S.USER_ID, S.TIMESTAMP, maintain_order=True)
        .with_columns(
            pl.col("interests").list.contains(pl.col("topic")).alias("in_interest"),
            (pl.len().over(S.USER_ID) - 1 - pl.int_range(pl.len()).over(S.USER_ID)).alias("from_end"),
            (pl.int_range(pl.len()).over(S.USER_ID) * 10 // pl.len().over(S.USER_ID)).alias("decile"),
        )
    )


def test_same_seed_same_data_other_seed_other_data():
    a, b = _frames(LONG), _frames(LONG)
    for x, y in zip(a[:3], b[:3]):
        assert_frame_equal(x, y)
    assert a[3] == b[3]
    other = _frames(SyntheticConfig(**{**LONG.__dict__, "seed": 2}))
    assert not other[0].equals(a[0])
    assert other[3] != a[3]


def test_shape_sessions_and_labels():
    inter, items, truth, _ = _frames(LONG)
    n = inter.group_by(S.USER_ID).len()["len"]
    # exact duplicates (an item drawn twice in one session) are dropped: ~6% here
    assert n.min() >= 0.9 * LONG.min_events and n.max() <= LONG.max_events
    assert inter[S.LABEL].dtype == pl.Int8 and S.RATING not in inter.columns
    sessions = inter.group_by(S.USER_ID, S.TIMESTAMP).len()["len"]
    assert sessions.max() <= LONG.session_size and sessions.median() >= 0.9 * LONG.session_size
    assert items.height == LONG.items and items[S.TEXT].null_count() == 0
    ev = _per_user(inter, truth)
    agree = (ev["in_interest"].cast(pl.Int8) == ev[S.LABEL]).mean()
    assert abs(agree - (1 - LONG.label_noise)) < 0.01  # labels are the planted truth, flipped at label_noise
    # impressions come from every interest of every user (and from none)
    seen = ev.filter(pl.col("in_interest")).group_by(S.USER_ID).agg(pl.col("topic").n_unique())["topic"]
    assert (seen == LONG.interests).all()
    assert ev["in_interest"].mean() < 0.5


def test_interest_evidence_lies_mostly_outside_the_last_256_events():
    inter, _, truth, _ = _frames(LONG)
    ev = _per_user(inter, truth)
    per_user = ev.group_by(S.USER_ID).agg(
        (pl.col("in_interest") & (pl.col("from_end") < WINDOW)).sum().alias("recent"),
        pl.col("in_interest").sum().alias("all"),
    )
    share = (per_user["recent"] / per_user["all"]).to_numpy()
    assert share.max() < 0.10, share.max()  # the planted property
    assert 0.01 < np.median(share) < 0.05  # ~256 / 9,500 of it: spread evenly, not bunched at the start either
    # every interest recurs across the whole history: present in each tenth of it
    by_decile = ev.filter(pl.col("in_interest")).group_by(S.USER_ID, "topic").agg(pl.col("decile").n_unique())
    assert (by_decile["decile"] == 10).all()
    # and is sparse: the excess over the uniform rate in the last 256 events is a
    # few events per interest, against ~WINDOW / topics uniform ones
    excess = WINDOW * LONG.interest_share / LONG.interests
    assert excess < 0.5 * WINDOW / LONG.topics


def test_the_features_job_accepts_it(tmp_path):
    cfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(
        kind="interests", users=12, items=200, max_events=2_000, min_events=1_500, days=60, topics=8,
        interests=2, session_size=20, seed=0))
    result = build_features(cfg, tmp_path / "features", log=lambda _m: None)
    inter = pl.read_parquet(tmp_path / "features" / S.FILES["interactions"])
    assert set(inter[S.SPLIT].unique()) == {"train", "valid", "test"}
    assert inter[S.LABEL].n_unique() == 2
    # one session = one request: its impressions share one history, all of the earlier events
    per_request = inter.group_by(S.USER_ID, S.TIMESTAMP).agg(pl.col(S.HIST_END).n_unique().alias("n"),
                                                             pl.len().alias("c"))
    assert (per_request["n"] == 1).all() and per_request["c"].max() <= 20
    assert inter[S.HIST_LEN].max() >= 1_400
    assert result.manifest["outputs"]
    again = build_features(cfg, tmp_path / "features", log=lambda _m: None)
    assert again.skipped


def test_uniform_kind_is_unchanged():
    """kind "uniform" (the default) gives the same data and fingerprint as before
    `kind` existed (golden values from the generator of 2026-11-23)."""
    cfg = SyntheticConfig(users=150, items=240, max_events=80, seed=0)
    assert cfg.kind == "uniform" and cfg == SyntheticConfig(kind="uniform", users=150, items=240, max_events=80)
    source, _ = generate_synthetic(cfg)
    inter = source.interactions.frame.collect()
    h = hashlib.sha256()
    for c in inter.columns:
        h.update(np.ascontiguousarray(inter[c].to_numpy()).tobytes())
    assert (inter.height, h.hexdigest()[:16]) == (4631, "37a80abb57d34f61")
    assert source.interactions.fingerprint == "synthetic-v1-4b148ebc54816920-inter"
    # interest-only keys do not touch it
    other, _ = generate_synthetic(SyntheticConfig(users=150, items=240, max_events=80, topics=9, interests=3))
    assert other.interactions.fingerprint == source.interactions.fingerprint


@pytest.mark.parametrize("bad, message", [
    ({"interests": 8, "topics": 8}, "interests < topics"),
    ({"topics": 500, "items": 400}, "topics <= items"),
    ({"interest_share": 1.5}, "interest_share"),
    ({"label_noise": 0.5}, "label_noise"),
    ({"session_size": 0}, "session_size"),
    ({"max_events": 100_000, "days": 2, "session_size": 1}, "more sessions than minutes"),
])
def test_bad_interest_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SyntheticConfig, {"kind": "interests", "items": 400, **bad}, where="features.synthetic")
    from_dict(SyntheticConfig, {"items": 400, **bad}, where="features.synthetic")  # unused by kind uniform


def test_events_dropped_as_repeats_within_a_session_are_announced(tmp_path, capsys):
    # min_events, session_size and interest_share bound what is drawn: with 2 items, a 50-event
    # session keeps 2 events, silently before (found by a probe, 2026-11-30)
    from recsys.cli import main

    (tmp_path / "c.yaml").write_text("features:\n  source: synthetic\n  synthetic:\n    kind: interests\n    users: 5\n"
                                     "    items: 2\n    topics: 2\n    interests: 1\n    session_size: 50\n"
                                     "    max_events: 100\n    min_events: 100\n")
    rc = main(["features", "build", "--out", str(tmp_path / "f"), "--config", str(tmp_path / "c.yaml")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    log = cap.out + cap.err
    assert "warning: synthetic interests:" in log and "repeated an item within its session and were dropped" in log
    assert "kept events per user 4-4 (drawn: 100-100)" in log


@pytest.mark.parametrize("kind", ["uniform", "interests"])
def test_a_time_span_past_2200_is_refused_at_the_config(kind, tmp_path, capsys):
    """A probe (2026-12-01): `days` was unbounded; a huge span overflowed, or the
    build said the generated timestamps were "after 2200" (a unit problem)."""
    with pytest.raises(ConfigError, match="days must be in 2..73000"):
        from_dict(SyntheticConfig, {"kind": kind, "items": 400, "days": 73_001}, where="features.synthetic")
    from recsys.cli import main

    (tmp_path / "c.yaml").write_text(f"features:\n  source: synthetic\n  synthetic:\n    kind: {kind}\n    users: 20\n"
                                     "    items: 40\n    topics: 4\n    interests: 2\n    days: 73000\n")
    rc = main(["features", "build", "--out", str(tmp_path / "f"), "--config", str(tmp_path / "c.yaml"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
