"""SIGTERM to a training worker: checkpoint at the next optimiser step, then exit (preemption).

Kubernetes preempts a pod by sending SIGTERM and, ``terminationGracePeriodSeconds`` later, SIGKILL.
A Ray Train worker runs the train function on a thread of its actor process, and Python runs signal
handlers on the main thread only, where Ray's worker installed its own SIGTERM handler (exit at
once). ``install(grace_s)`` replaces it from the main thread (through the worker actor's ``execute``
method, which Ray runs there) with one that

* marks a stop request, which the train loop reads after every optimiser step (``requested``); the
  loop all-reduces it, so every rank checkpoints at the same step (``ray.train.report`` is a barrier),
  then the signalled worker exits with 143 and Ray Train restarts the group from that checkpoint
  (elastic: with the workers left);
* exits with 143 anyway ``grace_s`` seconds later, when no step boundary came in time (data loading,
  validation, a hung collective): the run then resumes from the checkpoint before.

``signal_local_workers`` is the pod side: a ``preStop`` hook sends SIGTERM to the Ray Train workers of
its own pod and waits for them (``python -m trainers.preemption --grace S``, docs/deploy.md), because
the kubelet signals only the container's first process (``ray start``), whose raylet would kill the
workers without a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("sspctl.preemption")

#: Exit status of a worker that stopped on SIGTERM (128 + 15).
EXIT_CODE = 143
#: The process title Ray gives a Train worker actor.
WORKER_TITLE = "ray::RayTrainWorker"

_requested = threading.Event()
_deadline: list[float] = []


def _on_sigterm(signum: int, frame: object) -> None:
    if _requested.is_set():
        return
    _requested.set()
    grace = _deadline[0] if _deadline else 0.0
    log.warning("SIGTERM: checkpointing at the next optimiser step (exit in at most %.0f s)", grace)
    timer = threading.Timer(grace, os._exit, args=(EXIT_CODE,))
    timer.daemon = True
    timer.start()


def _install_here(grace_s: float) -> bool:
    """Install the handler in this (main) thread."""
    _deadline[:] = [float(grace_s)]
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def install(grace_s: float) -> bool:
    """Make SIGTERM a checkpoint-then-exit request in this worker process; ``False`` if it cannot.

    Outside a Ray actor it installs directly when called from the main thread.
    """
    if threading.current_thread() is threading.main_thread():
        return _install_here(grace_s)
    try:
        import ray

        actor = ray.get_runtime_context().current_actor
        return bool(ray.get(actor.execute.remote(_install_here, grace_s), timeout=60))
    except Exception as exc:  # noqa: BLE001 - training goes on; SIGTERM then ends the worker at once (Ray's default)
        log.warning("cannot install the SIGTERM checkpoint handler (%s)", exc)
        return False


def requested() -> bool:
    """Whether this process got SIGTERM."""
    return _requested.is_set()


def exit_now() -> None:
    """End the worker process after its stop checkpoint (no Python clean-up: the train thread is not main)."""
    logging.shutdown()
    os._exit(EXIT_CODE)


def _worker_pids(proc: Path = Path("/proc")) -> list[int]:
    """Pids of this machine's (this pod's) processes titled ``ray::RayTrainWorker``."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(WORKER_TITLE):
            pids.append(int(entry.name))
    return pids


def signal_local_workers(grace_s: float, poll_s: float = 0.5) -> int:
    """SIGTERM every Ray Train worker of this pod and wait (at most ``grace_s``) until they exit.

    Returns the number of workers signalled.
    """
    pids = _worker_pids()
    signalled = len(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        time.sleep(poll_s)
    return signalled


def main(argv: list[str] | None = None) -> None:
    """``python -m trainers.preemption --grace S``: the worker pod's ``preStop`` hook."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to wait for the workers' checkpoint")
    args = parser.parse_args(argv)
    signal_local_workers(args.grace)


if __name__ == "__main__":
    main()


__all__ = ["EXIT_CODE", "exit_now", "install", "requested", "signal_local_workers"]
