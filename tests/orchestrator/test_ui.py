"""``sspctl ui``: a real ``mlflow server`` subprocess serving the workspace's study over REST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.study_tracking import grid_parent_run, open_study
from orchestrator.ui import UiError, free_port, port_in_use, server_command, start_ui, wait_ready
from orchestrator.workspace import Workspace


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_server_command_uses_light_settings_and_refuses_remote_backends(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = Workspace.resolve(tmp_path)
    command = server_command(ws, 5123)
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    with pytest.raises(UiError, match="already a tracking server"):
        server_command(ws, 5123)


def test_start_ui_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(UiError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_ui(Workspace.resolve(tmp_path), port)


@pytest.mark.slow
def test_sspctl_ui_serves_the_study_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ws = Workspace(tmp_path.resolve())
    study = open_study(f"sqlite:///{ws.root / 'mlflow.db'}", "ui-study", ws.artifact_root)
    parent = grid_parent_run(study, "g-ui", tags={"dataset_hash": "h"})
    port = free_port()
    sspctl = Path(sys.executable).with_name("sspctl")
    proc = subprocess.Popen([str(sspctl), "ui", "--output", str(ws.root), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # Wait for sspctl's own "ready" line, not just the server: Ctrl-C before it would race the message.
        deadline = time.monotonic() + 120
        while f"at {url}" not in "".join(lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"at {url}" in "".join(lines), "".join(lines)
        wait_ready(proc, url, timeout_s=10)
        experiments = _get(f"{url}/api/2.0/mlflow/experiments/search?max_results=100")["experiments"]
        ids = {e["name"]: e["experiment_id"] for e in experiments}
        assert "ui-study" in ids
        runs = _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [ids["ui-study"]]})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [parent]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
    deadline = time.monotonic() + 20
    while port_in_use(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not port_in_use(port), "the mlflow server outlived sspctl ui"
