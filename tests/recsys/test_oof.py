"""Out-of-fold match features (match.folds >= 2): train rows come from
students that never saw their user's rows; valid and test rows are in-sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import schemas as S
from features.match.space import stable_shard
from recsys.config import load_pipeline_config
from recsys.plan import plan_distill, plan_features, plan_match
from recsys.stages import run_distill, run_features, run_match

DEBUG = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "debug.yaml"


@pytest.fixture(scope="module")
def oof_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oof")
    cfg = load_pipeline_config(DEBUG, {"match": {"folds": 2}, "tracking": {"enabled": False}})
    feats = run_features(plan_features(cfg), None, root / "features", log=lambda _m: None).out
    dist = run_distill(plan_distill(cfg, features=feats, ablations=False), None, root / "distill", log=lambda _m: None)
    job = plan_match(cfg, features=feats, embeddings=dist.out / "item_embeddings.parquet")
    assert job.oof is not None and job.oof.ablations is False
    res = run_match(job, None, root / "match", log=lambda _m: None, progress=False)
    return root, feats, res


def test_train_rows_come_from_the_fold_students(oof_run):
    root, feats, res = oof_run
    final = pl.read_parquet(root / "match" / S.MATCH_FILE)
    full = pl.read_parquet(root / "match" / "full" / S.MATCH_FILE)
    split = pl.read_parquet(feats / S.FILES["interactions"], columns=[*S.MATCH_KEYS, S.SPLIT])
    assert final.select(S.MATCH_KEYS).equals(full.select(S.MATCH_KEYS))  # same rows, same order
    mf = [c for c in final.columns if c.startswith(S.MATCH_PREFIX)]
    is_train = (split[S.SPLIT] == "train").to_numpy()
    a, b = final.select(mf).to_numpy(), full.select(mf).to_numpy()
    np.testing.assert_array_equal(a[~is_train], b[~is_train])  # valid and test: the all-of-train student
    cos = mf.index("mf_cos_mean")
    both = is_train & np.isfinite(a[:, cos]) & np.isfinite(b[:, cos])
    assert both.any() and not np.allclose(a[both, cos], b[both, cos])  # train: other students
    assert res.manifest["folds"] == 2 and res.manifest["train_rows_out_of_fold"] == int(is_train.sum())
    assert {"full_match_s", "fold0_distill_s", "fold1_match_s", "total_s"} <= set(res.manifest["seconds"])


def test_a_fold_student_never_sees_its_fold(oof_run):
    root, feats, _ = oof_run
    users = pl.read_parquet(feats / S.FILES["interactions"])[S.USER_ID].unique().to_numpy()
    items = pl.read_parquet(feats / S.FILES["items"])
    for k in range(2):
        view = root / "match" / "folds" / f"k{k}" / "features"
        seen = pl.read_parquet(view / S.FILES["interactions"])[S.USER_ID].unique().to_numpy()
        seq = pl.read_parquet(view / S.FILES["sequences"])[S.USER_ID].unique().to_numpy()
        fold_users = users[stable_shard(users, 2) == k]
        assert len(fold_users) and not np.isin(fold_users, seen).any() and not np.isin(fold_users, seq).any()
        # every item still embedded, with the whole data's counts: the fold students hide the same items
        assert pl.read_parquet(view / S.FILES["items"]).equals(items)


def test_rerun_is_skipped(oof_run, tmp_path):
    root, feats, _ = oof_run
    cfg = load_pipeline_config(DEBUG, {"match": {"folds": 2}, "tracking": {"enabled": False}})
    job = plan_match(cfg, features=feats, embeddings=root / "distill" / "item_embeddings.parquet")
    assert run_match(job, None, root / "match", log=lambda _m: None, progress=False).reused


def test_an_out_of_fold_folder_is_refused_with_other_features(oof_run, tmp_path):
    # its manifest keys on the features folder, not on interactions.parquet: the check that refuses an
    # in-sample match folder built on other features skipped it (a probe trained LightGBM that way)
    from features.core.errors import DataError
    from features.reader import check_match_upstream

    root, feats, _ = oof_run
    check_match_upstream(root / "match" / S.MATCH_FILE, feats)  # its own features: fine
    cfg = load_pipeline_config(DEBUG, {"features": {"label_threshold": 3.0}, "tracking": {"enabled": False}})
    other = run_features(plan_features(cfg), None, tmp_path / "other", log=lambda _m: None).out
    with pytest.raises(DataError, match="built from other features than"):
        check_match_upstream(root / "match" / S.MATCH_FILE, other)


def test_more_folds_than_users_is_refused_before_any_work(oof_run, tmp_path):
    # it failed after the in-sample match and a fold's distillation, blaming --shard
    from features.core.errors import UsageError

    root, feats, _ = oof_run
    users = pl.read_parquet(feats / S.FILES["sequences"]).height
    cfg = load_pipeline_config(DEBUG, {"match": {"folds": users + 1}, "tracking": {"enabled": False}})
    job = plan_match(cfg, features=feats, embeddings=root / "distill" / "item_embeddings.parquet")
    with pytest.raises(UsageError, match=rf"match.folds \(--folds\) {users + 1}: more folds than the"):
        run_match(job, None, tmp_path / "m", log=lambda _m: None, progress=False)
    assert not (tmp_path / "m").exists()


def test_fewer_folds_into_the_same_folder_remove_the_stale_folds(oof_run, tmp_path):
    import shutil

    root, feats, _ = oof_run
    out = tmp_path / "match"
    shutil.copytree(root / "match", out)
    (out / "folds" / "k2").mkdir()  # as an earlier --folds 3 run leaves it
    cfg = load_pipeline_config(DEBUG, {"match": {"folds": 2}, "tracking": {"enabled": False}})
    job = plan_match(cfg, features=feats, embeddings=root / "distill" / "item_embeddings.parquet")
    run_match(job, None, out, log=lambda _m: None, progress=False, force=True)
    assert sorted(p.name for p in (out / "folds").iterdir()) == ["k0", "k1"]


def test_embeddings_of_another_student_are_refused(oof_run, tmp_path):
    """Before (2026-12-01) --folds took any embeddings: valid/test rows then
    came from one student, train rows from fold students of another config."""
    import json
    import shutil

    from features.core.errors import UsageError
    from recsys.oof import check_embeddings_provenance

    root, feats, _ = oof_run
    emb = root / "distill" / "item_embeddings.parquet"
    plan = lambda over, e=emb: plan_match(  # noqa: E731
        load_pipeline_config(DEBUG, {"match": {"folds": 2}, "tracking": {"enabled": False}, **over}), features=feats, embeddings=e)
    said: list[str] = []
    check_embeddings_provenance(plan({}), said.append)  # its own config: fine, silent
    check_embeddings_provenance(plan({"seed": 7}), said.append)  # another seed: same student recipe
    check_embeddings_provenance(plan({"distill": {"progress": False}}), said.append)  # an eval-only key
    assert said == []
    with pytest.raises(UsageError, match=r"distill\.w_id2i: 3\.0, the config says 1\.0"):
        check_embeddings_provenance(plan({"distill": {"w_id2i": 1.0}}))
    with pytest.raises(UsageError, match=r"teachers\.id2item\.epochs: 3, the config says 9"):
        check_embeddings_provenance(plan({"teachers": {"id2item": {"epochs": 9}}}))
    # a file of your own (no manifest beside it): a warning, not a refusal
    own = tmp_path / "own" / "vectors.parquet"
    own.parent.mkdir()
    shutil.copyfile(emb, own)
    check_embeddings_provenance(plan({}, own), said.append)
    assert len(said) == 1 and "cannot check" in said[0]
    # `distill train`'s embeddings: every item trained on, unlike the fold students
    copied = tmp_path / "train"
    shutil.copytree(root / "distill", copied, ignore=shutil.ignore_patterns("teachers", "student"))
    manifest = json.loads((copied / "manifest.json").read_text())
    (copied / "manifest.json").write_text(json.dumps(manifest | {"job": "distill.train"}))
    with pytest.raises(UsageError, match="came from `recsys distill train`"):
        check_embeddings_provenance(plan({}, copied / "item_embeddings.parquet"))
