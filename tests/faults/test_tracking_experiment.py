"""Faults of tracking, the UI server, experiments and compare.

Each case: the exit code, the message (file, column, rows where they apply),
and that nothing (or the old content) is left under the final name.
"""

from __future__ import annotations

import json
import re
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from features.core.errors import UsageError
from features.core.fingerprint import file_fingerprint
from features.core import provenance
from recsys.compare import ArmPredictions, compare_arms, format_rows
from recsys.eval.bootstrap import paired_bootstrap
from recsys.eval.metrics import METRICS
from recsys.tracking import CodeVersion, GitInfo, TrackingConfig, code_version, connect, open_pipeline_run, stage_key
from tests.faults.conftest import snapshot

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One store for the compare cases (a fresh store costs ~2 s of migrations)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    connect(TrackingConfig(uri=uri))
    return uri


@pytest.fixture
def in_store(store_uri, tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    return store_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the sqlite store


def test_foreign_sqlite_file_is_refused_and_left_byte_identical(tmp_path, cli):
    db = tmp_path / "store" / "data.db"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    con.execute("create table t (x integer)")
    con.execute("insert into t values (1)")
    con.commit()
    con.close()
    before = snapshot(db.parent)
    with pytest.raises(UsageError, match=r"not an MLflow store \(tables: t\)"):
        connect(TrackingConfig(uri=f"sqlite:///{db}"))
    rc, _, err = cli("ui", "--store", f"sqlite:///{db}", "--port", _free_port())
    assert rc == 2 and "not an MLflow store" in err and str(db) in err
    after = snapshot(db.parent)
    after.pop("data.db.lock", None)  # the store lock beside it is ours
    assert after == before


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    db = tmp_path / "notes.db"
    db.write_text("my notes, not a database\n")
    with pytest.raises(UsageError, match="is not a sqlite database"):
        connect(TrackingConfig(uri=f"sqlite:///{db}"))
    assert db.read_text() == "my notes, not a database\n"


LOG_RUNS = textwrap.dedent("""\
    import sys
    from recsys.tracking import CodeVersion, TrackingConfig, open_pipeline_run
    cfg = TrackingConfig(uri=sys.argv[1], experiment="race")
    for i in range(3):
        with open_pipeline_run(cfg, f"{sys.argv[2]}-{i}", tags={"experiment": "race"}, code=CodeVersion("v", "h")) as run:
            with run.stage("s", {"i": i}) as st:
                st.log_metrics({"m": float(i)})
    print("done")
""")


@pytest.mark.slow
def test_two_processes_creating_one_fresh_store_both_succeed(tmp_path):
    """Without the store lock one of them fails in MLflow's migrations."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", LOG_RUNS, uri, f"p{k}"], env=ENV, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "done" in out, err[-2000:]
    runs = connect(TrackingConfig(uri=uri, experiment="race")).search_runs("race")
    assert len(runs) == 2 * 3 * 2  # 2 processes x 3 pipelines x (parent + stage)
    assert {r["status"] for r in runs} == {"FINISHED"}


# --------------------------------------------------------------------------- code version, reuse keys


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, text=True).stdout


def test_another_repository_as_working_directory_changes_neither_key_nor_tags(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    here = code_version()
    repo = tmp_path / "other"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "x.py").write_text("x = 1\n")
    _git(repo, "add", "x.py")
    _git(repo, "commit", "-qm", "other")
    other_commit = _git(repo, "rev-parse", "HEAD").strip()
    monkeypatch.chdir(repo)
    there = code_version()
    assert there.known and (there.version, there.source_hash) == (here.version, here.source_hash)
    assert stage_key("s", {"a": 1}, {}, there) == stage_key("s", {"a": 1}, {}, here)
    assert there.tags().get("git_commit") != other_commit


def test_editing_a_plugin_source_file_changes_the_key(tmp_path, monkeypatch):
    src = tmp_path / "model.py"
    src.write_text("A = 1\n")
    monkeypatch.setattr(provenance, "source_files", lambda: [("recsys/model.py", src)])
    provenance._plugin_code.cache_clear()
    try:
        first = code_version()
        assert code_version().source_hash == first.source_hash  # cached, stable
        src.write_text("A = 2\n")
        provenance._plugin_code.cache_clear()
        second = code_version()
    finally:
        provenance._plugin_code.cache_clear()
    assert first.source_hash and second.source_hash != first.source_hash
    assert stage_key("s", {}, {}, first) != stage_key("s", {}, {}, second)


def test_git_tags_only_when_the_plugin_lives_in_a_checkout():
    assert "git_commit" not in CodeVersion("0.1.0", "h", GitInfo()).tags()
    tags = CodeVersion("0.1.0", "h", GitInfo("a" * 40, False, "")).tags()
    assert tags["git_commit"] == "a" * 40 and tags["code_hash"] == "h" and tags["code_version"] == "0.1.0"


# --------------------------------------------------------------------------- runs of killed processes


KILLED_MIDWAY = textwrap.dedent("""\
    import os, signal, sys
    from recsys.tracking import CodeVersion, TrackingConfig, open_pipeline_run
    cfg = TrackingConfig(uri=sys.argv[1], experiment="killed")
    with open_pipeline_run(cfg, "doomed", tags={"experiment": "killed"}, code=CodeVersion("v", "h")) as run:
        with run.stage("train", {"a": 1}) as st:
            print(run.run_id, st.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_runs_of_a_killed_process_are_marked_killed_on_the_next_start(store_uri, tmp_path):
    cfg = TrackingConfig(uri=store_uri, experiment="killed")
    proc = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, store_uri], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ids = proc.stdout.split()
    store = connect(cfg)
    assert {store.get_run(i).status for i in ids} == {"RUNNING"}
    alive = store.create_run("alive", {"experiment": "killed"})  # this process: alive, left alone
    lines: list[str] = []
    with open_pipeline_run(cfg, "next", tags={"experiment": "killed"}, code=CodeVersion("v", "h"), log=lines.append):
        pass
    for i in ids:
        r = store.get_run(i)
        assert r.status == "KILLED" and "ended without closing the run" in r.tags["killed_reason"]
    assert store.get_run(alive.run_id).status == "RUNNING"
    assert any("marked 2 run(s) KILLED" in line for line in lines)


# --------------------------------------------------------------------------- recsys ui


@pytest.mark.parametrize("port", ["99999", "0", "-5"])
def test_ui_port_out_of_range_exits_2(cli, tmp_path, port):
    rc, _, err = cli("ui", "--port", port, "--store", f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    assert rc == 2 and f"--port {port}: a TCP port is 1..65535" in err
    assert not (tmp_path / "s").exists()  # refused before the store is touched


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_ui_ready_timeout_not_positive_exits_2(cli, tmp_path, timeout):
    rc, _, err = cli("ui", "--ready-timeout", timeout, "--store", f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    assert rc == 2 and f"--ready-timeout {float(timeout)}: must be a positive" in err
    assert not (tmp_path / "s").exists()


def test_ui_port_in_use_exits_2(cli, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = cli("ui", "--port", port, "--store", f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    assert rc == 2 and f"port {port} on 127.0.0.1 is in use" in err
    assert not (tmp_path / "s").exists()


def test_ui_on_a_non_loopback_host_warns_loudly(cli):
    rc, _, err = cli("ui", "--host", "0.0.0.0", "--port", _free_port(), "--store", "http://127.0.0.1:1")
    assert "WARNING: --host 0.0.0.0" in err and "WITHOUT authentication" in err
    assert rc == 2  # (a server URI is then refused: nothing was started)
    rc, _, err = cli("ui", "--port", _free_port(), "--store", "http://127.0.0.1:1")
    assert rc == 2 and "WARNING" not in err


@pytest.mark.slow
def test_sigkill_of_recsys_ui_leaves_no_server_listening(tmp_path):
    port = _free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "ui", "--port", str(port), "--store",
             f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"],
            cwd=tmp_path, env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "MLflow UI:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.25)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # it serves
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"port {port} still served 15 s after SIGKILL of recsys ui")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- experiment files and flags


def _experiment_file(tmp_path: Path, **changes) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump({"seed": 0, "paths": {"root": str(tmp_path / "art")}}))
    spec = {"experiment": "t", "baseline": "configs/base.yaml",
            "arms": [{"name": "control", "delta": {}}, {"name": "b", "delta": {}}], **changes}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "ab c"])
def test_experiment_name_that_could_escape_the_root_exits_2(cli, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = _experiment_file(tmp_path, experiment=name)
    rc, _, err = cli("experiment", "run", path)
    assert rc == 2 and f"name {name!r} may only hold letters" in err and "exp.yaml" in err
    assert not (tmp_path / "art").exists() and not (tmp_path / "mlflow").exists()


@pytest.mark.parametrize(
    ("seeds", "needle"),
    [("1,x", "'x' is not a seed"), ("", "expected comma-separated integers"), (" , ", "expected comma-separated"),
     ("0,1,0", "seed(s) [0] repeated"), ("-1", "'-1' is not a seed (digits 0-9 only)"),
     # before 2026-11-30: "--1" crashed (StopIteration), "1_0" ran seed 10, 2**32 ran seed 0 again
     ("1_0", "'1_0' is not a seed"), ("\u0663", "is not a seed"), ("0,4294967296", "seeds must be integers in 0..2**32-1")],
)
def test_bad_seeds_exit_2_before_any_work(cli, tmp_path, monkeypatch, seeds, needle):
    """`--seeds=--1` crashed with StopIteration before 2026-11-30 (argparse takes it only in the = form)."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("experiment", "run", _experiment_file(tmp_path), "--seeds", seeds)
    assert rc == 2 and needle in err, err
    rc, _, err = cli("experiment", "run", _experiment_file(tmp_path), "--seeds=--1")
    assert rc == 2 and "'--1' is not a seed" in err, err
    assert not (tmp_path / "art").exists() and not (tmp_path / "mlflow").exists()


def test_repeated_seeds_in_the_file_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("experiment", "run", _experiment_file(tmp_path, seeds=[1, 1]))
    assert rc == 2 and "seed(s) [1] repeated" in err and "exp.yaml" in err


@pytest.mark.parametrize("n_boot", [99, 10_001, 10**12])
def test_n_boot_out_of_range_in_the_file_exits_2_before_any_work(cli, tmp_path, monkeypatch, n_boot):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("experiment", "run", _experiment_file(tmp_path, n_boot=n_boot))
    assert rc == 2 and f"n_boot must be in [100, 10000], got {n_boot}" in err and "exp.yaml" in err
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("n_boot", ["1", "0", "-3", "99", "10001", "100000000000000000000"])
def test_n_boot_out_of_range_exits_2(cli, in_store, n_boot):
    rc, _, err = cli("experiment", "compare", "whatever", "--n-boot", n_boot)
    assert rc == 2 and f"--n-boot {n_boot}: need 100 to 10000 bootstrap replicates" in err


def test_compare_name_with_a_path_exits_2(cli, in_store):
    rc, _, err = cli("experiment", "compare", "../../x")
    assert rc == 2 and "may only hold letters" in err


def test_compare_of_an_unknown_experiment_exits_2(cli, in_store):
    rc, _, err = cli("experiment", "compare", "never_ran")
    assert rc == 2 and "no finished run of experiment 'never_ran'" in err


# --------------------------------------------------------------------------- compare: predictions checks


def _frame(n_users: int = 40, per_user: int = 5, seed: int = 0, *, label=None, observed=True) -> pl.DataFrame:
    users = np.repeat(np.arange(n_users), per_user)
    n = len(users)
    # one truth for every arm (compare refuses arms whose labels disagree); `seed` draws the scores
    y = np.random.default_rng(12345).integers(0, 2, n) if label is None else np.full(n, label)
    score = 1 / (1 + np.exp(-(y + np.random.default_rng(seed).normal(size=n))))
    return pl.DataFrame({
        "user_id": users, "item_id": np.arange(n), "timestamp": np.zeros(n, dtype=np.int64),
        "label": y, "score": score, "lt_score": score, "returned_1d": y, "active_days_7": y,
        "lt_observed": np.full(n, observed),
    })


def _stored_experiment(uri: str, tmp_path: Path, name: str, frames: dict[tuple[str, int], pl.DataFrame]) -> dict:
    """A finished experiment run in the store, as `recsys experiment run` leaves it."""
    cfg = TrackingConfig(uri=uri)
    files = {}
    with open_pipeline_run(cfg, f"experiment {name}", tags={"experiment": name, "control": "control", "kind": "experiment"},
                           code=CodeVersion("v", "h"), log=lambda _m: None) as run:
        spec = {"metrics": ["auc", "lt_auc"], "n_boot": 100, "arms": [{"name": a} for a in dict.fromkeys(a for a, _ in frames)]}
        run.log_dict({"spec": spec}, "experiment.json")
        entries = []
        for (arm, seed), frame in frames.items():
            out = tmp_path / name / arm / f"seed{seed}"
            out.mkdir(parents=True)
            f = out / "predictions.parquet"
            frame.write_parquet(f)
            files[(arm, seed)] = f
            entries.append({"arm": arm, "seed": seed, "outputs": str(out), "rows": frame.height, "fingerprint": file_fingerprint(f)})
        run.log_dict(entries, "arm_runs.json")
    return files


def _compare_runs(uri: str, name: str) -> list:
    return [r for r in connect(TrackingConfig(uri=uri)).search_runs(name, stage="pipeline") if r["tags"].get("kind") == "compare"]


def test_truncated_predictions_are_refused_naming_arm_seed_file(cli, in_store, tmp_path):
    files = _stored_experiment(in_store, tmp_path, "trunc", {("control", 0): _frame(), ("b", 0): _frame(seed=1)})
    f = files[("b", 0)]
    full = pl.read_parquet(f)
    full.head(full.height // 2).write_parquet(f)  # half the rows
    rc, out, err = cli("experiment", "compare", "trunc")
    assert rc == 1 and out == ""
    assert "arm 'b' (seed 0)" in err and str(f) in err and "have 100 rows, but the run recorded 200" in err
    assert _compare_runs(in_store, "trunc") == []  # nothing logged as a comparison


def test_rewritten_predictions_are_refused(cli, in_store, tmp_path):
    files = _stored_experiment(in_store, tmp_path, "rewritten", {("control", 0): _frame(), ("b", 0): _frame(seed=1)})
    _frame(seed=7).write_parquet(files[("b", 0)])  # same rows, other scores
    rc, _, err = cli("experiment", "compare", "rewritten")
    assert rc == 1 and "arm 'b' (seed 0) changed since the run finished" in err and str(files[("b", 0)]) in err


def test_predictions_that_are_not_parquet_exit_1_naming_the_file(cli, in_store, tmp_path):
    files = _stored_experiment(in_store, tmp_path, "garbage", {("control", 0): _frame(), ("b", 0): _frame(seed=1)})
    files[("control", 0)].write_bytes(b"\x00garbage, not parquet" * 10)
    rc, _, err = cli("experiment", "compare", "garbage")
    assert rc == 1 and str(files[("control", 0)]) in err and "cannot be read as parquet" in err


def test_predictions_missing_a_column_exit_1_naming_file_and_column(cli, in_store, tmp_path):
    files = _stored_experiment(in_store, tmp_path, "nocol", {("control", 0): _frame(), ("b", 0): _frame(seed=1).drop("lt_score")})
    rc, _, err = cli("experiment", "compare", "nocol")
    assert rc == 1 and str(files[("b", 0)]) in err and "column 'lt_score'" in err


def test_nan_scores_exit_1_naming_column_and_rows(cli, in_store, tmp_path):
    bad = _frame(seed=1).with_columns(pl.when(pl.int_range(pl.len()).is_in([3, 8])).then(float("nan")).otherwise(pl.col("score")).alias("score"))
    files = _stored_experiment(in_store, tmp_path, "nanscore", {("control", 0): _frame(), ("b", 0): bad})
    rc, _, err = cli("experiment", "compare", "nanscore")
    assert rc == 1 and str(files[("b", 0)]) in err and "column 'score'" in err and "rows 3, 8" in err


def test_unknown_control_exits_2_listing_the_arms(cli, in_store, tmp_path):
    _stored_experiment(in_store, tmp_path, "ctl", {("control", 0): _frame(), ("b", 0): _frame(seed=1)})
    rc, _, err = cli("experiment", "compare", "ctl", "--control", "treatment")
    assert rc == 2 and "--control 'treatment'" in err and "its arms: b, control" in err


# --------------------------------------------------------------------------- metrics that cannot be computed


def test_no_observed_lt_label_is_null_in_json_and_na_in_the_table(cli, in_store, tmp_path):
    frames = {("control", 0): _frame(observed=False), ("b", 0): _frame(seed=1, observed=False)}
    _stored_experiment(in_store, tmp_path, "unobserved", frames)
    rc, out, err = cli("experiment", "compare", "unobserved", "--format", "json")
    assert rc == 0, err
    rows = {(r["arm"], r["metric"]): r for r in json.loads(out)}  # strict JSON: no NaN token
    lt = rows[("b", "lt_auc")]
    assert lt["value"] is None and lt["delta"] is None and lt["ci_low"] is None and lt["significant"] is False
    assert lt["reason"] == "no test impression has an observed long-term label"
    assert rows[("b", "auc")]["value"] is not None and rows[("b", "auc")]["reason"] == ""
    rc, out, _ = cli("experiment", "compare", "unobserved")
    assert rc == 0 and "n/a (no test impression has an observed long-term label)" in out
    assert "nan" not in out.lower()


def test_single_class_test_split_is_na_never_significant():
    frames = [ArmPredictions("control", 0, _frame(label=0)), ArmPredictions("b", 0, _frame(seed=1, label=0))]
    rows = compare_arms(frames, control="control", metrics=["auc", "gauc", "lt_spearman", "logloss"], n_boot=100)
    by = {(r.arm, r.metric): r for r in rows}
    for metric in ("auc", "gauc", "lt_spearman"):
        r = by[("b", metric)]
        assert math.isnan(r.value) and math.isnan(r.delta) and math.isnan(r.ci_low)
        assert not r.significant and not r.regression and r.reason
    assert "AUC needs both classes" in by[("b", "auc")].reason
    assert by[("b", "logloss")].reason == "" and not math.isnan(by[("b", "logloss")].delta)
    table = format_rows(rows, "table", control="control")
    assert "nan" not in table.lower() and "n/a" in table
    csv_text = format_rows(rows, "csv", control="control")
    assert "nan" not in csv_text.lower()


def test_paired_bootstrap_on_no_rows_is_nan_not_a_crash():
    empty = np.array([], dtype=float)
    ci = paired_bootstrap(METRICS["lt_auc"], empty, empty, empty, empty, n_boot=100, rng=np.random.default_rng(0))
    assert math.isnan(ci.delta) and math.isnan(ci.ci_low) and not ci.significant and ci.n_users == 0
    with pytest.raises(ValueError, match="n_boot must be >= 2"):
        paired_bootstrap(METRICS["auc"], np.arange(4), np.array([0, 1, 0, 1.0]), np.ones(4), np.ones(4), n_boot=1,
                         rng=np.random.default_rng(0))


def test_a_store_creation_interrupted_leaves_no_store_and_the_next_run_creates_it(tmp_path, monkeypatch):
    # MLflow's migrations once ran on the database itself: a Ctrl-C among them left a half-migrated
    # store that every later run refused ("table ... already exists")
    from recsys.tracking import store as st

    db = tmp_path / "m" / "mlflow.db"
    uri = f"sqlite:///{db}"
    st.check_store(uri)
    real_replace = os.replace

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        st.prepare_store(uri)
    assert not db.exists() and not list(db.parent.glob(".mlflow.db.tmp-*"))  # no store, no temporary file
    monkeypatch.setattr(st.os, "replace", real_replace)
    st.prepare_store(uri)
    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master where type = 'table'")}
    assert {"experiments", "runs", "registered_models", "alembic_version"} <= tables
    assert not any(t.startswith("_alembic_tmp") for t in tables)


def test_a_half_migrated_store_is_named_as_such(tmp_path):
    from recsys.tracking import store as st

    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table experiments (x int)")
    con.execute("create table runs (x int)")
    con.execute("create table _alembic_tmp_tags (x int)")
    con.commit()
    con.close()
    with pytest.raises(UsageError, match="half-created MLflow store"):
        st.prepare_store(f"sqlite:///{db}")


@pytest.mark.parametrize(("edit", "metric", "needle"), [
    (pl.col("label") * 2, "logloss", "label(s) null or not 0/1"),  # logloss was -0.54, "significant"
    (pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise(pl.col("label")), "auc", "label(s) null or not 0/1"),
    (1 - pl.col("label"), "auc", "disagree on label of 200 impressions"),  # was scored on the control's labels
])
def test_compare_arms_refuses_labels_it_would_score_wrongly(edit, metric, needle):
    from features.core.errors import DataError

    bad = _frame(seed=1).with_columns(edit.alias("label"))
    frames = [ArmPredictions("control", 0, _frame()), ArmPredictions("b", 0, bad)]
    with pytest.raises(DataError, match=re.escape(needle)):
        compare_arms(frames, control="control", metrics=[metric], n_boot=100)


def test_compare_arms_refuses_infinite_scores_and_unknown_metrics_and_reads_pandas():
    from features.core.errors import DataError

    inf = _frame(seed=1).with_columns(pl.when(pl.int_range(pl.len()) == 2).then(float("inf")).otherwise(pl.col("score")).alias("score"))
    with pytest.raises(DataError, match="NaN or infinite score"):
        compare_arms([ArmPredictions("control", 0, _frame()), ArmPredictions("b", 0, inf)], control="control",
                     metrics=["auc"], n_boot=100)
    frames = [ArmPredictions("control", 0, _frame().to_pandas()), ArmPredictions("b", 0, _frame(seed=1).to_pandas())]
    for metrics in ("auc", ["aucc"]):
        with pytest.raises(ValueError, match="metric names among"):
            compare_arms(frames, control="control", metrics=metrics, n_boot=100)
    rows = compare_arms(frames, control="control", metrics=["auc"], n_boot=100)  # pandas frames are read
    assert {r.arm for r in rows} == {"control", "b"}
