"""recsys.tracking on a throwaway sqlite store (never the project's default store)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.core.errors import UsageError
from features.core.provenance import key_hash
from features.core.tracker import ForwardingTracker, NullTracker, RecordingTracker, Tracker
from recsys.tracking import (
    PARAM_VALUE_LIMIT,
    CodeVersion,
    GitInfo,
    MLflowTracker,
    NullPipelineRun,
    PipelineRun,
    RunStore,
    StageRun,
    TrackingConfig,
    check_store,
    connect,
    fingerprint,
    git_info,
    open_pipeline_run,
    resolve_artifact_root,
    resolve_uri,
    stage_key,
)

GIT = GitInfo("a" * 40, False, "")
CODE = CodeVersion("0.1.0", "c" * 16, GIT)  # reuse keys on version + source hash; git is tags only


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store per module (creating one costs ~2 s of migrations);
    each test uses its own experiment in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    assert not (tmp_path / "mlruns").exists(), "artifacts leaked into ./mlruns"


def _cfg(store_uri: str, request) -> TrackingConfig:
    return TrackingConfig(uri=store_uri, experiment=request.node.name.replace("[", "_").replace("]", ""))


def _stage_once(cfg, key, *, reused, log=None, code=CODE):
    """A pipeline with one `distill` stage whose job reports `key` and
    whether it reused its outputs; returns the stage run."""
    lines = log if log is not None else []
    with open_pipeline_run(cfg, "pipe", tags={"experiment": "t"}, params={"a": 1}, code=code, log=lines.append) as run:
        with run.stage("distill", {"dim": 8}, {"features": "fp1"}) as st:
            if not reused:
                st.log_metrics({"loss": 0.5}, step=0)
            run.record_key(st, key, reused=reused)
    return st


# --------------------------------------------------------------------------- config, URIs


def test_resolve_uri_precedence(tmp_path, monkeypatch):
    default = resolve_uri(TrackingConfig())
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert resolve_artifact_root(TrackingConfig()) == (tmp_path / "mlflow" / "artifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(TrackingConfig()) == "http://127.0.0.1:5999"
    assert resolve_artifact_root(TrackingConfig()) is None  # the server decides
    assert resolve_uri(TrackingConfig(uri="sqlite:///x/y.db")) == "sqlite:///x/y.db"  # config key wins
    relative = TrackingConfig(uri="sqlite:///x/y.db")  # relative to the working directory
    assert resolve_artifact_root(relative) == (tmp_path / "x/artifacts").resolve().as_uri()
    assert resolve_artifact_root(TrackingConfig(artifact_root="arts")) == (tmp_path / "arts").resolve().as_uri()


def test_config_is_frozen_with_defaults():
    from features.core.config import from_dict

    cfg = from_dict(TrackingConfig, {"experiment": "x", "enabled": False})
    assert (cfg.uri, cfg.artifact_root, cfg.reuse) == ("", "", True)
    with pytest.raises(Exception):
        cfg.uri = "y"  # type: ignore[misc]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad_uris(tmp_path: Path) -> list[str]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return [
        "foo://x",
        f"sqlite:///{blocker}/sub/mlflow.db",  # folder cannot be created (a file is in the way)
        "sqlite:////proc/recsys-no-such/mlflow.db",  # read-only filesystem, even for root
        f"http://127.0.0.1:{_closed_port()}",
        "file:///tmp/mlruns",
        "mlruns",
        "sqlite:///",  # in memory: accepted before 2026-12-01, and every run and model was lost
        "sqlite:///:memory:",
    ]


@pytest.mark.parametrize("i", range(8))
def test_invalid_uri_fails_fast_with_the_uri(tmp_path, i):
    uri = _bad_uris(tmp_path)[i]
    t0 = time.monotonic()
    with pytest.raises(UsageError) as e:
        check_store(uri)
    assert uri in str(e.value)
    with pytest.raises(UsageError) as e2:  # the same before any run is opened
        with open_pipeline_run(TrackingConfig(uri=uri), "never", code=CODE):
            pytest.fail("the body must not run")
    assert uri in str(e2.value)
    assert time.monotonic() - t0 < 5


def test_invalid_uri_from_env_says_so(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    with pytest.raises(UsageError, match=r"foo://bar.*MLFLOW_TRACKING_URI"):
        connect(TrackingConfig())


def test_read_only_store_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            pytest.skip("running as root: permissions are not enforced (see /proc case)")
        except PermissionError:
            pass
        with pytest.raises(UsageError, match="ro/mlflow.db"):
            check_store(f"sqlite:///{ro}/mlflow.db")
    finally:
        ro.chmod(0o700)


def test_a_store_left_with_a_hot_journal_is_rolled_back(tmp_path, capsys):
    """A probe (2026-12-01): a torchrun worker killed while writing to the
    store left a hot journal; every later command refused the store as "an
    attempt to write a readonly database" until it was opened by hand."""
    import subprocess
    import sqlite3

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    from recsys.tracking.store import prepare_store

    prepare_store(uri)  # creates an MLflow store
    killer = ("import os, sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "c.execute('PRAGMA cache_size=1')\n"  # pages reach the file during the transaction
              "c.execute('BEGIN IMMEDIATE')\n"
              "c.execute('create table zz_probe(x)')\n"
              "c.executemany('insert into zz_probe values (?)', [(os.urandom(500),) for _ in range(2000)])\n"
              "os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", killer, str(db)], check=False)
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0
    prepare_store(uri)
    assert "rolled back a write a killed process left unfinished" in capsys.readouterr().err
    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master where type = 'table'")}
    assert "zz_probe" not in tables and "runs" in tables


def test_disabled_logs_nothing(tmp_path):
    with open_pipeline_run(TrackingConfig(uri="foo://never-checked", enabled=False), "x") as run:
        assert isinstance(run, NullTracker)
        with run.stage("distill", {"a": 1}, {"f": "x"}) as st:
            assert not st.reused and isinstance(st, Tracker)
            st.log_metrics({"loss": 1.0}, step=1)
    assert not (tmp_path / "mlflow").exists()


# Everything a stage calls on its tracker; every tracker implements all of it.
PROTOCOL = ("log_params", "log_metrics", "log_artifact", "set_tags", "log_dict", "set_outputs", "artifact_dir")


@pytest.mark.parametrize("cls", [NullTracker, RecordingTracker, ForwardingTracker, MLflowTracker, StageRun,
                                 PipelineRun, NullPipelineRun])
def test_every_tracker_implements_the_whole_protocol(cls):
    assert set(PROTOCOL) <= {n for n in dir(Tracker) if not n.startswith("_")}
    missing = [m for m in PROTOCOL if not hasattr(cls, m)]
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_forwarding_tracker_passes_every_call_on(tmp_path):
    inner = RecordingTracker()
    fwd = ForwardingTracker(inner)
    assert isinstance(fwd, Tracker) and fwd.artifact_dir is None
    fwd.log_params({"a": 1})
    fwd.log_metrics({"m": 2.0}, step=3)
    fwd.log_artifact(tmp_path / "f.png", "figures")
    fwd.set_tags({"t": "v"})
    fwd.log_dict({"k": 1}, "eval/summary.json")
    fwd.set_outputs(tmp_path)
    assert inner.params == {"a": 1} and inner.metrics == [("m", 2.0, 3)] and inner.tags == {"t": "v"}
    assert inner.artifacts == [(str(tmp_path / "f.png"), "figures")]
    assert inner.dicts == {"eval/summary.json": {"k": 1}} and inner.outputs == str(tmp_path.resolve())


# --------------------------------------------------------------------------- runs


def test_parent_and_stage_runs_record_everything(store_uri, request, tmp_path):
    cfg = _cfg(store_uri, request)
    long_value = "x" * (PARAM_VALUE_LIMIT + 500)
    params = {"name": "p", "seed": 3, "ranker": {"dim": 16, "layers": [64, 32]}, "notes": long_value}
    folder = tmp_path / "outdir"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A")
    (folder / "sub" / "b.txt").write_text("B")
    single = tmp_path / "single.json"
    single.write_text('{"k": 1}')

    with open_pipeline_run(cfg, "ml100k", tags={"experiment": "ab1", "arm": "svd", "seed": 3},
                           params=params, upstream={"features": "fp1"}, code=CODE) as run:
        assert isinstance(run, Tracker)
        with run.stage("train", {"lr": 0.01, "epochs": 3}, {"features": "fp1", "embeddings": "fp2"}) as st:
            assert isinstance(st, Tracker) and not st.reused
            for epoch in range(3):
                st.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_auc": 0.6 + 0.01 * epoch}, step=epoch)
            st.log_artifact(single)
            st.log_artifact(folder, "outputs")
            st.log_dict({"auc": 0.62}, "eval/summary.json")
            st.set_outputs(folder)
        run.log_metrics({"test_auc": 0.7})
        parent_id = run.run_id

    store = connect(cfg)
    parent = store.get_run(parent_id)
    child = store.get_run(st.run_id)
    assert parent.status == child.status == "FINISHED"
    assert child.parent_id == parent_id and parent.parent_id is None
    for r in (parent, child):
        assert r.tags["git_commit"] == GIT.commit and r.tags["git_dirty"] == "false"
        assert r.tags["code_version"] == "0.1.0" and r.tags["code_hash"] == CODE.source_hash
        assert r.tags["process.pid"] == str(os.getpid())
        assert r.tags["experiment"] == "ab1" and r.tags["arm"] == "svd" and r.tags["seed"] == "3"
        assert len(r.tags["config_hash"]) == 16 and r.tags["data_fingerprint"]
    assert parent.stage == "pipeline" and child.stage == "train"
    assert child.tags["data_fingerprint"] == fingerprint({"features": "fp1", "embeddings": "fp2"})
    assert child.tags["upstream.embeddings"] == "fp2"
    assert parent.tags["stage.train.run_id"] == child.run_id
    # flattened params, long values truncated to the limit and kept whole as an artifact
    assert parent.params["ranker.dim"] == "16" and parent.params["ranker.layers"] == "[64, 32]"
    assert len(parent.params["notes"]) <= PARAM_VALUE_LIMIT
    full = json.loads((parent.artifact_dir / "params_full.json").read_text())
    assert full["notes"] == long_value
    assert child.params == {"lr": "0.01", "epochs": "3"}
    # per-step metrics
    history = store.metric_history(child.run_id, "val_auc")
    assert [step for step, _ in history] == [0, 1, 2]
    assert [v for _, v in history] == pytest.approx([0.6, 0.61, 0.62])
    assert parent.metrics["test_auc"] == pytest.approx(0.7)
    # artifacts: a file, a folder, a dict, all under the run's local artifact folder
    art = child.artifact_dir
    assert art is not None and str(art).startswith(str(Path(store_uri[len("sqlite:///"):]).parent / "artifacts"))
    assert (art / "single.json").read_text() == '{"k": 1}'
    assert (art / "outputs" / "sub" / "b.txt").read_text() == "B"
    assert json.loads((art / "eval" / "summary.json").read_text()) == {"auc": 0.62}
    assert store.artifact_path(child.run_id, "outputs/a.txt").read_text() == "A"
    assert child.outputs == str(folder.resolve())


def test_exception_marks_runs_failed_and_is_reraised(store_uri, request):
    cfg = _cfg(store_uri, request)
    with pytest.raises(RuntimeError, match="boom"):
        with open_pipeline_run(cfg, "pipe", code=CODE) as run:
            with run.stage("train", {"lr": 1}) as st:
                raise RuntimeError("boom")
    store = connect(cfg)
    assert store.get_run(st.run_id).status == "FAILED"
    assert store.get_run(run.run_id).status == "FAILED"
    with pytest.raises(KeyboardInterrupt):
        with open_pipeline_run(cfg, "pipe", code=CODE) as run2:
            raise KeyboardInterrupt
    assert store.get_run(run2.run_id).status == "KILLED"


def test_relogging_a_param_keeps_the_resolved_value_beside_it(store_uri, request):
    cfg = _cfg(store_uri, request)
    with open_pipeline_run(cfg, "pipe", params={"a": 1, "seed": None}, code=CODE) as run:
        run.log_params({"a": 1})  # same value: fine
        run.log_params({"seed": 0})  # a library resolving a default
        run.log_params({"seed": 0})
        with pytest.raises(ValueError, match="immutable"):
            run.log_params({"seed": 3})
    params = connect(cfg).get_run(run.run_id).params
    assert params["seed"] == "null" and params["seed.resolved"] == "0" and params["a"] == "1"


# --------------------------------------------------------------------------- reuse


def test_reused_stage_names_the_run_that_computed_it(store_uri, request):
    """The job's manifest key decides reuse; the stage run carries its hash
    (`reuse_key`), and a reused stage points at the run that computed it."""
    cfg = _cfg(store_uri, request)
    key = stage_key("distill", {"dim": 8}, {"features": "fp1"}, CODE)
    first = _stage_once(cfg, key, reused=False)
    lines: list[str] = []
    second = _stage_once(cfg, key, reused=True, log=lines)
    store = connect(cfg)
    tags = store.get_run(second.run_id).tags
    assert tags["reuse_key"] == key_hash(key) == store.get_run(first.run_id).tags["reuse_key"]
    assert tags["reused"] == "true" and tags["reused_from"] == first.run_id
    assert any(f"reused from run {first.run_id}" in line for line in lines)
    hits = connect(cfg).search_runs("t", stage="pipeline")
    assert hits[0]["tags"]["stage.distill.reused"] == "true"
    assert hits[0]["tags"]["stage.distill.reused_from"] == first.run_id
    # a reused run is never an origin: a third reuse still points at the first
    third = _stage_once(cfg, key, reused=True)
    assert store.get_run(third.run_id).tags["reused_from"] == first.run_id


def test_failed_stage_is_never_an_origin(store_uri, request):
    cfg = _cfg(store_uri, request)
    key = stage_key("distill", {"dim": 8}, {"features": "fp1"}, CODE)
    with pytest.raises(RuntimeError):
        with open_pipeline_run(cfg, "pipe", code=CODE) as run:
            with run.stage("distill", {"dim": 8}, {"features": "fp1"}) as st:
                run.record_key(st, key, reused=False)
                raise RuntimeError("crash mid-training")
    assert connect(cfg).find_origin("distill", key_hash(key)) is None


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"dim": 16}},
        {"upstream": {"features": "fp2"}},
        {"code": CodeVersion("0.1.0", "d" * 16, GIT)},  # one source file changed
        {"code": CodeVersion("0.2.0", "c" * 16, GIT)},
    ],
    ids=["params", "upstream", "source", "version"],
)
def test_a_changed_key_is_not_up_to_date(tmp_path, change):
    from features.core.manifest import atomic_outputs, is_up_to_date, write_manifest

    def key(params=None, upstream=None, code=CODE):
        return stage_key("distill", params or {"dim": 8}, upstream or {"features": "fp1"}, code)

    with atomic_outputs(tmp_path / "out") as tmp:
        write_manifest(tmp, job="distill", key=key(), outputs=[], extra={})
    assert is_up_to_date(tmp_path / "out", key())
    assert not is_up_to_date(tmp_path / "out", key(**change))


def test_a_deleted_or_replaced_side_file_is_not_up_to_date(tmp_path):
    """A probe (2026-12-01): a teachers.pt of another run copied in was
    "reused" (the student trained against the wrong teachers), and a deleted
    metrics.json stayed missing: the manifest's `files` were never checked."""
    from features.core.fingerprint import file_fingerprint
    from features.core.manifest import atomic_outputs, is_up_to_date, write_manifest

    key = stage_key("teachers", {"dim": 8}, {"features": "fp1"}, CODE)
    with atomic_outputs(tmp_path / "out") as tmp:
        (tmp / "teachers.pt").write_bytes(b"weights of this run")
        (tmp / "metrics.json").write_text("{}")
        write_manifest(tmp, job="teachers", key=key, outputs=[], extra={
            "files": {"teachers.pt": file_fingerprint(tmp / "teachers.pt")}})
    out = tmp_path / "out"
    assert is_up_to_date(out, key)
    (out / "teachers.pt").write_bytes(b"weights of another run")
    assert not is_up_to_date(out, key)
    assert is_up_to_date(out, key, verify_outputs=False)  # existence only
    (out / "teachers.pt").unlink()
    assert not is_up_to_date(out, key, verify_outputs=False)
    with atomic_outputs(tmp_path / "listed") as tmp:  # names only: existence is checked
        (tmp / "metrics.json").write_text("{}")
        write_manifest(tmp, job="rank", key=key, outputs=[], extra={"files": ["metrics.json"]})
    assert is_up_to_date(tmp_path / "listed", key)
    (tmp_path / "listed" / "metrics.json").unlink()
    assert not is_up_to_date(tmp_path / "listed", key)


def test_git_state_and_unknown_code_in_the_key(tmp_path):
    """The git tags are informational: the key covers the plugin's own code.
    Unknown code is never up to date."""
    from features.core.manifest import atomic_outputs, is_up_to_date, write_manifest

    dirty = stage_key("s", {}, {}, CodeVersion("0.1.0", "c" * 16, GitInfo("a" * 40, True, "d1")))
    assert dirty == stage_key("s", {}, {}, CodeVersion("0.1.0", "c" * 16, GitInfo()))
    unknown = stage_key("s", {}, {}, CodeVersion())
    with atomic_outputs(tmp_path / "out") as tmp:
        write_manifest(tmp, job="s", key=unknown, outputs=[], extra={})
    assert not is_up_to_date(tmp_path / "out", unknown)


# --------------------------------------------------------------------------- search for compare


def test_search_runs_returns_arms_with_metrics_and_artifacts(store_uri, request, tmp_path):
    cfg = _cfg(store_uri, request)
    preds = tmp_path / "predictions.parquet"
    for arm, auc in (("control", 0.70), ("svd", 0.72)):
        preds.write_bytes(arm.encode())
        with open_pipeline_run(cfg, f"ab-{arm}", tags={"experiment": "ab1", "arm": arm, "seed": 0},
                               params={"arm": arm}, code=CODE) as run:
            with run.stage("eval", {"arm": arm}) as st:
                st.log_metrics({"test_auc": auc})
                st.log_artifact(preds)
    with open_pipeline_run(cfg, "other", tags={"experiment": "ab2", "arm": "x"}, code=CODE):
        pass

    rows = connect(cfg).search_runs("ab1", stage="eval")
    assert sorted(r["arm"] for r in rows) == ["control", "svd"]
    for r in rows:
        assert r["experiment"] == "ab1" and r["seed"] == "0" and r["status"] == "FINISHED"
        assert r["metrics"]["test_auc"] == pytest.approx({"control": 0.70, "svd": 0.72}[r["arm"]])
        assert r["params"] == {"arm": r["arm"]}
        assert r["artifact_uri"].startswith("file://")
        assert (Path(r["artifact_dir"]) / "predictions.parquet").read_bytes() == r["arm"].encode()
    assert len(connect(cfg).search_runs("ab1")) == 4  # parents and stages
    assert connect(cfg).search_runs("nope") == []


def test_store_reuses_existing_experiment(store_uri, request):
    cfg = _cfg(store_uri, request)
    a, b = RunStore.connect(cfg), RunStore.connect(cfg)
    assert a.experiment_id == b.experiment_id
    assert isinstance(a.create_run("r", {"stage": "x"}), MLflowTracker)


# --------------------------------------------------------------------------- git


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_info_commit_dirty_and_diff_hash(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_info(repo) == GitInfo()  # not a repository yet
    _git(repo, "init", "-q")
    (repo / "m.py").write_text("x = 1\n")
    _git(repo, "add", "m.py")
    _git(repo, "commit", "-q", "-m", "one")
    clean = git_info(repo)
    assert len(clean.commit) == 40 and clean.dirty is False and clean.diff_hash == ""
    assert clean.tags()["git_dirty"] == "false"
    (repo / "m.py").write_text("x = 2\n")
    d1 = git_info(repo)
    assert d1.commit == clean.commit and d1.dirty is True and d1.diff_hash
    assert git_info(repo) == d1  # same changes, same hash
    (repo / "new.py").write_text("y = 1\n")  # an untracked code file counts
    d2 = git_info(repo)
    assert d2.diff_hash != d1.diff_hash
    (repo / "out.bin").write_bytes(b"\0")  # an untracked output does not
    assert git_info(repo) == d2
    store = repo / "mlflow"
    store.mkdir()
    (store / "config.yaml").write_text("a: 1\n")  # nor anything in the tracking store
    assert git_info(repo, ignore=(store,)) == d2
    assert git_info(repo / "mlflow", ignore=(store,)) == d2  # from a subfolder: the whole repo


def test_a_second_run_into_a_locked_folder_waits_for_the_first(tmp_path):
    """A probe (2026-12-01): two `rank train` runs of different configs into one
    --out read each other's checkpoints and reported the other's model, exit 0.
    The run lock makes the second wait, saying so."""
    code = ("import sys; from pathlib import Path; from features.core.manifest import run_lock\n"
            "with run_lock([Path(sys.argv[1])], log=lambda m: print(m, flush=True)): print('got', flush=True)\n")
    folder = tmp_path / "out"
    from features.core.manifest import run_lock

    with run_lock([folder]):
        child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                                 cwd=Path(__file__).resolve().parents[2])
        first = child.stdout.readline()
        assert first.startswith("waiting: another run is writing") and str(folder.resolve()) in first, first
        time.sleep(0.3)
        assert child.poll() is None  # still waiting while the lock is held
    assert child.stdout.readline().strip() == "got" and child.wait(30) == 0
    with run_lock([folder], rank=0), run_lock([folder], rank=1):  # a torchrun job's ranks lock rank by rank
        pass


def test_run_rank_holds_the_run_lock_while_it_trains(tmp_path, monkeypatch):
    import fcntl
    from types import SimpleNamespace

    from recsys import stages

    seen = []

    def fake(job, tracker, out, *, force, log):
        for name in (".out.run.lock", ".ckpt.run.lock"):
            with open(tmp_path / name) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append((name, "free"))
                except BlockingIOError:
                    seen.append((name, "held"))
        return "done"

    monkeypatch.setattr(stages, "_run_rank", fake)
    job = SimpleNamespace(train=SimpleNamespace(checkpoints=lambda out: tmp_path / "ckpt"))  # a checkpoint_dir outside out
    assert stages.run_rank(job, None, tmp_path / "out") == "done"
    assert seen == [(".out.run.lock", "held"), (".ckpt.run.lock", "held")]


def test_figures_older_than_what_they_show_are_redrawn_on_reuse(tmp_path):
    """A probe (2026-12-01): a run killed after its rank manifest, before its
    plots, left the earlier run's training curves beside the new metrics, and
    every rerun reused the folder without redrawing them."""
    from types import SimpleNamespace

    from recsys.pipeline import _plots_stale

    out = tmp_path / "arm"
    (out / "checkpoints").mkdir(parents=True)
    job = SimpleNamespace(model=SimpleNamespace(history_encoder="svd_compact"),
                          train=SimpleNamespace(checkpoints=lambda o: o / "checkpoints"))
    for name in ("metrics.json", "checkpoints/best.pt"):
        (out / name).write_text("{}")
        os.utime(out / name, (2_000, 2_000))
    assert _plots_stale(out, job)  # no figures yet
    for name in ("training_curves.png", "history_spectrum.png"):
        (out / name).write_bytes(b"png")
        os.utime(out / name, (1_000, 1_000))
    assert _plots_stale(out, job)  # older than metrics.json and best.pt
    os.utime(out / "training_curves.png", (3_000, 3_000))
    assert _plots_stale(out, job)  # the spectrum is still older than best.pt
    os.utime(out / "history_spectrum.png", (3_000, 3_000))
    assert not _plots_stale(out, job)
    assert not _plots_stale(out, SimpleNamespace(model=SimpleNamespace(history_encoder="mean"), train=job.train))


def test_a_killed_runs_model_version_is_not_reused(store_uri, request):
    """A probe (2026-12-01): a rerun after a kill reused the model version the
    killed stage run had registered, so the finished experiment's model (and a
    later promote) pointed at a KILLED run."""
    from mlflow.tracking import MlflowClient

    from recsys.tracking.models import _find

    client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
    exp = client.create_experiment(request.node.name)
    name = f"m-{request.node.name}"
    client.create_registered_model(name)
    killed, done, current = (client.create_run(exp).info.run_id for _ in range(3))
    client.set_terminated(killed, status="KILLED")
    client.set_terminated(done, status="FINISHED")
    client.create_model_version(name, "file:///x", run_id=killed, tags={"reuse_key": "k1"})
    assert _find(client, name, "k1", current) is None
    client.create_model_version(name, "file:///y", run_id=current, tags={"reuse_key": "k1"})
    assert _find(client, name, "k1", current).version == "2"  # the running stage's own version counts
    v3 = client.create_model_version(name, "file:///z", run_id=done, tags={"reuse_key": "k2"})
    client.create_model_version(name, "file:///w", run_id=killed, tags={"reuse_key": "k2"})
    assert _find(client, name, "k2", current).version == str(v3.version)


def test_a_run_waiting_for_the_lock_stops_on_ctrl_c_and_torchrun_jobs_exclude_each_other(tmp_path):
    """A verification probe (2026-12-01): a waiting run ignored Ctrl-C until the
    other run ended (a blocking flock), and two torchrun jobs into one --out
    trained together (their ranks shared the lock)."""
    import signal

    from features.core.manifest import run_lock

    folder = tmp_path / "out"
    code = ("import sys; from pathlib import Path; from features.core.manifest import run_lock\n"
            "with run_lock([Path(sys.argv[1])], rank=int(sys.argv[2]), log=lambda m: print(m, flush=True)):\n"
            "    print('got', flush=True)\n")
    repo = Path(__file__).resolve().parents[2]
    with run_lock([folder], rank=1):  # rank 1 of a running job
        child = subprocess.Popen([sys.executable, "-c", code, str(folder), "1"], stdout=subprocess.PIPE, text=True, cwd=repo)
        assert child.stdout.readline().startswith("waiting: another run is writing")  # rank 1 of a second job
        t0 = time.perf_counter()
        child.send_signal(signal.SIGINT)
        assert child.wait(10) != 0 and time.perf_counter() - t0 < 5
        other_rank = subprocess.run([sys.executable, "-c", code, str(folder), "2"], capture_output=True, text=True,
                                    cwd=repo, timeout=30)
        assert other_rank.stdout.strip() == "got"  # another rank's lock is free


def test_a_recomputed_rank_stage_trains_afresh_and_old_code_checkpoints_do_not_resume(monkeypatch):
    """A verification probe (2026-12-01): after a code change (or with
    tracking.reuse false in an experiment) the rank stage reran but resumed
    the finished last.pt: 0 epochs trained, the old model reported under the
    new key, exit 0."""
    from types import SimpleNamespace

    from recsys import stages
    from recsys.config.sections import TrainConfig
    from recsys.train import checkpoint

    seen = []
    monkeypatch.setattr(stages, "rank_key", lambda job: seen.append(job.train.resume) or (_ for _ in ()).throw(KeyError))
    from recsys.config import PipelineConfig
    from recsys.plan import plan_rank

    job = plan_rank(PipelineConfig())
    assert job.train.resume
    for force in (True, False):
        with pytest.raises(KeyError):
            stages._run_rank(job, None, Path("unused"), force=force, log=lambda _m: None)
    assert seen == [False, True]

    class Code:
        version, source_hash = "0", "a"

    data = SimpleNamespace(input_files={}, config=TrainConfig(), spec=TrainConfig())  # any dataclasses serve here
    from recsys.config.sections import RankerConfig

    monkeypatch.setattr(checkpoint, "plugin_code", lambda: Code)
    before = checkpoint.resume_key(RankerConfig(), TrainConfig(), 0, data, 1)
    Code.source_hash = "b"
    assert checkpoint.resume_key(RankerConfig(), TrainConfig(), 0, data, 1) != before
