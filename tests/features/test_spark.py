"""The Spark engine of the feature jobs: the same bytes as the polars engine
(build and match, synthetic data and MovieLens-100K), the same guarantees
(skip when unchanged across engines, bad input, one `error:` line for a
worker failure), and a session that is always stopped with no UI port.

Spark sessions start in a few seconds once the JVM is up (the first one per
test process pays ~10 s): the tests share module fixtures to keep the count
of jobs small.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

pytest.importorskip("pyspark")

from features import schemas as S  # noqa: E402
from features.core.errors import DataError, UsageError  # noqa: E402
from features.jobs import FeaturesConfig, build_features, build_match_features  # noqa: E402
from features.match import MatchConfig  # noqa: E402
from features.sources import SyntheticConfig  # noqa: E402
from features.spark.config import SparkConfig  # noqa: E402
from recsys.cli import main  # noqa: E402
from tests.outputs import rewrite_output  # noqa: E402

pytestmark = pytest.mark.slow

SORT = [S.USER_ID, S.TIMESTAMP, S.ITEM_ID]
FILES = ["interactions.parquet", "sequences.parquet", "items.parquet"]
FAST_MATCH = MatchConfig(top_k=(3, 10), faiss_k=10, sid_codebook_size=8, sid_niter=4, shards=2)
QUIET = dict(log=lambda _m: None)


def assert_same_folders(a, b, files):
    """Same bytes (manifest fingerprints), and row for row after a sort, every column."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for f in files:
        assert ma["outputs"][f]["fingerprint"] == mb["outputs"][f]["fingerprint"], f
        x, y = pl.read_parquet(a / f), pl.read_parquet(b / f)
        keys = [c for c in SORT if c in x.columns] or [x.columns[0]]
        assert_frame_equal(x.sort(keys), y.sort(keys))
    assert ma["key"] == mb["key"]
    return ma, mb


def embeddings(path, ids, dim=8, seed=0):
    vec = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    pl.DataFrame({"item_id": pl.Series(ids, dtype=pl.Int64), "embedding": pl.Series(list(vec), dtype=pl.List(pl.Float32))}).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def synth_cfg():
    return FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=80, items=150, max_events=90, seed=11))


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory, synth_cfg):
    """The synthetic build by both engines, under a folder name with a space:
    Spark read `Path.as_uri()`'s %20 literally and failed there (before 2026-11-30)."""
    root = tmp_path_factory.mktemp("spark_synth") / "my data"
    build_features(synth_cfg, root / "polars", **QUIET)
    spark = build_features(dataclasses.replace(synth_cfg, engine="spark"), root / "spark", **QUIET)
    return root / "polars", root / "spark", spark


def test_build_same_bytes_as_polars_on_synthetic(synth_pair):
    pol, spk, res = synth_pair
    ma, mb = assert_same_folders(pol, spk, FILES + ["planted_truth.parquet"])
    assert (ma["engine"], mb["engine"]) == ("polars", "spark")
    assert ma["stats"] == mb["stats"]
    assert not res.skipped


def test_leave_last_out_and_duplicates_same_on_both_engines(tmp_path):
    rng = np.random.default_rng(5)
    n = 3000
    events = pl.DataFrame({
        "user_id": rng.integers(0, 40, n), "item_id": rng.integers(0, 60, n),
        "timestamp": 1_000_000 + rng.integers(0, 40, n) * 3600, "rating": rng.integers(1, 6, n).astype(float),
    }).unique(subset=["user_id", "item_id", "timestamp"], keep="first", maintain_order=True)
    # exact duplicates: dropped with the same warning by both engines
    events = pl.concat([events, events.head(7)])
    path = tmp_path / "events.parquet"
    events.write_parquet(path)
    cfg = FeaturesConfig(source="files", interactions=str(path), split="leave_last_out", history_cap=5)
    logs = {"polars": [], "spark": []}
    for engine in logs:
        build_features(dataclasses.replace(cfg, engine=engine), tmp_path / engine, log=logs[engine].append)
    assert_same_folders(tmp_path / "polars", tmp_path / "spark", FILES)
    warn = [[m for m in logs[e] if m.startswith("warning")] for e in logs]
    assert warn[0] == warn[1] and "dropped 7 duplicate rows" in warn[0][0]


def errors_of_both_engines(cfg, out):
    """The DataError message of each engine's build of `cfg` (polars, spark); no output left."""
    messages = []
    for engine in ("polars", "spark"):
        with pytest.raises(DataError) as e:
            build_features(dataclasses.replace(cfg, engine=engine), out / engine, **QUIET)
        messages.append(str(e.value))
        assert not (out / engine).exists()
    return messages


def test_conflicting_duplicates_and_unknown_items_fail_the_same_way(tmp_path):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp,rating\n1,10,100,5\n1,10,100,2\n2,11,50,4\n")
    messages = errors_of_both_engines(FeaturesConfig(source="files", interactions=str(bad)), tmp_path / "conflict")
    assert messages[0] == messages[1] and "disagree" in messages[0]
    items = tmp_path / "items.csv"
    items.write_text("item_id,text\n10,a\n")
    bad.write_text("user_id,item_id,timestamp,rating\n1,10,100,5\n1,12,200,2\n2,11,50,4\n2,12,60,4\n")
    cfg = FeaturesConfig(source="files", interactions=str(bad), items=str(items))
    messages = errors_of_both_engines(cfg, tmp_path / "items")
    assert messages[0] == messages[1] and "rows 2, 3, 4" in messages[0] and "[11, 12]" in messages[0]
    # an exact duplicate of an unknown item's row: the dropped copy is not named (it was on Spark)
    bad.write_text("user_id,item_id,timestamp,rating\n1,12,100,5\n2,10,50,4\n1,12,100,5\n3,13,70,4\n")
    messages = errors_of_both_engines(cfg, tmp_path / "dup")
    assert messages[0] == messages[1] and "rows 1, 4" in messages[0] and "[12, 13]" in messages[0], messages
    # both faults in one file: the same one is reported first (duplicates, then item ids)
    bad.write_text("user_id,item_id,timestamp,rating\n1,10,100,5\n1,10,100,2\n2,11,50,4\n")
    messages = errors_of_both_engines(cfg, tmp_path / "both")
    assert messages[0] == messages[1] and "disagree" in messages[0]


def test_a_folder_built_by_one_engine_is_up_to_date_for_the_other(synth_pair, synth_cfg):
    pol, _, _ = synth_pair
    logs = []
    res = build_features(dataclasses.replace(synth_cfg, engine="spark", spark=SparkConfig(master="local[1]")), pol,
                         log=logs.append)
    assert res.skipped and "up to date" in logs[-1]


def test_match_same_bytes_as_polars(synth_pair, tmp_path):
    pol, spk, _ = synth_pair
    emb = embeddings(tmp_path / "emb.parquet", pl.read_parquet(pol / "items.parquet")[S.ITEM_ID].to_numpy())
    a = build_match_features(pol, emb, tmp_path / "m_polars", FAST_MATCH, progress=False, **QUIET)
    b = build_match_features(spk.as_uri(), emb, (tmp_path / "m_spark").as_uri(),
                             dataclasses.replace(FAST_MATCH, engine="spark"), **QUIET)
    ma, mb = assert_same_folders(tmp_path / "m_polars", tmp_path / "m_spark", [S.MATCH_FILE])
    assert ma["stats"] == mb["stats"] and mb["engine"] == "spark"
    assert a.complete and b.complete and not (tmp_path / "m_spark" / "shards").exists()
    # and the polars output is up to date for a spark rerun
    again = build_match_features(pol, emb, tmp_path / "m_polars", dataclasses.replace(FAST_MATCH, engine="spark"), **QUIET)
    assert again.skipped


def test_ml100k_build_and_match_same_as_polars(ml100k_features, tmp_path):
    spk = tmp_path / "features"
    build_features(FeaturesConfig(engine="spark"), spk, **QUIET)
    assert_same_folders(ml100k_features, spk, FILES + ["users.parquet"])
    emb = embeddings(tmp_path / "emb.parquet", pl.read_parquet(spk / "items.parquet")[S.ITEM_ID].to_numpy(), dim=16)
    neg = dataclasses.replace(FAST_MATCH, negatives=True)  # the negative-history columns too
    build_match_features(ml100k_features, emb, tmp_path / "m_polars", neg, progress=False, **QUIET)
    build_match_features(spk, emb, tmp_path / "m_spark", dataclasses.replace(neg, engine="spark"), **QUIET)
    assert_same_folders(tmp_path / "m_polars", tmp_path / "m_spark", [S.MATCH_FILE])
    assert "mf_neg_cos_mean" in pl.read_parquet(tmp_path / "m_spark" / S.MATCH_FILE).columns


def test_worker_failure_is_one_error_line(synth_pair, tmp_path, capsys):
    """A stale sequences file (its users' positives truncated) fails inside a
    Spark task: the CLI prints one `error:` line, exit 1, no JVM trace."""
    import shutil

    pol, _, _ = synth_pair
    stale = tmp_path / "stale"
    shutil.copytree(pol, stale)
    seqs = pl.read_parquet(stale / "sequences.parquet")
    rewrite_output(stale / "sequences.parquet",
                   seqs.with_columns(pl.col(S.POS_ITEM_IDS).list.head(1), pl.col(S.POS_TIMESTAMPS).list.head(1)))
    emb = embeddings(tmp_path / "emb.parquet", pl.read_parquet(pol / "items.parquet")[S.ITEM_ID].to_numpy())
    cfg = tmp_path / "p.yaml"
    cfg.write_text("match:\n  faiss_k: 10\n  sid_codebook_size: 8\n  sid_niter: 2\n")
    rc = main(["features", "match", "--engine", "spark", "--features", str(stale), "--embeddings", str(emb),
               "--out", str(tmp_path / "m"), "--config", str(cfg), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "positive history" in lines[0], err
    assert "Traceback" not in err and "py4j" not in err.lower() and "at org.apache" not in err
    assert not (tmp_path / "m" / S.MATCH_FILE).exists()


def test_cli_engine_flags_and_uris(tmp_path, capsys):
    out = (tmp_path / "f").as_uri()
    argv = ["features", "build", "--source", "synthetic", "--users", "20", "--n-items", "40", "--max-events", "30",
            "--engine", "spark", "--spark-master", "local[1]", "--out", out, "--quiet"]
    assert main(argv) == 0
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert m["engine"] == "spark" and "engine" not in m["config"]
    emb = embeddings(tmp_path / "e.parquet", pl.read_parquet(tmp_path / "f" / "items.parquet")[S.ITEM_ID].to_numpy())
    rc = main(["features", "match", "--engine", "spark", "--shard", "0/2", "--features", out, "--embeddings", str(emb),
               "--out", str(tmp_path / "m")])
    assert rc == 2 and "--shard" in capsys.readouterr().err
    rc = main(["features", "build", "--source", "movielens100k", "--out", "hdfs://nn/x"])  # polars engine
    assert rc == 2 and "--engine spark" in capsys.readouterr().err
    # an unreachable Hadoop filesystem: one usage error naming the path
    rc = main(["features", "build", "--source", "movielens100k", "--out", "hdfs://nn/x", "--engine", "spark"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out hdfs://nn/x: the filesystem failed" in err and "nn" in err.split("failed:")[1]


def test_session_is_stopped_and_has_no_ui(tmp_path):
    from pyspark import SparkContext

    from features.spark.session import spark_session

    before = signal.getsignal(signal.SIGINT)
    with spark_session(SparkConfig(master="local[1]"), "t") as spark:
        assert spark.sparkContext.uiWebUrl is None
        assert signal.getsignal(signal.SIGINT) is not before  # ours, then PySpark's: cancels the jobs
    assert SparkContext._active_spark_context is None
    assert signal.getsignal(signal.SIGINT) is before  # not PySpark's handler of a stopped context
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C
        with spark_session(SparkConfig(master="local[1]"), "t"):
            raise KeyboardInterrupt
    assert SparkContext._active_spark_context is None
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_while_the_session_stops_is_ignored():
    """Seen (1 run in 8, second Ctrl-C 0.3 s after the first): it ran
    PySpark's handler, a py4j call inside the stop's own, and printed py4j
    tracebacks. The session stops with SIGINT ignored, then the handler from
    before it is back."""
    from features.spark.session import _stop

    class Session:
        stopped = False

        def stop(self):
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, while stopping
            time.sleep(0.05)
            self.stopped = True

    before = signal.getsignal(signal.SIGINT)
    restored = []
    session = Session()
    _stop(session, lambda: restored.append(signal.signal(signal.SIGINT, before)))
    assert session.stopped and restored and signal.getsignal(signal.SIGINT) is before


def test_engine_is_not_part_of_the_key():
    from recsys.config import PipelineConfig

    a, b = FeaturesConfig(), FeaturesConfig(engine="spark", spark=SparkConfig(master="spark://h:7077", ui=True))
    assert a.relevant() == b.relevant()
    assert MatchConfig().relevant() == MatchConfig(engine="spark").relevant()
    cfg = PipelineConfig.from_mapping({"features": {"engine": "spark", "spark": {"master": "local[4]"}},
                                      "match": {"engine": "spark"}})
    assert cfg.features.spark.master == "local[4]" and cfg.match.engine == "spark"
    with pytest.raises(UsageError):
        PipelineConfig.from_mapping({"features": {"engine": "dask"}})


def test_bench_rows_carry_the_engine_and_keep_other_rows(tmp_path):
    from recsys.bench import features as bench

    old = {"events": 5, "users": 1, "seconds": 1.0, "events_per_s": 5.0}
    (tmp_path / "features.json").write_text(json.dumps(old))
    assert bench.main(["--quick", "--engine", "polars", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "features.json").read_text())["rows"]
    # a smoke run's rows stand alone (until 2026-12-01 they were merged into the committed table)
    assert len(rows) == 1 and rows[0]["engine"] == "polars" and rows[0]["users"] == 20
    assert {"engine", "events", "seconds", "events_per_s", "peak_mb"} <= set(rows[0])
    # a full run keeps the other sizes' rows (the old one-row file as a polars row)
    (tmp_path / "features.json").write_text(json.dumps(old))
    merged = bench._merge(tmp_path / "features.json", rows)
    assert [(r["engine"], r["users"]) for r in merged] == [("polars", 1), ("polars", 20)]


def test_paths_with_glob_characters_are_refused_before_any_work(tmp_path, capsys):
    """polars and Spark read `b[1]` as a pattern: the build failed half-way
    with "expanded paths were empty" (both engines) before 2026-11-30."""
    out = tmp_path / "b[1]" / "f"
    rc = main(["features", "build", "--source", "synthetic", "--users", "20", "--max-events", "30", "--out", str(out)])
    assert rc == 2 and "which polars and Spark read as a file-name pattern" in capsys.readouterr().err
    assert not out.exists()


def test_a_task_failure_after_ctrl_c_is_the_interruption():
    """Ctrl-C cancels the Spark jobs; the cancelled call's py4j error could
    reach the driver first and exit 1 as a failed task (seen at 16 s and 20 s
    into a build): after a Ctrl-C it is the interruption (exit 130)."""
    from features.core.errors import DataError
    from features.spark.session import worker_errors

    Py4JError = type("Py4JError", (Exception,), {"__module__": "py4j.protocol"})
    with pytest.raises(DataError, match="a Spark task failed"):
        with worker_errors([]):
            raise Py4JError("An error occurred while calling o81.getResult")
    with pytest.raises(KeyboardInterrupt):
        with worker_errors([True]):
            raise Py4JError("An error occurred while calling o81.getResult")


def test_ctrl_c_while_spark_starts_stops_the_session_and_leaves_no_jvm(monkeypatch):
    """Found by a probe (2026-11-30): Ctrl-C 3 s into a job, while PySpark
    launched the JVM, left that JVM running (PySpark starts it ignoring
    SIGINT), and 6-12 s in it printed py4j tracebacks. A Ctrl-C during the
    start is held until the session exists, then stops it; an interruption
    raised inside the start kills the JVM."""
    from pyspark import SparkContext

    from features.spark.session import spark_session

    before = signal.getsignal(signal.SIGINT)
    real = SparkContext.getOrCreate

    def ctrl_c_while_starting(conf):
        os.kill(os.getpid(), signal.SIGINT)  # delivered while the context starts
        time.sleep(0.05)
        return real(conf)

    monkeypatch.setattr(SparkContext, "getOrCreate", staticmethod(ctrl_c_while_starting))
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with spark_session(SparkConfig(master="local[1]"), "t"):
            ran.append(True)
    assert not ran and SparkContext._active_spark_context is None
    assert signal.getsignal(signal.SIGINT) is before

    def interrupted_start(conf):
        real(conf)
        raise KeyboardInterrupt  # e.g. raised by a handler PySpark installed

    monkeypatch.setattr(SparkContext, "getOrCreate", staticmethod(interrupted_start))
    proc = SparkContext._gateway.proc if SparkContext._gateway is not None else None
    with pytest.raises(KeyboardInterrupt):
        with spark_session(SparkConfig(master="local[1]"), "t"):
            ran.append(True)
    assert not ran and SparkContext._gateway is None and SparkContext._active_spark_context is None
    assert proc is None or proc.poll() is not None  # the JVM is gone
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.setattr(SparkContext, "getOrCreate", real)
    with spark_session(SparkConfig(master="local[1]"), "t") as spark:  # a fresh JVM starts afterwards
        assert spark.range(3).count() == 3


def test_start_up_errors_name_their_cause_and_key(tmp_path, capsys):
    """Found by a probe (2026-11-30): the cause of a failed start was cut
    ("An error occurred while calling None.org...JavaSparkContext."), a bad
    driver_memory said only that the gateway exited, and a bad spark.sql.*
    setting failed the job later as a task failure (exit 1)."""
    from features.spark.session import one_line

    java = Exception("An error occurred while calling o45.getFileSystem.\n: org.apache.hadoop.fs."
                     "UnsupportedFileSystemException: No FileSystem for scheme \"nosuch\"\n\tat org.x")
    assert one_line(java) == 'UnsupportedFileSystemException: No FileSystem for scheme "nosuch"'
    caused = Exception("java.lang.IllegalArgumentException: Error while instantiating 'X':\n\tat a.b\n"
                       "Caused by: org.apache.spark.SparkIllegalArgumentException: bad value 'abc'\n\tat c.d")
    assert one_line(caused) == "SparkIllegalArgumentException: bad value 'abc'"
    base = ["features", "build", "--source", "synthetic", "--users", "20", "--max-events", "30", "--engine", "spark"]
    rc = main([*base, "--spark-master", "local[0]", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "Asked to run locally with 0 threads" in err and not (tmp_path / "a").exists()
    rc = main([*base, "--spark-master", "bogus", "--out", str(tmp_path / "a")])  # no JVM started for it
    assert rc == 2 and "spark.master must be a Spark master URL" in capsys.readouterr().err
    for section, needle in (({"driver_memory": "lots"}, "spark.driver_memory must be a JVM memory size"),
                            ({"conf": {"spark.sql.shuffle.partitions": "abc"}}, "cannot start Spark"),
                            # the Java cause names the key and value (it was cut at "SessionStateBuilder':")
                            ({"conf": {"spark.sql.files.maxPartitionBytes": "abc"}},
                             "The value 'abc' in the config \"spark.sql.files.maxPartitionBytes\" is invalid")):
        (tmp_path / "cfg.yaml").write_text(json.dumps({"features": {"spark": section}}))
        rc = main([*base, "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, err
        assert not (tmp_path / "b").exists()


def test_conf_numbers_and_booleans_reach_spark_as_its_text():
    from features.spark.session import spark_session

    cfg = SparkConfig(master="local[1]", conf={"spark.sql.shuffle.partitions": 3, "spark.sql.adaptive.enabled": False})
    with spark_session(cfg, "t") as spark:
        assert spark.conf.get("spark.sql.shuffle.partitions") == "3"
        assert spark.conf.get("spark.sql.adaptive.enabled") == "false"  # not Python's "False"


def test_a_failed_spark_build_leaves_no_folder_and_ignores_a_stale_staging_of_its_pid(tmp_path):
    """Found by a probe (2026-11-30): the staging folder made the output's
    missing parents, which a failed run left behind; and a stale staging
    folder named with this process's pid (a killed run whose pid came back)
    failed the build with "File exists"."""
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp,rating\n1,10,100,5\n1,10,100,2\n")
    cfg = FeaturesConfig(source="files", interactions=str(bad), engine="spark")
    with pytest.raises(DataError):
        build_features(cfg, tmp_path / "new" / "deep" / "out", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv"]
    good = tmp_path / "good.csv"
    good.write_text("user_id,item_id,timestamp,rating\n1,10,100,5\n2,11,200,2\n")
    (tmp_path / f".out.tmp-{os.getpid()}-spark" / "events").mkdir(parents=True)  # the older name, our pid
    res = build_features(dataclasses.replace(cfg, interactions=str(good)), tmp_path / "out", **QUIET)
    assert not res.skipped and (tmp_path / "out" / "interactions.parquet").exists()
