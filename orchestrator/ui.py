"""Start the MLflow UI on a workspace's backend, light settings, bound to 127.0.0.1.

``mlflow server`` with defaults starts about 15 processes (2.4 GB); with ``--workers 1`` and
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` it is 2 processes (about 0.46 GB). The server runs in
its own process group so that stopping sspctl (Ctrl-C, SIGTERM, SIGHUP) terminates its workers too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.workspace import Workspace

HOST = "127.0.0.1"
DEFAULT_PORT = 5000


class UiError(RuntimeError):
    """The UI could not be started; one line."""


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def server_command(workspace: Workspace, port: int, host: str = HOST) -> list[str]:
    """The ``mlflow server`` command line for ``workspace`` (same interpreter as sspctl)."""
    uri = workspace.tracking_uri
    if uri.startswith(("http://", "https://")):
        raise UiError(f"MLFLOW_TRACKING_URI is already a tracking server ({uri}); open it in a browser instead")
    artifacts = workspace.root / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    program = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *program, "server",
        "--backend-store-uri", uri,
        "--artifacts-destination", str(artifacts),
        "--host", host, "--port", str(port),
        "--workers", "1",
    ]


def start_ui(
    workspace: Workspace, port: int = DEFAULT_PORT, host: str = HOST, log_file: Path | None = None, inherit: bool = False
) -> subprocess.Popen:
    """Start the server in its own process group and return it (not yet known to be ready).

    Its output goes to ``log_file`` (appended), to this terminal with ``inherit``, else nowhere.

    Raises:
        UiError: the port is taken or the backend is a remote server.
    """
    if port_in_use(port, host):
        raise UiError(f"port {port} on {host} is already in use (choose another with --port)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    out = None if inherit else open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        server_command(workspace, port, host), env=env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 60.0) -> None:
    """Poll ``{url}/health`` until the server answers.

    Raises:
        UiError: the process exited or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UiError(f"mlflow server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise UiError(f"mlflow server did not answer at {url} within {timeout_s:.0f}s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_ui(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL for anything left after ``timeout_s``.

    The group outlives its leader when ``mlflow server`` exits before its uvicorn worker, so the
    group is checked, not just the leader.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    deadline = time.monotonic() + timeout_s
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout_s)


def serve(workspace: Workspace, port: int = DEFAULT_PORT, host: str = HOST, echo: object = print) -> int:
    """Run the UI in the foreground until Ctrl-C, SIGTERM or SIGHUP; returns the server's exit code (0 when stopped).

    SIGTERM and SIGHUP arrive as ``KeyboardInterrupt`` once ``orchestrator.signals.install`` ran (the
    CLI does); either way the server's process group is killed on the way out.
    """
    proc = start_ui(workspace, port, host, inherit=True)
    url = f"http://{host}:{port}"
    try:
        wait_ready(proc, url)
        echo(f"MLflow UI for {workspace.tracking_uri} at {url} (Ctrl-C to stop)")  # type: ignore[operator]
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_ui(proc)
