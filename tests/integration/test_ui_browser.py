"""`recsys ui` in a real browser: headless Chromium (Debian's package, from
`make browser`) driven by Playwright opens the debug experiment and waits
until the page shows its arms and their metrics. Never skips: without the
browser the test fails and says how to install it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium")
ARMS = ("control", "match", "match_svd", "lightgbm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def ui_server(debug_experiment, tmp_path):
    port = _free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "ui", "--port", str(port), "--store", debug_experiment.uri],
                            cwd=debug_experiment.root, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _api(base, "/api/2.0/mlflow/experiments/search?max_results=5")
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "recsys ui did not answer within 120 s"
                time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_experiment_page_shows_arms_and_metrics_in_chromium(ui_server, tmp_path):
    assert Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install -y chromium)"
    from playwright.sync_api import sync_playwright

    exp = next(e for e in _api(ui_server, "/api/2.0/mlflow/experiments/search?max_results=50")["experiments"]
               if e["name"] == "recsys")
    eid = exp["experiment_id"]
    runs = _api(ui_server, "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [eid], "filter": "tags.stage = 'eval' and tags.experiment = 'debug_ab'"})["runs"]
    eval_run = runs[0]["info"]["run_id"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # the experiment's runs: the experiment's parent run is listed
            page.goto(f"{ui_server}/#/experiments/{eid}/runs")
            page.get_by_text("experiment debug_ab").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "experiment.png"))
            # its comparison run: a metric per arm (auc.<arm>, gauc.<arm>, ... with values)
            page.goto(f"{ui_server}/#/experiments/{eid}/runs/{eval_run}")
            for arm in ARMS:
                page.get_by_text(f"gauc.{arm}", exact=True).first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "arms_metrics.png"), full_page=True)
        finally:
            browser.close()
    for arm in ARMS:
        assert re.search(rf"gauc\.{arm}\s+0\.\d+", text), f"no gauc value for arm {arm} on the page"
    assert (tmp_path / "experiment.png").stat().st_size > 10_000
    assert (tmp_path / "arms_metrics.png").stat().st_size > 10_000
