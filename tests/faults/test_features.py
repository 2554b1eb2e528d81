"""Faults of the feature jobs (`features build`, `features match`, `data
describe`): outputs that overlap inputs, timestamps in the wrong unit, odd id
dtypes and encodings, shard layouts, censored LT labels, kill-and-rerun and
concurrent runs. Each case checks the exit status, the message (file, column,
row where they apply) and that nothing (or the old output) is under the final
name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import schemas as S
from features.core.manifest import read_manifest
from features.core.fingerprint import file_fingerprint
from tests.faults.conftest import snapshot, write_tiny_dataset

LABEL_COLUMNS = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, S.SPLIT, S.DAY, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED]
MATCH_YAML = "match:\n  faiss_k: 5\n  sid_codebook_size: 4\n  sid_niter: 2\n  shards: 2\n  top_k: [2]\n"


def build(cli, data, out, *extra):
    return cli("features", "build", "--source", "files", "--interactions", data.interactions, "--out", out, "--quiet", *extra)


def no_output(out: Path) -> bool:
    """Nothing a reader would trust under the final name, and no temp folder."""
    temps = [p for p in out.parent.glob(f".{out.name}.tmp-*")]
    return not (out / "manifest.json").exists() and not temps


@pytest.fixture
def features_dir(cli, tiny_dataset, tmp_path):
    out = tmp_path / "features"
    rc, _, err = build(cli, tiny_dataset, out, "--items", tiny_dataset.items)
    assert rc == 0, err
    return out


@pytest.fixture
def embeddings(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "emb.parquet"
    pl.DataFrame(
        {
            "item_id": pl.Series(np.arange(1, 31), dtype=pl.Int64),
            "embedding": pl.Series(rng.standard_normal((30, 8)).tolist(), dtype=pl.List(pl.Float32)),
        }
    ).write_parquet(path)
    return path


@pytest.fixture
def match_config(tmp_path):
    path = tmp_path / "match.yaml"
    path.write_text(MATCH_YAML)
    return path


# --- outputs that overlap inputs ------------------------------------------------


@pytest.mark.parametrize("where", ["data-dir", "interactions-file", "inside-input-file", "symlink-to-data-dir"])
def test_build_out_overlapping_an_input_is_refused_and_inputs_untouched(cli, tiny_dataset, tmp_path, where):
    d = tiny_dataset.dir
    out = {
        "data-dir": d,
        "interactions-file": tiny_dataset.interactions,
        "inside-input-file": tiny_dataset.interactions / "x",
    }.get(where)
    if where == "symlink-to-data-dir":
        out = tmp_path / "link"
        out.symlink_to(d)
    before = snapshot(d)
    rc, _, err = cli(
        "features", "build", "--source", "files", "--interactions", tiny_dataset.interactions,
        "--items", tiny_dataset.items, "--out", out,
    )
    assert rc == 2, err
    assert "--out" in err and "input --interactions" in err
    assert snapshot(d) == before
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_build_out_equal_to_the_config_file_is_refused(cli, tiny_dataset, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("features:\n  label_threshold: 3\n")
    before = cfg.read_bytes()
    rc, _, err = build(cli, tiny_dataset, cfg, "--config", cfg)
    assert rc == 2 and "input --config" in err and "c.yaml" in err
    assert cfg.read_bytes() == before


def test_build_out_existing_file_fails_before_any_work(cli, tiny_dataset, tmp_path, monkeypatch):
    import features.jobs.build as jobs

    def never(*_a, **_k):
        raise AssertionError("the source was loaded before the output was checked")

    monkeypatch.setattr(jobs, "load_source", never)
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    rc, _, err = build(cli, tiny_dataset, out)
    assert rc == 2 and "out.txt" in err and "existing file" in err
    assert out.read_text() == "keep me"
    assert not list(tmp_path.glob(".out.txt.tmp-*"))


def test_library_build_refuses_an_out_containing_its_inputs(tiny_dataset):
    from features.core.errors import UsageError
    from features.jobs import FeaturesConfig, build_features

    before = snapshot(tiny_dataset.dir)
    cfg = FeaturesConfig(source="files", interactions=str(tiny_dataset.interactions), items=str(tiny_dataset.items))
    with pytest.raises(UsageError, match="contains input interactions"):
        build_features(cfg, tiny_dataset.dir, log=lambda _m: None)
    assert snapshot(tiny_dataset.dir) == before


@pytest.mark.parametrize("target", ["features", "inside-features", "embeddings"])
def test_match_out_overlapping_an_input_is_refused(cli, features_dir, embeddings, match_config, target):
    out = {"features": features_dir, "inside-features": features_dir / "m", "embeddings": embeddings}[target]
    before_f, before_e = snapshot(features_dir), file_fingerprint(embeddings)
    rc, _, err = cli(
        "features", "match", "--features", features_dir, "--embeddings", embeddings, "--out", out,
        "--config", match_config, "--quiet",
    )
    assert rc == 2, err
    assert "--out" in err and ("input --features" in err or "input --embeddings" in err)
    assert snapshot(features_dir) == before_f and file_fingerprint(embeddings) == before_e
    assert read_manifest(features_dir)["job"] == "features.build"


# --- timestamps -------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "unit"), [(1000, "ms"), (10**6, "us"), (10**9, "ns")])
def test_timestamps_in_a_finer_unit_are_refused_naming_the_unit(cli, tmp_path, scale, unit):
    data = write_tiny_dataset(tmp_path / "data", timestamp_scale=scale)
    out = tmp_path / "out"
    rc, _, err = build(cli, data, out)
    assert rc == 1, err
    assert "interactions.parquet" in err and "'timestamp'" in err and "row" in err
    assert f"--timestamp-unit {unit}" in err
    assert no_output(out) and not out.exists()


def test_seconds_read_as_milliseconds_are_refused(cli, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    rc, _, err = build(cli, tiny_dataset, out, "--timestamp-unit", "ms")
    assert rc == 1 and "'timestamp'" in err and "January 1970" in err and "--timestamp-unit s" in err
    assert not out.exists()


@pytest.mark.parametrize("unit", ["ms", "ns"])
def test_timestamp_unit_gives_the_labels_of_the_same_data_in_seconds(cli, tmp_path, unit):
    scale = {"ms": 1000, "ns": 10**9}[unit]
    secs = write_tiny_dataset(tmp_path / "s")
    fine = write_tiny_dataset(tmp_path / unit, timestamp_scale=scale)
    assert build(cli, secs, tmp_path / "out_s").rc == 0
    rc, _, err = build(cli, fine, tmp_path / "out_f", "--timestamp-unit", unit)
    assert rc == 0, err
    a = pl.read_parquet(tmp_path / "out_s" / "interactions.parquet")
    b = pl.read_parquet(tmp_path / "out_f" / "interactions.parquet")
    assert a.select(LABEL_COLUMNS).equals(b.select(LABEL_COLUMNS))
    assert a[S.RETURNED_1D].sum() > 0  # the comparison is not between two all-zero columns


def test_datetime_timestamps_are_read_as_seconds(cli, tiny_dataset, tmp_path):
    inter = pl.read_parquet(tiny_dataset.interactions)
    dt = tmp_path / "dt.parquet"
    inter.with_columns(pl.from_epoch(S.TIMESTAMP, time_unit="s").dt.replace_time_zone("UTC")).write_parquet(dt)
    assert build(cli, tiny_dataset, tmp_path / "a").rc == 0
    rc, _, err = cli("features", "build", "--source", "files", "--interactions", dt, "--out", tmp_path / "b", "--quiet")
    assert rc == 0, err
    a, b = (pl.read_parquet(tmp_path / x / "interactions.parquet").select(LABEL_COLUMNS) for x in "ab")
    assert a.equals(b)


def test_timestamp_unit_on_a_source_in_seconds_is_a_usage_error(cli, tmp_path):
    rc, _, err = cli("features", "build", "--source", "synthetic", "--users", "5", "--timestamp-unit", "ms", "--out", tmp_path / "o")
    assert rc == 2 and "timestamp_unit" in err and "files source only" in err
    assert not (tmp_path / "o").exists()


# --- ids and encodings ------------------------------------------------------------


def test_uint64_ids_that_fit_are_accepted(cli, tiny_dataset, tmp_path):
    u64 = tmp_path / "u64.parquet"
    pl.read_parquet(tiny_dataset.interactions).with_columns(
        pl.col(S.USER_ID, S.ITEM_ID, S.TIMESTAMP).cast(pl.UInt64)
    ).write_parquet(u64)
    assert build(cli, tiny_dataset, tmp_path / "a").rc == 0
    rc, _, err = cli("features", "build", "--source", "files", "--interactions", u64, "--out", tmp_path / "b", "--quiet")
    assert rc == 0, err
    a, b = (pl.read_parquet(tmp_path / x / "interactions.parquet") for x in "ab")
    assert a.equals(b) and b.schema[S.USER_ID] == pl.Int64


def test_uint64_id_beyond_int64_names_its_row(cli, tmp_path):
    p = tmp_path / "big.parquet"
    pl.DataFrame(
        {
            S.USER_ID: pl.Series([1, 2**63 + 5, 3], dtype=pl.UInt64),
            S.ITEM_ID: pl.Series([1, 2, 3], dtype=pl.UInt64),
            S.TIMESTAMP: [1_600_000_000, 1_600_000_100, 1_600_000_200],
            S.RATING: [5.0, 4.0, 3.0],
        }
    ).write_parquet(p)
    out = tmp_path / "out"
    rc, _, err = cli("features", "build", "--source", "files", "--interactions", p, "--out", out)
    assert rc == 1 and "big.parquet" in err and "'user_id'" in err and "row 2" in err and "Int64" in err
    assert not out.exists()


@pytest.mark.parametrize("which", ["interactions", "items"])
def test_non_utf8_csv_names_the_file_and_line(cli, tmp_path, which):
    data = write_tiny_dataset(tmp_path / "data", fmt="csv")
    target = data.interactions if which == "interactions" else data.items
    lines = target.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"1", b"\xe9", 1) if which == "interactions" else lines[3] + b" caf\xe9"
    target.write_bytes(b"\n".join(lines))
    out = tmp_path / "out"
    rc, _, err = build(cli, data, out, "--items", data.items)
    assert rc == 1, err
    assert target.name in err and "not UTF-8" in err and "line 4" in err
    assert not out.exists()


def test_csv_header_naming_a_column_twice_is_refused(cli, tmp_path):
    p = tmp_path / "events.csv"
    p.write_text("user_id,item_id,timestamp,rating,rating\n1,10,1600000000,5,1\n")
    out = tmp_path / "out"
    rc, _, err = cli("features", "build", "--source", "files", "--interactions", p, "--out", out)
    assert rc == 1 and "events.csv" in err and "'rating'" in err and "more than once" in err
    assert not out.exists()


def test_csv_line_with_extra_fields_is_named(cli, tmp_path):
    p = tmp_path / "events.csv"
    p.write_text("user_id,item_id,timestamp,rating\n1,10,1600000000,5\n2,11,1600000100,4\n3,12,1600000200,4,9\n")
    out = tmp_path / "out"
    rc, _, err = cli("features", "build", "--source", "files", "--interactions", p, "--out", out)
    assert rc == 1 and "events.csv" in err and "line 4" in err and "more fields" in err
    assert not out.exists()


def test_boolean_label_column_is_accepted(cli, tiny_dataset, tmp_path):
    inter = pl.read_parquet(tiny_dataset.interactions)
    p = tmp_path / "bool.parquet"
    inter.with_columns((pl.col(S.RATING) >= 4).alias(S.LABEL)).drop(S.RATING).write_parquet(p)
    rc, _, err = cli("features", "build", "--source", "files", "--interactions", p, "--out", tmp_path / "b", "--quiet")
    assert rc == 0, err
    assert build(cli, tiny_dataset, tmp_path / "a").rc == 0
    a, b = (pl.read_parquet(tmp_path / x / "interactions.parquet")[S.LABEL] for x in "ab")
    assert a.equals(b) and a.sum() > 0


def test_describe_of_a_damaged_features_folder_names_the_file(cli, features_dir):
    (features_dir / "sequences.parquet").write_bytes(b"PAR1 not really")
    rc, _, err = cli("data", "describe", "--features", features_dir)
    assert rc == 1 and "sequences.parquet" in err and "--force" in err


# --- config values ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_label_threshold_is_a_usage_error(cli, tiny_dataset, tmp_path, value):
    out = tmp_path / "out"
    rc, _, err = build(cli, tiny_dataset, out, f"--label-threshold={value}")
    assert rc == 2 and "label_threshold" in err and "finite" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("yaml", "needle"),
    [
        ("features:\n  test_frac: 0\n", "test_frac must be > 0"),
        ("features:\n  day_offset_s: 90000\n", "day_offset_s must be within one day (-86400, 86400), got 90000"),
        ("features:\n  timestamp_unit: minutes\n", "timestamp_unit: expected one of"),
        ("features:\n  valid_frac: 0.6\n  test_frac: 0.5\n", "got valid_frac 0.6, test_frac 0.5"),
        ("features:\n  synthetic:\n    users: 0\n", "users must be >= 1, got 0"),
    ],
    ids=["test-frac-0", "day-offset-range", "unknown-unit", "fracs-sum", "synthetic-users"],
)
def test_impossible_feature_config_is_a_usage_error(cli, tiny_dataset, tmp_path, yaml, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml)
    out = tmp_path / "out"
    rc, _, err = build(cli, tiny_dataset, out, "--config", cfg)
    assert rc == 2 and needle in err and "c.yaml" in err
    assert not out.exists()


# --- shards -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a/b", "3/2", "1/2/3", "-1/4", "0/0"])
def test_bad_shard_text_is_a_usage_error(cli, features_dir, embeddings, match_config, tmp_path, text):
    out = tmp_path / "m"
    rc, _, err = cli("features", "match", "--features", features_dir, "--embeddings", embeddings, "--out", out,
                     "--config", match_config, f"--shard={text}")
    assert rc == 2 and "--shard" in err and ("i/n" in err or "0 <= i < n" in err)
    assert not out.exists()


def test_shard_count_beyond_the_users_is_refused_fast(cli, features_dir, embeddings, match_config, tmp_path):
    out = tmp_path / "m"
    t0 = time.perf_counter()
    rc, _, err = cli("features", "match", "--features", features_dir, "--embeddings", embeddings, "--out", out,
                     "--config", match_config, "--shard", "1/999999999")
    assert rc == 2 and "999,999,999 shards for 20 users" in err and "at most 20" in err
    assert time.perf_counter() - t0 < 5
    assert not out.exists()


def test_merge_removes_shards_of_an_older_layout(cli, features_dir, embeddings, match_config, tmp_path):
    out = tmp_path / "m"
    args = ["features", "match", "--features", features_dir, "--embeddings", embeddings, "--out", out,
            "--config", match_config, "--quiet"]
    assert cli(*args, "--shard", "0/3").rc == 0  # a layout given up on
    assert (out / "shards" / "0000-of-0003").is_dir() and not (out / S.MATCH_FILE).exists()
    assert cli(*args, "--shard", "0/2").rc == 0
    assert cli(*args, "--shard", "1/2").rc == 0  # completes 2 shards: merged
    assert (out / S.MATCH_FILE).is_file()
    assert sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith(".")) == ["0000-of-0002", "0001-of-0002"]
    rc, _, err = cli(*args, "--force")  # unsharded: its parts and the old ones go
    assert rc == 0, err
    assert not (out / "shards").exists()
    rows = pl.read_parquet(out / S.MATCH_FILE).height
    assert rows == pl.read_parquet(features_dir / "interactions.parquet").height


# --- labels and splits ------------------------------------------------------------


def _brute_lt(inter: pl.DataFrame, limit_of) -> pl.DataFrame:
    """LT labels by definition, one row at a time: days of the user's events
    in (day, min(day + 7, limit)] where limit = limit_of(row)."""
    by_user: dict[int, set[int]] = {}
    for u, d in inter.select(S.USER_ID, S.DAY).iter_rows():
        by_user.setdefault(u, set()).add(d)
    out = []
    for row in inter.iter_rows(named=True):
        lim = limit_of(row)
        horizon = min(row[S.DAY] + 7, lim)
        days = by_user[row[S.USER_ID]]
        out.append(
            (
                int(row[S.DAY] + 1 in days and row[S.DAY] + 1 <= horizon),
                sum(1 for d in days if row[S.DAY] < d <= horizon),
                row[S.DAY] + 7 <= lim,
            )
        )
    return pl.DataFrame(out, schema=[S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED], orient="row")


def test_global_time_lt_labels_never_look_past_their_split_cutoff(cli, tmp_path):
    data = write_tiny_dataset(tmp_path / "data", users=30, events_per_user=20, days=40, seed=3)
    assert build(cli, data, tmp_path / "f").rc == 0
    inter = pl.read_parquet(tmp_path / "f" / "interactions.parquet")
    first_day = {s: inter.filter(pl.col(S.SPLIT) == s)[S.DAY].min() for s in ("valid", "test")}
    last_full = inter[S.DAY].max() - 1
    limits = {"train": first_day["valid"] - 1, "valid": first_day["test"] - 1, "test": last_full}
    want = _brute_lt(inter, lambda r: limits[r[S.SPLIT]])
    got = inter.select(S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED).cast(want.schema)
    assert got.equals(want)
    # the censoring bites on this data: some train rows would see valid days
    train = inter.filter(pl.col(S.SPLIT) == "train")
    assert (train[S.DAY] + 7 >= first_day["valid"]).any()
    assert not train.filter(pl.col(S.DAY) + 7 >= first_day["valid"])[S.LT_OBSERVED].any()
    assert inter[S.LT_OBSERVED].any() and inter[S.RETURNED_1D].sum() > 0


def test_leave_last_out_test_labels_are_not_observed(cli, tiny_dataset, tmp_path):
    assert build(cli, tiny_dataset, tmp_path / "f", "--split", "leave_last_out").rc == 0
    inter = pl.read_parquet(tmp_path / "f" / "interactions.parquet")
    held_out = inter.filter(pl.col(S.SPLIT) != "train")
    assert held_out.height == 40 and not held_out[S.LT_OBSERVED].any()
    first_held = dict(held_out.group_by(S.USER_ID).agg(pl.col(S.DAY).min()).iter_rows())
    train = inter.filter(pl.col(S.SPLIT) == "train")
    want = _brute_lt(train, lambda r: first_held[r[S.USER_ID]] - 1)
    assert train.select(S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED).cast(want.schema).equals(want)
    assert train[S.LT_OBSERVED].any()


def test_day_offset_default_per_source_and_describe_shows_both_rates(cli, tiny_dataset, tmp_path):
    from features.jobs import FeaturesConfig

    assert FeaturesConfig().day_offset == -36_000  # movielens100k: US data
    assert FeaturesConfig(source="synthetic").day_offset == 0
    assert FeaturesConfig(source="synthetic", day_offset_s=3600).day_offset == 3600
    assert build(cli, tiny_dataset, tmp_path / "f", "--day-offset-s", "-21600").rc == 0
    inter = pl.read_parquet(tmp_path / "f" / "interactions.parquet")
    assert (inter[S.DAY] == (inter[S.TIMESTAMP] - 21600) // 86400).all()
    rc, out, err = cli("data", "describe", "--features", tmp_path / "f", "--json")
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["day_offset_s"] == -21600
    assert set(stats["next_day_return_rate_by_day_offset_s"]) == {"0", "-21600"}
    rc, table, _ = cli("data", "describe", "--features", tmp_path / "f")
    # days turn over where t - 21600 is a multiple of a day: at 06:00 UTC (until 2026-12-01 the table said
    # "UTC midnight -6 h", 18:00 the day before: the sign was the opposite of the formula's)
    assert "06:00 UTC: local midnight at UTC-6 h" in table and "days from 00:00 UTC" in table and "days from 06:00 UTC" in table
    # build flags beside --features were ignored (exit 0, the folder's numbers): refused
    for flags in (["--day-offset-s", "0"], ["--label-threshold", "5", "--split", "leave_last_out"]):
        rc, _, err = cli("data", "describe", "--features", tmp_path / "f", *flags)
        assert rc == 2 and "would be ignored" in err and all(f in err for f in flags if f.startswith("--"))


# --- kill and rerun, concurrent runs ----------------------------------------------

SYNTH = ["--source", "synthetic", "--users", "3000", "--max-events", "200", "--seed", "1", "--quiet"]


def _recsys(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "recsys.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _tables(folder: Path) -> dict[str, pl.DataFrame]:
    return {n: pl.read_parquet(folder / n) for n in ("interactions.parquet", "sequences.parquet", "items.parquet")}


def _consistent(folder: Path) -> bool:
    m = read_manifest(folder)
    return m is not None and all(file_fingerprint(folder / n) == info["fingerprint"] for n, info in m["outputs"].items())


@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory):
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig

    out = tmp_path_factory.mktemp("ref") / "f"
    cfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=3000, max_events=200, seed=1))
    build_features(cfg, out, log=lambda _m: None)
    return _tables(out)


def test_killed_build_leaves_no_output_and_a_rerun_is_identical(tmp_path, synthetic_reference):
    out = tmp_path / "f"
    proc = _recsys("features", "build", *SYNTH, "--out", str(out))
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if list(tmp_path.glob(".f.tmp-*")):  # writing has begun
            break
        time.sleep(0.002)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL) if killed else None
    proc.wait()
    assert killed, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()  # nothing a reader would trust
    assert list(tmp_path.glob(".f.tmp-*"))  # the killed run's temp folder is left ...
    rerun = _recsys("features", "build", *SYNTH, "--out", str(out))
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    assert not list(tmp_path.glob(".f.tmp-*"))  # ... and cleaned by the next run
    assert _consistent(out)
    got = _tables(out)
    assert all(got[n].equals(synthetic_reference[n]) for n in got)


def test_two_concurrent_builds_on_one_out_give_one_complete_output(tmp_path, synthetic_reference):
    out = tmp_path / "f"
    procs = [_recsys("features", "build", *SYNTH, "--out", str(out)) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert _consistent(out)
    got = _tables(out)
    assert all(got[n].equals(synthetic_reference[n]) for n in got)
    assert not list(tmp_path.glob(".f.tmp-*"))
