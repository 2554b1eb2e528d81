"""Sampled negatives look like real rows: items that exist at the request's
time, with match features from the match job's own step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features import schemas as S
from recsys.config import load_pipeline_config
from recsys.config.sections import DataConfig
from recsys.data import RankingData
from recsys.data.dense import ACTIVITY_FEATURES, COUNT_FEATURES, ITEM_POP_COLUMN
from recsys.plan import plan_distill, plan_features, plan_match
from recsys.stages import run_distill, run_features, run_match

DEBUG = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "debug.yaml"


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    root = tmp_path_factory.mktemp("neg")
    cfg = load_pipeline_config(DEBUG, {"tracking": {"enabled": False}})
    feats = run_features(plan_features(cfg), None, root / "features", log=lambda _m: None).out
    dist = run_distill(plan_distill(cfg, features=feats, ablations=False), None, root / "distill", log=lambda _m: None)
    run_match(plan_match(cfg, features=feats, embeddings=dist.out / "item_embeddings.parquet"), None, root / "match",
              log=lambda _m: None, progress=False)
    return feats, root / "match"


def _rows(data: RankingData, seed: int = 0):
    batch = data.batch(data.requests("train"), np.random.default_rng(seed))
    return batch.dense.numpy(), batch.sampled.numpy()


def test_sampled_rows_get_the_match_features_of_their_item(matched):
    feats, match = matched
    data = RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=2), match)
    dense, sampled = _rows(data)
    m, j = len(data.match_columns), len(COUNT_FEATURES) + len(ACTIVITY_FEATURES)
    flags = dense[:, j + m : j + 2 * m]
    assert sampled.sum() == 2 * len(data.requests("train"))
    # one rule for both kinds of row: a flag is set only where the value is null
    assert not flags[sampled].all()  # sampled rows are not "missing everywhere" any more
    # mf_hist_len is never null (0 for an empty history), on real and sampled rows alike
    hist = data.match_columns.index("mf_hist_len")
    assert not flags[:, hist].any()
    # the flag rates of the two kinds of row agree (the same rule: null iff no history / no vector)
    np.testing.assert_allclose(flags[sampled].mean(0), flags[~sampled].mean(0), atol=0.1)
    # the request-level features of a sampled row are its request's
    assert np.isfinite(dense[sampled]).all()


def test_a_classifier_cannot_tell_sampled_from_real_by_flags_and_request_features(matched):
    """Given the missing flags and the request-level (non-preference) features
    only, LightGBM separates sampled from real rows no better than AUC 0.55."""
    import lightgbm as lgb

    from recsys.eval.metrics import auc

    feats, match = matched
    data = RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=2), match)
    dense, sampled = _rows(data, seed=1)
    m, j = len(data.match_columns), len(COUNT_FEATURES) + len(ACTIVITY_FEATURES)
    request_cols = [c for c in range(j) if c != ITEM_POP_COLUMN]  # hist_len, pos_hist_len, recent activity
    x = np.concatenate([dense[:, request_cols], dense[:, j + m : j + 2 * m]], axis=1)
    half = np.random.default_rng(0).random(len(x)) < 0.5
    model = lgb.LGBMClassifier(n_estimators=60, num_leaves=15, verbose=-1, n_jobs=1)
    model.fit(x[half], sampled[half])
    assert auc(sampled[~half], model.predict_proba(x[~half])[:, 1]) <= 0.55


def test_sampled_items_exist_at_their_request_time(matched):
    import polars as pl

    feats, match = matched
    data = RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=3), match)
    first = dict(pl.read_parquet(feats / S.FILES["interactions"]).group_by(S.ITEM_ID).agg(pl.col(S.TIMESTAMP).min())
                 .iter_rows())
    reqs = data.requests("train")
    batch = data.batch(reqs, np.random.default_rng(2))
    ts = np.repeat(data.req_ts[reqs], batch.cand_lengths.numpy())
    items = data.item_ids[batch.sequence_features["cand_item"].values().numpy()]
    s = batch.sampled.numpy()
    assert all(first[i] <= t for i, t in zip(items[s], ts[s]))


@pytest.fixture(scope="module")
def matched_neg(matched):
    """The same features and student, match features with the negative history too."""
    import dataclasses

    feats, match = matched
    cfg = load_pipeline_config(DEBUG, {"tracking": {"enabled": False}, "match": {"negatives": True}})
    emb = match.parent / "distill" / "item_embeddings.parquet"
    out = match.parent / "match_neg"
    run_match(plan_match(cfg, features=feats, embeddings=emb), None, out, log=lambda _m: None, progress=False)
    assert dataclasses.is_dataclass(cfg.match) and cfg.match.negatives
    return feats, out


def test_sampled_rows_get_negative_history_features_by_the_same_rule(matched_neg):
    feats, match = matched_neg
    data = RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=2), match)
    assert {"mf_neg_cos_mean", "mf_neg_cos_max", "mf_neg_hist_len"} <= set(data.match_columns)
    dense, sampled = _rows(data)
    m, j = len(data.match_columns), len(COUNT_FEATURES) + len(ACTIVITY_FEATURES)
    flags = dense[:, j + m : j + 2 * m]
    neg = data.match_columns.index("mf_neg_cos_mean")
    assert 0 < flags[~sampled, neg].mean() < 1  # some real rows have a negative history, some not
    assert not flags[:, data.match_columns.index("mf_neg_hist_len")].any()
    np.testing.assert_allclose(flags[sampled].mean(0), flags[~sampled].mean(0), atol=0.1)


def test_sampled_negatives_read_the_embeddings_the_match_features_were_computed_from(matched, tmp_path, monkeypatch):
    """A probe (2026-12-01): the match manifest recorded the embeddings path as
    given (relative), so from another cwd another file there was read, and an
    embeddings file replaced in place (a later distill run) was read too:
    sampled negatives got other vectors than the real rows, exit 0."""
    import json
    import shutil

    from features.core.errors import DataError

    feats, match = matched
    manifest = json.loads((match / "manifest.json").read_text())
    emb = Path(manifest["upstream_files"]["embeddings"])
    assert emb.is_absolute() and Path(manifest["upstream_files"]["features"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # another working directory: same file, same pool
    RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=2), match)
    copy = tmp_path / "match"
    shutil.copytree(match, copy)
    swapped = tmp_path / "emb.parquet"
    import polars as pl

    frame = pl.read_parquet(emb)
    frame.with_columns(pl.col("embedding").shuffle(seed=1)).write_parquet(swapped)
    manifest["upstream_files"]["embeddings"] = str(swapped)  # as if replaced in place
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="have changed since: sampled negatives would be scored with other vectors"):
        RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=2), copy)


def test_a_reused_match_points_at_the_embeddings_it_was_given_and_oof_features_are_named(matched, tmp_path):
    """A verification probe (2026-12-01): embeddings moved to a new path (same
    bytes) left the match reused with the old path recorded, so negatives were
    refused and the advice to rerun `features match` skipped again; out-of-fold
    match features got the same advice, which could not work."""
    import json
    import shutil

    from features.core.errors import DataError

    feats, match = matched
    copy = tmp_path / "match"
    shutil.copytree(match, copy)
    old = Path(json.loads((copy / "manifest.json").read_text())["upstream_files"]["embeddings"])
    moved = tmp_path / "emb" / "item_embeddings.parquet"
    moved.parent.mkdir()
    shutil.copyfile(old, moved)
    cfg = load_pipeline_config(DEBUG, {"tracking": {"enabled": False}})
    res = run_match(plan_match(cfg, features=feats, embeddings=moved), None, copy, log=lambda _m: None, progress=False)
    assert res.reused
    assert json.loads((copy / "manifest.json").read_text())["upstream_files"]["embeddings"] == str(moved.resolve())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["job"] = "features.match.oof"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="these are out-of-fold match features"):
        RankingData.load(feats, DataConfig(use_match_features=True, negatives_per_request=2), copy)
