"""The feature build end to end on MovieLens-100K and synthetic data."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from features import schemas as S
from features.jobs import FeaturesConfig, build_features, describe
from features.sources import SyntheticConfig

CONTRACT_COLUMNS = {"user_id", "item_id", "timestamp", "label", "split", "returned_1d", "active_days_7", "cold_item"}


def test_ml100k_contract_and_split_sizes(ml100k_features):
    inter = pl.read_parquet(ml100k_features / "interactions.parquet")
    assert CONTRACT_COLUMNS <= set(inter.columns)
    assert inter.height == 100_000
    sizes = dict(inter.group_by(S.SPLIT).len().iter_rows())
    assert sizes == {"train": 80_000, "valid": 10_000, "test": 10_000}
    # the peer protocol (NOTES.md): 166 test users; the NOTES figure of ~15% for
    # next-day return holds on UTC days; ML-100K days start at 04:00 US Central
    # (the -36000 s day offset), where a session crossing midnight no longer counts as a return
    assert inter.filter(pl.col(S.SPLIT) == "test")[S.USER_ID].n_unique() == 166
    rate = inter.filter(pl.col(S.LT_OBSERVED))[S.RETURNED_1D].mean()
    assert 0.11 < rate < 0.15
    by_offset = describe(ml100k_features)["next_day_return_rate_by_day_offset_s"]
    assert 0.14 < by_offset["0"] < 0.16 and 0.11 < by_offset["-36000"] < 0.14
    items = pl.read_parquet(ml100k_features / "items.parquet")
    assert items.height == 1682 and items[S.TEXT].null_count() == 0
    assert set(S.INTERACTIONS_SCHEMA.names()) - {S.EVENT_IDX} == set(inter.columns)


def _window_bounds(inter: pl.DataFrame, seqs: pl.DataFrame, ts_col: str, end_col: str, len_col: str) -> pl.DataFrame:
    """Per impression: first/last timestamp inside its history window and the
    first timestamp after it (sequences are time-sorted: checked here)."""
    assert seqs.select((pl.col(ts_col).list.eval(pl.element().diff().min()).list.first().fill_null(0) >= 0).all()).item()
    joined = inter.join(seqs.select(S.USER_ID, ts_col), on=S.USER_ID)
    return joined.with_columns(
        pl.col(ts_col).list.get(pl.col(end_col) - pl.col(len_col), null_on_oob=True).alias("first_h"),
        pl.col(ts_col).list.get(pl.col(end_col) - 1, null_on_oob=True).alias("last_h"),
        pl.col(ts_col).list.get(pl.col(end_col), null_on_oob=True).alias("next_h"),
    ).with_columns(
        pl.when(pl.col(len_col) > 0).then(pl.col("first_h")),
        pl.when(pl.col(end_col) > 0).then(pl.col("last_h")),
    )


def test_no_leakage_histories_strictly_earlier(ml100k_features):
    inter = pl.read_parquet(ml100k_features / "interactions.parquet")
    seqs = pl.read_parquet(ml100k_features / "sequences.parquet")
    b = _window_bounds(inter, seqs, S.TIMESTAMPS, S.HIST_END, S.HIST_LEN)
    # every history event precedes its impression (the window's last one does)
    assert (b["last_h"].drop_nulls() < b.filter(pl.col("last_h").is_not_null())[S.TIMESTAMP]).all()
    # and the history is complete: the next event of the user is not earlier
    nxt = b.filter(pl.col("next_h").is_not_null())
    assert (nxt["next_h"] >= nxt[S.TIMESTAMP]).all()
    # no valid/test-period event feeds a train impression's history
    first_non_train = inter.filter(pl.col(S.SPLIT) != "train")[S.TIMESTAMP].min()
    assert (b.filter(pl.col(S.SPLIT) == "train")["last_h"].drop_nulls() <= first_non_train).all()
    # brute force on a sample of users: hist_end == #events strictly earlier
    sample = inter.filter(pl.col(S.USER_ID) < 60)
    counts = (
        sample.join(sample.select(S.USER_ID, pl.col(S.TIMESTAMP).alias("t2")), on=S.USER_ID)
        .filter(pl.col("t2") < pl.col(S.TIMESTAMP))
        .group_by(S.USER_ID, S.ITEM_ID, S.TIMESTAMP)
        .len()
    )
    check = sample.join(counts, on=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP], how="left").with_columns(pl.col("len").fill_null(0))
    assert (check["len"] == check[S.HIST_END]).all()


def test_train_features_never_see_future_positives(ml100k_features):
    inter = pl.read_parquet(ml100k_features / "interactions.parquet")
    seqs = pl.read_parquet(ml100k_features / "sequences.parquet")
    b = _window_bounds(inter, seqs, S.POS_TIMESTAMPS, S.POS_HIST_END, S.POS_HIST_LEN)
    has = b.filter(pl.col("last_h").is_not_null())
    assert (has["last_h"] < has[S.TIMESTAMP]).all()
    nxt = b.filter(pl.col("next_h").is_not_null())
    assert (nxt["next_h"] >= nxt[S.TIMESTAMP]).all()


def test_cold_items_have_no_train_events(ml100k_features):
    inter = pl.read_parquet(ml100k_features / "interactions.parquet")
    train_items = set(inter.filter(pl.col(S.SPLIT) == "train")[S.ITEM_ID].to_list())
    cold = inter.filter(pl.col(S.COLD_ITEM))
    assert cold.height > 0
    assert not (set(cold[S.ITEM_ID].to_list()) & train_items)
    assert (inter.filter(~pl.col(S.COLD_ITEM))[S.ITEM_ID].is_in(list(train_items))).all()


def test_rerun_skips_and_config_change_rebuilds(tmp_path):
    logs = []
    build_features(FeaturesConfig(), tmp_path / "f", log=logs.append)
    mtime = (tmp_path / "f" / "interactions.parquet").stat().st_mtime_ns
    r = build_features(FeaturesConfig(), tmp_path / "f", log=logs.append)
    assert r.skipped and "up to date" in logs[-1]
    assert (tmp_path / "f" / "interactions.parquet").stat().st_mtime_ns == mtime
    r = build_features(FeaturesConfig(label_threshold=5.0), tmp_path / "f", log=logs.append)
    assert not r.skipped
    inter = pl.read_parquet(tmp_path / "f" / "interactions.parquet")
    assert inter[S.LABEL].mean() < 0.3
    # a damaged output is detected and rebuilt
    (tmp_path / "f" / "items.parquet").write_bytes(b"junk")
    assert not build_features(FeaturesConfig(label_threshold=5.0), tmp_path / "f", log=logs.append).skipped


def test_manifest_fields(ml100k_features):
    m = json.loads((ml100k_features / "manifest.json").read_text())
    assert m["job"] == "features.build"
    assert {"stage", "params_hash", "code_hash", "upstream"} <= set(m["key"])
    assert m["outputs"]["interactions.parquet"]["rows"] == 100_000
    assert len(m["outputs"]["interactions.parquet"]["fingerprint"]) == 32
    assert "user_id" in m["outputs"]["interactions.parquet"]["schema"]
    assert m["item_fields"]["multi"] == ["genres"]


def test_failed_build_leaves_previous_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "f"
    build_features(FeaturesConfig(), out, log=lambda _m: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    import features.jobs.build as jobs

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(jobs, "write_manifest", boom)
    with pytest.raises(RuntimeError):
        build_features(FeaturesConfig(label_threshold=3.0), out, log=lambda _m: None)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert before == after
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


def test_synthetic_is_deterministic_and_long(tmp_path):
    cfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=3, items=50, max_events=3000, min_events=2500, seed=7))
    a = build_features(cfg, tmp_path / "a", log=lambda _m: None)
    b = build_features(cfg, tmp_path / "b", log=lambda _m: None)
    fa = a.manifest["outputs"]["interactions.parquet"]["fingerprint"]
    assert fa == b.manifest["outputs"]["interactions.parquet"]["fingerprint"]
    seqs = pl.read_parquet(tmp_path / "a" / "sequences.parquet")
    assert seqs[S.ITEM_IDS].list.len().min() >= 2000  # a few same-second repeats are dropped
    other = build_features(
        FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=3, items=50, max_events=3000, min_events=2500, seed=8)),
        tmp_path / "c",
        log=lambda _m: None,
    )
    assert other.manifest["outputs"]["interactions.parquet"]["fingerprint"] != fa


def test_synthetic_has_popularity_skew_and_balanced_labels(synthetic_features):
    inter = pl.read_parquet(synthetic_features / "interactions.parquet")
    counts = inter.group_by(S.ITEM_ID).len().sort("len", descending=True)["len"].to_numpy()
    top = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top > 0.3  # the top 10% of items draw well over 10% of events
    assert 0.3 < inter[S.LABEL].mean() < 0.75
    items = pl.read_parquet(synthetic_features / "items.parquet")
    assert {"category", "tags"} <= set(items.columns)


def test_describe_refuses_a_file_edited_after_the_build(synthetic_features, tmp_path):
    """It described the edited rows (events 100 where the build wrote 480) before 2026-11-30."""
    import shutil

    from features.core.errors import DataError

    f = tmp_path / "f"
    shutil.copytree(synthetic_features, f)
    pl.read_parquet(f / "interactions.parquet").head(100).write_parquet(f / "interactions.parquet")
    with pytest.raises(DataError, match="changed since `features.build` wrote it"):
        describe(f)


def test_describe_reports_splits(ml100k_features):
    stats = describe(ml100k_features)
    inter = pl.read_parquet(ml100k_features / "interactions.parquet")
    brute = dict(inter.group_by(S.SPLIT).agg(pl.col(S.USER_ID).n_unique()).iter_rows())
    assert {s["split"]: s["users"] for s in stats["splits"]} == brute
    assert stats["events"] == 100_000 and stats["users"] == 943
    assert [s["split"] for s in stats["splits"]] == ["train", "valid", "test"]
    assert abs(stats["cold_item_share"] - 65 / 1682) < 0.05


def test_leave_last_out_split(tmp_path):
    build_features(FeaturesConfig(split="leave_last_out"), tmp_path / "f", log=lambda _m: None)
    inter = pl.read_parquet(tmp_path / "f" / "interactions.parquet")
    per_user = inter.group_by(S.USER_ID, S.SPLIT).len()
    assert (per_user.filter(pl.col(S.SPLIT) != "train")["len"] == 1).all()
    assert inter.filter(pl.col(S.SPLIT) == "test").height == 943
    users = {s["split"]: s["users"] for s in describe(tmp_path / "f")["splits"]}
    assert users == dict(inter.group_by(S.SPLIT).agg(pl.col(S.USER_ID).n_unique()).iter_rows())


def test_a_rebuild_removes_the_earlier_builds_outputs_it_does_not_write(tmp_path):
    """A synthetic build's users.parquet and planted_truth.parquet stayed beside
    a later files build into the same folder, and the ranker read the users
    (2026-11-30)."""
    from features.sources import SyntheticConfig

    out = tmp_path / "f"
    build_features(FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=30, items=40, max_events=30, seed=1)),
                   out, log=lambda _m: None)
    assert (out / "users.parquet").exists() and (out / "planted_truth.parquet").exists()
    (tmp_path / "ev.csv").write_text("user_id,item_id,timestamp,rating\n1,10,100,5\n1,11,200,3\n2,10,150,4\n2,12,300,1\n")
    build_features(FeaturesConfig(source="files", interactions=str(tmp_path / "ev.csv")), out, log=lambda _m: None)
    assert not (out / "users.parquet").exists() and not (out / "planted_truth.parquet").exists()


def test_source_specific_keys_are_refused_for_other_sources():
    from features.sources import SyntheticConfig

    with pytest.raises(ValueError, match="applies to the synthetic source only"):
        FeaturesConfig(source="movielens100k", synthetic=SyntheticConfig(users=100))
    with pytest.raises(ValueError, match="text_column applies to the files source only"):
        FeaturesConfig(source="movielens100k", text_column="title")


def test_describe_says_why_a_folder_is_not_a_features_folder(tmp_path):
    from features.core.errors import UsageError

    cases = {"does not exist": tmp_path / "absent", "no manifest.json": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    cases["manifest.json that is not valid JSON"] = broken
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"job": "features.match"}')
    cases["holds the output of 'features.match'"] = other
    for needle, folder in cases.items():
        with pytest.raises(UsageError, match=re.escape(needle)):
            describe(folder)


def test_the_api_takes_a_config_mapping_and_names_a_bad_one(tmp_path):
    # build_features({"source": ...}) once failed with "'dict' object has no attribute ..."
    from features import build_features as api_build
    from features.core.errors import ConfigError

    res = api_build({"source": "synthetic", "synthetic": {"users": 20, "items": 30, "max_events": 20}}, tmp_path / "f",
                    log=lambda _m: None)
    assert not res.skipped and (tmp_path / "f" / "interactions.parquet").is_file()
    with pytest.raises(ConfigError, match="did you mean 'source'"):
        api_build({"sourc": "synthetic"}, tmp_path / "g")
    with pytest.raises(TypeError, match="a FeaturesConfig or a mapping of its keys, got int"):
        api_build(5, tmp_path / "g")
    assert not (tmp_path / "g").exists()
