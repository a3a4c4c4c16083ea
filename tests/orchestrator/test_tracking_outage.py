"""A tracking outage loses nothing: a real ``mlflow server`` killed mid-run and restarted, and a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.tracking import SPOOL_NAME, MlflowTracker, finish_run
from orchestrator.ui import free_port, wait_ready


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` over ``root/mlflow.db`` with proxied artifacts under ``root/artifacts``."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_ready(proc, f"http://127.0.0.1:{port}", timeout_s=120)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


class LiveServer:
    """A real server on a free port with one run; ``kill`` and ``restart`` keep the port and the database."""

    def __init__(self, root: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = _start_server(root, self.port)
        self.client = MlflowClient(self.uri)
        self.run_id = self.client.create_run(self.client.create_experiment("outage")).info.run_id

    def kill(self) -> None:
        _kill(self.proc)

    def restart(self) -> None:
        self.proc = _start_server(self.root, self.port)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path)
    yield live
    if live.proc.poll() is None:
        live.kill()


@pytest.mark.slow
def test_server_killed_mid_run_then_restarted_gets_every_metric_artifact_and_the_status(
    server: LiveServer, tmp_path: Path
) -> None:
    uri, client, run_id = server.uri, server.client, server.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spool = run_dir / SPOOL_NAME
    tracker = MlflowTracker(uri, run_id, retry_after_s=0.0, spool=spool)
    tracker.log_metrics({"loss": 3.0}, step=0)
    assert not spool.exists()

    server.kill()  # after epoch 0 of 3
    for step, loss in ((1, 2.0), (2, 1.0)):
        tracker.log_metrics({"loss": loss}, step=step)  # training goes on; nothing raises
    (run_dir / "encoder.pt").write_bytes(b"weights")
    tracker.log_artifact(run_dir / "encoder.pt", "weights")
    assert len(json.loads(spool.read_text())["records"]) == 3

    # The end of the run while the server is still down: everything, the status included, stays spooled.
    result = finish_run(uri, run_id, "FINISHED", spool, wait_s=0.5)
    assert not result.ok and result.pending == 4
    assert str(spool) in result.line(run_id, uri) and "sspctl sync" in result.line(run_id, uri)

    server.restart()
    synced = CliRunner().invoke(app, ["sync", "--output", str(tmp_path)])
    assert synced.exit_code == 0, synced.output
    assert not spool.exists()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [a.path for a in client.list_artifacts(run_id, "weights")] == ["weights/encoder.pt"]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_buffer_is_flushed_in_order_when_the_server_comes_back_during_training(
    server: LiveServer, tmp_path: Path
) -> None:
    uri, client, run_id = server.uri, server.client, server.run_id
    tracker = MlflowTracker(uri, run_id, retry_after_s=0.0, spool=tmp_path / SPOOL_NAME)
    server.kill()
    tracker.log_metrics({"loss": 1.0}, step=0)
    server.restart()
    tracker.log_metrics({"loss": 0.5}, step=1)  # flushes the buffered step first
    assert tracker.pending == [] and not (tmp_path / SPOOL_NAME).exists()
    assert finish_run(uri, run_id, "FINISHED", tmp_path / SPOOL_NAME, wait_s=5).ok
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(0, 1.0), (1, 0.5)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_artifact_write_on_a_full_disk_is_kept_and_synced_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC in the local artifact store: one warning, training goes on, the artifact is logged later."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("disk", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    (tmp_path / "model.pt").write_bytes(b"m")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", full)
    tracker = MlflowTracker(uri, run_id, retry_after_s=0.0, spool=tmp_path / SPOOL_NAME)
    tracker.log_artifact(tmp_path / "model.pt", "model")
    tracker.log_artifact(tmp_path / "model.pt", "model2")
    warnings = [r.getMessage() for r in caplog.records if r.name == "sspctl.tracking"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not finish_run(uri, run_id, "FINISHED", tmp_path / SPOOL_NAME, wait_s=0).ok
    assert client.get_run(run_id).info.status == "RUNNING"

    monkeypatch.undo()  # space freed
    result = CliRunner().invoke(app, ["sync", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert {a.path for a in client.list_artifacts(run_id)} == {"model", "model2"}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sync_with_the_server_still_down_exits_1_and_keeps_the_records(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker(uri, "0" * 32, retry_after_s=0.0, spool=tmp_path / "r" / SPOOL_NAME)
    (tmp_path / "r").mkdir()
    tracker.log_metrics({"loss": 1.0}, step=0)
    result = CliRunner().invoke(app, ["sync", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "still have pending tracking records" in result.output
    assert len(json.loads((tmp_path / "r" / SPOOL_NAME).read_text())["records"]) == 1
