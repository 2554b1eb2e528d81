"""The Spark build's staged files of whole users, and the passes over them:
each user in one file, files in user_id ranges keeping the input order; a
step's results the same whether the workers read the files or get their
bytes from the JVM; the driver's sortedness check against a real sort."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from features import schemas as S
from features.validate import ROW


def events_frame(seed: int, n: int, users: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        S.USER_ID: rng.integers(0, users, n), S.ITEM_ID: rng.integers(0, 30, n),
        S.TIMESTAMP: rng.integers(0, 1000, n), ROW: np.arange(n, dtype=np.int64),
    })


@pytest.mark.parametrize("n", [1, 3, 7, 60, 10**7])
@pytest.mark.parametrize("users", [1, 5, 40])
def test_staged_files_hold_whole_users_in_ranges_and_input_order(tmp_path, n, users):
    pytest.importorskip("pyarrow")
    from features.spark.staged import stage_by_user

    events = events_frame(n * 100 + users, 2000, users)
    stage_by_user(events, n, tmp_path / "ev")
    files = sorted((tmp_path / "ev").iterdir())
    assert 1 <= len(files) <= min(n, events[S.USER_ID].n_unique())
    parts = [pl.read_parquet(f) for f in files]
    for a, b in zip(parts, parts[1:]):
        assert a[S.USER_ID].max() < b[S.USER_ID].min()  # ranges of users, in file order
    for p in parts:
        assert p[ROW].is_sorted()  # the input order kept
    assert_frame_equal(pl.concat(parts).sort(ROW), events)
    if n <= users:  # about as many events per file: no file holds much more than its share plus one user
        biggest_user = events.group_by(S.USER_ID).len()["len"].max()
        assert max(p.height for p in parts) <= events.height / len(parts) + biggest_user


def test_staging_no_events_writes_no_file(tmp_path):
    from features.spark.staged import stage_by_user

    stage_by_user(events_frame(0, 0, 3), 4, tmp_path / "ev")
    assert list((tmp_path / "ev").iterdir()) == []


keys = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(keys)
def test_sorted_by_agrees_with_a_sort(rows):
    from features.spark.build import sorted_by

    df = pl.DataFrame(rows, schema=["a", "b", "c"], orient="row")
    assert sorted_by(df, ["a", "b", "c"]) == df.equals(df.sort(["a", "b", "c"]))


@pytest.mark.slow
def test_a_step_gives_the_same_frames_from_the_folder_and_from_bytes(tmp_path):
    """The local mode (workers read the staged folder) and the Hadoop mode
    (the JVM hands each file's bytes to the worker) give the same frames, in
    file order, for a step with two outputs; no files -> the empty frames."""
    pytest.importorskip("pyspark")
    from features.jobs.uri import local_file_uri
    from features.spark.config import SparkConfig
    from features.spark.session import spark_session
    from features.spark.staged import StagedUsers, stage_by_user

    events = events_frame(3, 5000, 25)
    stage_by_user(events, 4, tmp_path / "ev")
    (tmp_path / "none").mkdir()

    def step(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        return df.sort(S.USER_ID, ROW), df.group_by(S.USER_ID).agg(pl.len().cast(pl.Int64)).sort(S.USER_ID)

    schemas = [f.schema for f in step(events.head(0))]
    with spark_session(SparkConfig(), "test staged") as spark:
        uri = local_file_uri(tmp_path / "ev", glob=True)
        local = StagedUsers(spark, uri, tmp_path / "ev").run(step, *schemas)
        remote = StagedUsers(spark, uri, None).run(step, *schemas)
        empty = StagedUsers(spark, local_file_uri(tmp_path / "none", glob=True), tmp_path / "none").run(step, *schemas)
    for a, b in zip(local, remote):
        assert_frame_equal(a, b)
    assert_frame_equal(local[0], events.sort(S.USER_ID, ROW))  # file order: users ascending
    assert local[1][S.USER_ID].is_sorted() and local[1]["len"].sum() == events.height
    assert [f.height for f in empty] == [0, 0] and [f.schema for f in empty] == schemas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev", "none"]  # the results were read, then removed


@pytest.mark.slow
def test_executors_that_cannot_read_the_staged_folder_fail_with_one_clear_line(tmp_path):
    """On a cluster whose executors do not see the driver's folder, the
    task fails with one line saying so, not a bare FileNotFoundError."""
    pytest.importorskip("pyspark")
    from features.core.errors import DataError
    from features.jobs.uri import local_file_uri
    from features.spark.config import SparkConfig
    from features.spark.session import spark_session
    from features.spark.staged import StagedUsers, stage_by_user

    stage_by_user(events_frame(1, 100, 5), 2, tmp_path / "ev")
    with pytest.raises(DataError) as e:
        with spark_session(SparkConfig(), "test staged") as spark:  # the executors "see" another folder
            StagedUsers(spark, local_file_uri(tmp_path / "ev", glob=True), tmp_path / "elsewhere").run(lambda df: df, pl.Schema())
    msg = str(e.value)
    assert "cannot read the staged file" in msg and "every executor sees" in msg and "\n" not in msg, msg
