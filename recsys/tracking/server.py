"""`recsys ui`: `mlflow server` over the project's store, as a child process
tied to ours (never outliving `recsys ui`), with the port and host checked
first and a loud warning for any host beyond this machine."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from typing import Any

from features.core.errors import RecsysError, UsageError
from recsys.tracking.config import TrackingConfig
from recsys.tracking.store import (
    SQL_SCHEMES,
    Log,
    _http_get,
    _resolve,
    _stderr,
    _stdout,
    check_store,
    prepare_store,
    resolve_artifact_root,
)

LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def check_port(port: int) -> int:
    """UsageError unless `port` is a TCP port a server can listen on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: a TCP port is 1..65535")
    return port


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _port_free(host: str, port: int) -> bool:
    """True when `port` on `host` can be bound; UsageError when `host` itself
    is not an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r}: cannot resolve it ({e.strerror})") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            if e.errno == errno.EACCES:
                raise UsageError(f"--port {port}: permission denied (ports below 1024 need privileges)") from e
            raise UsageError(f"--host {host!r}: cannot listen on it ({e.strerror})") from e
    return True


def _die_with_parent() -> None:
    """preexec_fn of the server: SIGTERM it when `recsys ui` dies, even by
    SIGKILL (Linux). mlflow forwards SIGTERM to its uvicorn child."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# Runs beside the server: when `recsys ui` dies (its pipe closes, whatever
# killed it), SIGTERM then SIGKILL the server's whole process group, so no
# worker is left listening. Own session: a terminal's Ctrl-C does not reach it.
WATCHDOG = """\
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pgid = int(sys.argv[1])
sys.stdin.buffer.read()
for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        break
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            sys.exit(0)
        time.sleep(0.1)
"""


class MlflowServer:
    """`mlflow server` as a child process in its own process group, so that
    stopping it (SIGTERM, then SIGKILL after `timeout`) takes its workers too.
    Its life is tied to ours: it gets SIGTERM when we die (PR_SET_PDEATHSIG),
    and a watchdog kills its group when our end of a pipe closes."""

    def __init__(self, store_uri: str, artifact_root: str | None, host: str = "127.0.0.1", port: int = 5000) -> None:
        self.store_uri = store_uri
        self.artifact_root = artifact_root
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store_uri]
        if self.artifact_root:
            cmd += ["--default-artifact-root", self.artifact_root, "--artifacts-destination", self.artifact_root]
        return cmd + ["--host", self.host, "--port", str(self.port), "--workers", "1"]

    def start(self, **popen: Any) -> MlflowServer:
        check_port(self.port)
        if not _port_free(self.host, self.port):
            raise UsageError(f"port {self.port} on {self.host} is in use; pick another with --port")
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: a faster start, one process
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        self.proc = subprocess.Popen(
            self.command(), env=env, start_new_session=True, preexec_fn=_die_with_parent, **popen
        )
        if os.name == "posix":
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(self.proc.pid)], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /health until it answers; RecsysError if the server exits or
        `timeout` passes."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RecsysError(f"mlflow server exited with status {self.proc.returncode} before it was ready")
            try:
                if _http_get(f"{self.url}/health", 1.0) == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RecsysError(f"mlflow server at {self.url} not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server's process group; SIGKILL it after `timeout` s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
        self._signal_group(signal.SIGKILL)  # stragglers of the group, if any
        if self.watchdog is not None:
            self.watchdog.stdin.close()  # the group is gone: it finds nothing to kill
            try:
                self.watchdog.wait(10)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # the group we created (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> MlflowServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _Stop(Exception):
    pass


def server_for(cfg: TrackingConfig, host: str = "127.0.0.1", port: int = 5000, *, warn: Log = _stderr,
               uri_source: str | None = None) -> MlflowServer:
    """An (unstarted) UI server over the configured embedded store; checks
    the port and host first, and creates the store (under its lock) so the
    server never races a pipeline on a fresh one."""
    check_port(port)
    if not is_loopback(host):
        warn(
            f"WARNING: --host {host} exposes the MLflow UI and its REST API beyond this machine WITHOUT "
            f"authentication: anyone who can reach port {port} can read, change and delete every run and "
            "artifact. Use --host 127.0.0.1 (and an SSH tunnel) unless this network is trusted."
        )
    uri, source = _resolve(cfg)
    source = uri_source or source  # `recsys ui --store` names its flag, not the config
    if not uri.startswith("sqlite:") and urllib.parse.urlparse(uri).scheme not in SQL_SCHEMES:
        raise UsageError(
            f"`recsys ui` serves a database store; {uri!r} (from {source}) is not one "
            "(a server URI is already a UI: open it in a browser); pass --store sqlite:///path/mlflow.db"
        )
    if not _port_free(host, port):
        raise UsageError(f"port {port} on {host} is in use; pick another with --port")
    check_store(uri, source=source)
    prepare_store(uri, source)
    return MlflowServer(uri, resolve_artifact_root(cfg, uri), host, port)


def serve(cfg: TrackingConfig, host: str = "127.0.0.1", port: int = 5000, *, out: Log = _stdout,
          ready_timeout: float = 60.0, uri_source: str | None = None) -> int:
    """Run the MLflow UI over the configured store until Ctrl-C or SIGTERM
    (`uri_source`: where cfg.uri came from, for messages; default: the config)."""
    server = server_for(cfg, host, port, uri_source=uri_source)

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    old_term = signal.signal(signal.SIGTERM, on_term)
    # Python's own SIGINT handler, installed afresh: polars' runtime replaces the
    # C-level one with a handler flagged SA_RESTART, under which the blocking
    # wait below was restarted on Ctrl-C and never raised (found 2026-11-30)
    old_int = signal.signal(signal.SIGINT, on_term)
    try:
        server.start()
        try:
            server.wait_ready(ready_timeout)
            out(f"MLflow UI: {server.url}  (server pid {server.proc.pid})")
            out(f"store: {server.store_uri}   artifacts: {server.artifact_root or '(store default)'}")
            out(f"log to it with MLFLOW_TRACKING_URI={server.url}; Ctrl-C stops it")
            code = server.proc.wait()
            raise RecsysError(f"mlflow server exited on its own with status {code}")
        except (KeyboardInterrupt, _Stop):
            out("stopping the MLflow UI")
            return 0
        finally:
            # A second Ctrl-C/SIGTERM must not cut the cleanup short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            server.stop()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
