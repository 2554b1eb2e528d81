"""`recsys ui` round trip: start the server the way the CLI does, log a run
through it over HTTP, read it back, SIGTERM it and check nothing is left."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from recsys.cli import ui
from recsys.tracking import TrackingConfig, open_pipeline_run

REPO = Path(__file__).resolve().parents[2]
# The `recsys ui` handler, reached through ui.register exactly as the CLI does.
RUN_UI = (
    "import argparse, sys\n"
    "from recsys.cli import ui\n"
    "p = argparse.ArgumentParser(prog='recsys'); ui.register(p.add_subparsers())\n"
    "args = p.parse_args(sys.argv[1:])\n"
    "sys.exit(args.handler(args))\n"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys")
    ui.register(p.add_subparsers(dest="command"))
    return p


def test_register_defaults_and_flags():
    args = _parser().parse_args(["ui"])
    assert (args.port, args.host, args.store, args.handler) == (5000, "127.0.0.1", None, ui._ui)
    args = _parser().parse_args(["ui", "--port", "5123", "--store", "sqlite:///x/mlflow.db"])
    assert args.port == 5123 and args.store == "sqlite:///x/mlflow.db"
    assert ui._tracking_config(args) == TrackingConfig(uri="sqlite:///x/mlflow.db")


def test_ui_checks_its_config_whole(tmp_path):
    """A probe (2026-12-01): `trackng:` (a typo) or an A/B experiment file was
    ignored, and the UI served (and created) ./mlflow."""
    from features.core.errors import ConfigError

    good = tmp_path / "good.yaml"
    good.write_text(f"name: x\ntracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n")
    assert ui._tracking_config(_parser().parse_args(["ui", "--config", str(good)])).uri == f"sqlite:///{tmp_path}/m.db"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"trackng: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n")
    with pytest.raises(ConfigError, match="did you mean 'tracking'"):
        ui._tracking_config(_parser().parse_args(["ui", "--config", str(bad)]))


def test_ui_refuses_a_server_uri(capsys):
    from features.core.errors import UsageError

    args = _parser().parse_args(["ui", "--store", "http://127.0.0.1:1"])
    with pytest.raises(UsageError, match="http://127.0.0.1:1") as e:
        args.handler(args)
    assert "(from --store)" in str(e.value)  # not "from tracking.uri in the config": there was no config


def test_ui_names_its_flag_for_a_bad_store_file(tmp_path):
    from features.core.errors import UsageError

    (tmp_path / "notdb.db").write_text("hello")
    args = _parser().parse_args(["ui", "--port", str(_free_port()), "--store", f"sqlite:///{tmp_path / 'notdb.db'}"])
    with pytest.raises(UsageError, match="fix --store$"):
        args.handler(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"recsys ui exited early:\n{log.read_text()}"
        try:
            with opener.open(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server not healthy after {timeout} s:\n{log.read_text()}")


def _session_members(sid: int) -> list[int]:
    """Live processes in session `sid` (the server's own session)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session
                out.append(int(d.name))
    return out


def _server_pid(log: Path) -> int | None:
    for line in log.read_text().splitlines():
        if "server pid" in line:
            return int(line.rsplit("server pid", 1)[1].strip(" )"))
    return None


@pytest.mark.slow
def test_ui_round_trip(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN_UI, "ui", "--port", str(port), "--store", store],
            cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )
    server_pid = None
    try:
        _wait_health(url, proc, log)
        deadline = time.monotonic() + 10  # the URL line follows /health within a poll
        while server_pid is None and time.monotonic() < deadline:
            server_pid = _server_pid(log)
            time.sleep(0.1)
        assert f"MLflow UI: {url}" in log.read_text()

        # log a run THROUGH the server
        artifact = tmp_path / "note.txt"
        artifact.write_text("hello")
        cfg = TrackingConfig(uri=url, experiment="ui-roundtrip")
        with open_pipeline_run(cfg, "via-http", tags={"experiment": "ui"}, params={"lr": 0.5}) as run:
            run.log_metrics({"auc": 0.75}, step=1)
            run.log_artifact(artifact)

        # read it back over HTTP
        got = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run.run_id}")["run"]
        assert got["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in got["data"]["params"]}["lr"] == "0.5"
        metric = {m["key"]: m for m in got["data"]["metrics"]}["auc"]
        assert metric["value"] == pytest.approx(0.75) and int(metric["step"]) == 1
        assert {t["key"]: t["value"] for t in got["data"]["tags"]}["stage"] == "pipeline"
        files = _get(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run.run_id}").get("files", [])
        assert "note.txt" in {f["path"] for f in files}
        # the artifact landed under the store's artifact root, not ./mlruns or ./mlartifacts
        assert list((tmp_path / "store" / "artifacts").rglob("note.txt"))
        assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()

        # SIGTERM stops it cleanly, workers included
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "stopping the MLflow UI" in log.read_text()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        if server_pid is not None and Path("/proc").is_dir():
            deadline = time.monotonic() + 5
            while _session_members(server_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _session_members(server_pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)  # the server's own group, started by this test
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.slow
def test_ui_stops_on_ctrl_c_with_polars_loaded(tmp_path):
    """Found 2026-11-30: polars' runtime replaces the SIGINT handler with one
    flagged SA_RESTART, so the wait on the server was restarted and Ctrl-C did
    nothing (`recsys ui` imports polars through the store checks)."""
    port = _free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = "import polars as pl\npl.DataFrame({'a': [1]}).sum()\n" + RUN_UI
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "ui", "--port", str(port), "--store", f"sqlite:///{tmp_path / 'mlflow.db'}"],
            cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + 10
        while "Ctrl-C stops it" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "stopping the MLflow UI" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
