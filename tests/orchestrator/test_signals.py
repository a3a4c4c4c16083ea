"""SIGTERM, SIGHUP and SIGINT stop a command and every process it started (real subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.ui import free_port, port_in_use

SSPCTL = str(Path(sys.executable).with_name("sspctl"))


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([SSPCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    return proc, lines


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in "".join(lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert text in "".join(lines), "".join(lines)


def _assert_all_gone(pids: set[int], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(p for p in pids if _alive(p))
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_ui_stops_mlflow_server_and_its_workers_on_each_signal(tmp_path: Path, signum: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    port = free_port()
    proc, lines = _start(["ui", "--output", str(tmp_path), "--port", str(port)], env)
    try:
        _wait_for(lines, f"at http://127.0.0.1:{port}", proc)
        started = _descendants(proc.pid)
        assert len(started) >= 2, "mlflow server and its uvicorn worker"
        os.kill(proc.pid, signum)  # to sspctl alone, as a service manager or a closed terminal would
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(lines)
    _assert_all_gone(started)
    assert not port_in_use(port)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ingest_stopped_by_a_signal_says_what_is_committed_and_leaves_no_ray(tmp_path: Path, signum: int) -> None:
    from datastore.synth import write_dataset

    # Enough subjects that the parallel writers are still at work 2 s after the start on an idle machine.
    write_dataset(tmp_path / "raw", "mnms", n_subjects=16, seed=0, size=64, frames=(5, 5), slices=(6, 6), trivial=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc, lines = _start(["ingest", "--mnms", str(tmp_path / "raw"), "--store", str(tmp_path / "s.zarr"),
                          "--workers", "1", "--no-progress"], env)
    try:
        _wait_for(lines, "ingesting 16 subjects", proc)
        time.sleep(2)  # inside Ray start-up or the ingest itself
        started = _descendants(proc.pid)
        os.kill(proc.pid, signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines)
    if proc.returncode == 0 or ", hash " in output:  # the summary line: done before the signal came
        pytest.skip("the ingest finished before the signal arrived")
    assert proc.returncode == 128 + signum, output
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    assert f"error: interrupted ({name}); " in output and "subjects committed to" in output
    assert "rerun the same command to resume" in output
    _assert_all_gone(started)
    assert not (tmp_path / "s.zarr" / ".sspctl-writer.lock").exists()
