"""``sspctl submit|status|logs`` against a real local Ray cluster started by this module.

The cluster is started with ``ray start --head --block`` in its own session, its own temp dir and
free ports, and torn down by killing only its processes (those whose command line names its
temp dir): a plain ``ray stop`` would kill other people's local Ray clusters too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.submit import DEFAULT_ADDRESS, SubmitError, check_reachable, resolve_address

BIN = Path(sys.executable).parent  # the venv's bin: holds `ray` and `sspctl`


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _kill_cluster(leader: subprocess.Popen, temp_dir: Path) -> None:
    """Stop this cluster only: its `ray start` session, then any process naming its temp dir."""
    try:
        os.killpg(leader.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        leader.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leader.wait(timeout=5)
    for _ in range(3):
        leftovers = _pids_naming(str(temp_dir))
        if not leftovers:
            return
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _pids_naming(marker: str) -> list[int]:
    """Our own processes whose command line contains ``marker`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    temp_dir = Path(tempfile.mkdtemp(prefix="sspd", dir="/tmp"))  # short: unix socket paths <= 107 bytes
    (gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics) = _free_ports(9)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's shell must find `sspctl`
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    log = open(temp_dir / "ray-start.log", "wb")
    leader = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--include-dashboard=true", "--num-cpus=1", f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if leader.poll() is not None:
                pytest.fail(f"ray start exited: {(temp_dir / 'ray-start.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("local Ray dashboard did not come up in 120 s")
            time.sleep(0.5)
        yield address
    finally:
        _kill_cluster(leader, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_submitted_sspctl_command_runs_and_its_logs_come_back(ray_address: str) -> None:
    result = _invoke(
        "submit", "--address", ray_address, "--submission-id", "sspctl-test-ok", "--env", "SSPCTL_PROBE=42",
        "--", "sh", "-c", "echo probe=$SSPCTL_PROBE && sspctl deploy --help",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "sspctl-test-ok"  # the job id, printed without waiting
    followed = _invoke("logs", "--follow", "sspctl-test-ok", "--address", ray_address)
    assert followed.exit_code == 0, followed.output
    assert "probe=42" in followed.output and "render" in followed.output  # `sspctl deploy --help` ran there
    status = _invoke("status", "sspctl-test-ok", "--address", ray_address)
    assert status.exit_code == 0 and "SUCCEEDED" in status.output and "sspctl deploy --help" in status.output
    logs = _invoke("logs", "sspctl-test-ok", "--address", ray_address)
    assert logs.exit_code == 0 and "Kubernetes deployment" in logs.output
    again = _invoke("submit", "--address", ray_address, "--submission-id", "sspctl-test-ok", "--", "true")
    assert again.exit_code != 0 and "already exists" in again.output  # duplicate ids are refused


@pytest.mark.slow
def test_failing_job_reports_failure_and_exits_non_zero(ray_address: str, monkeypatch) -> None:
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", ray_address)  # address from the environment
    result = _invoke("submit", "--follow", "--", "sspctl", "no-such-command")
    assert result.exit_code != 0
    assert "No such command" in result.output  # the job's own stderr came back
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: job raysubmit_") and "FAILED" in last
    job_id = result.output.splitlines()[0].strip()
    status = _invoke("status", job_id)
    assert status.exit_code != 0 and "FAILED" in status.output


@pytest.mark.slow
def test_unknown_job_is_a_clear_error(ray_address: str) -> None:
    result = _invoke("status", "raysubmit_doesnotexist", "--address", ray_address)
    assert result.exit_code != 0
    assert result.output.strip() == f"error: no job 'raysubmit_doesnotexist' on {ray_address}"


def test_unreachable_address_fails_fast_with_one_line() -> None:
    (port,) = _free_ports(1)
    start = time.monotonic()
    result = _invoke("submit", "--address", f"127.0.0.1:{port}", "--", "sspctl", "--help")
    assert time.monotonic() - start < 10
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port}")


def test_silent_address_times_out_quickly() -> None:
    # A listening socket that never answers HTTP: the client must give up after its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(SubmitError, match="no answer in 1s"):
            check_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
        assert time.monotonic() - start < 5


def test_address_resolution_order(monkeypatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address() == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert resolve_address() == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.org/")
    assert resolve_address() == "https://ray.example.org"
    assert resolve_address("http://head:8265") == "http://head:8265"
    with pytest.raises(SubmitError, match="Ray Client address"):
        resolve_address("ray://head:10001")


class _AgentStartingClient:
    """Ray's job API on a cluster whose job agent is still starting: refuses ``refusals`` times, then accepts."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.calls = refusals, 0

    def submit_job(self, **_: object) -> str:
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
        return "sspctl-agent-late"


def test_submit_waits_for_a_job_agent_that_is_still_starting(monkeypatch) -> None:
    """The 500 'No available agent' of a just-started cluster is retried (it came before the job existed);
    after ``AGENT_WAIT_S`` it is the usual one-line error. A stand-in client: a real agent's start cannot be timed."""
    from orchestrator import submit

    monkeypatch.setattr(submit.time, "sleep", lambda _s: None)
    client = object.__new__(submit.JobClient)
    client.address, client._client = "http://127.0.0.1:1", _AgentStartingClient(refusals=3)
    assert client.submit(["true"], submission_id="sspctl-agent-late") == "sspctl-agent-late"
    assert client._client.calls == 4
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 0.0)
    client._client = _AgentStartingClient(refusals=1)
    with pytest.raises(submit.SubmitError, match="^submitting to http://127.0.0.1:1 failed: .*No available agent"):
        client.submit(["true"])
