"""Submit ``sspctl`` commands to a running Ray cluster through the Ray Job Submission API.

The image already holds the code, so nothing is uploaded unless a working directory is asked for.
Every failure that a user can fix (unreachable address, unknown job, failed job) becomes a
``SubmitError`` with a one-line message; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: Seconds to wait for the dashboard to answer before calling the address unreachable.
CONNECT_TIMEOUT_S = 5.0
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
#: Seconds to retry while a just-started cluster has no job agent yet (Ray: "No available agent to
#: submit job, please try again later"): the agent comes up a few seconds after the dashboard.
AGENT_WAIT_S = 30.0


class SubmitError(RuntimeError):
    """A job-submission problem a user can act on; the message is one line."""


@dataclass(frozen=True)
class JobState:
    """What ``sspctl status`` shows about one job."""

    job_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str
    entrypoint: str
    start_time_s: float | None  # Unix seconds
    end_time_s: float | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, else the local default.

    The result is the dashboard's HTTP URL without a trailing slash (``http://`` is added when
    no scheme is given).
    """
    raw = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    ).strip()
    if raw in ("auto", "local"):
        raw = DEFAULT_ADDRESS
    if raw.startswith("ray://"):
        raise SubmitError(
            f"{raw} is a Ray Client address; job submission needs the dashboard URL, e.g. http://HEAD:8265"
        )
    if "://" not in raw:
        raw = f"http://{raw}"
    return raw.rstrip("/")


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (``timeout_s``) with a clear message if no Ray dashboard answers at ``address``."""
    import requests

    hint = "is the cluster running and its dashboard port forwarded (kubectl port-forward svc/<cluster>-head-svc 8265)?"
    try:
        response = requests.get(f"{address}/api/version", timeout=timeout_s)
    except requests.exceptions.Timeout:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} (no answer in {timeout_s:.0f}s); {hint}") from None
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__
        if "refused" in str(exc).lower():
            reason = "connection refused"
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({reason}); {hint}") from None
    if response.status_code != 200 or "ray_version" not in response.text:
        raise SubmitError(f"{address} is not a Ray dashboard (GET /api/version gave HTTP {response.status_code})")


class JobClient:
    """A checked connection to one cluster's job API."""

    def __init__(self, address: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.address = resolve_address(address)
        check_reachable(self.address, timeout_s)
        from ray.job_submission import JobSubmissionClient

        try:
            self._client = JobSubmissionClient(self.address)
        except (ConnectionError, RuntimeError) as exc:
            raise SubmitError(f"Ray job API at {self.address}: {_first_line(exc)}") from None

    def submit(
        self,
        command: Sequence[str],
        *,
        submission_id: str | None = None,
        working_dir: Path | None = None,
        env: dict[str, str] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
    ) -> str:
        """Start ``command`` (argv) on the cluster; return the submission id."""
        if not command:
            raise SubmitError("no command given: put it after '--', e.g. sspctl submit -- sspctl pretrain ...")
        runtime_env: dict[str, Any] = {}
        if working_dir is not None:
            if not Path(working_dir).is_dir():
                raise SubmitError(f"--working-dir {working_dir}: not a directory")
            runtime_env["working_dir"] = str(Path(working_dir).resolve())
        if env:
            runtime_env["env_vars"] = dict(env)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return self._client.submit_job(
                    entrypoint=shlex.join(command),
                    submission_id=submission_id,
                    runtime_env=runtime_env or None,
                    entrypoint_num_cpus=num_cpus,
                    entrypoint_num_gpus=num_gpus,
                )
            except (RuntimeError, ValueError, ConnectionError) as exc:
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)  # refused before the job exists, so the same id can be sent again
                    continue
                raise SubmitError(f"submitting to {self.address} failed: {_first_line(exc)}") from None

    def state(self, job_id: str) -> JobState:
        """The job's current status; ``SubmitError`` if the cluster does not know it."""
        try:
            info = self._client.get_job_info(job_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                raise SubmitError(f"no job {job_id!r} on {self.address}") from None
            raise SubmitError(f"job {job_id!r} on {self.address}: {_first_line(exc)}") from None
        return JobState(
            job_id=job_id,
            status=str(getattr(info.status, "value", info.status)),
            message=info.message or "",
            entrypoint=info.entrypoint,
            start_time_s=info.start_time / 1000 if info.start_time else None,
            end_time_s=info.end_time / 1000 if info.end_time else None,
        )

    def logs(self, job_id: str) -> str:
        """Everything the job printed so far."""
        self.state(job_id)  # clear error for an unknown id
        try:
            return self._client.get_job_logs(job_id)
        except RuntimeError as exc:
            raise SubmitError(f"logs of job {job_id!r} on {self.address}: {_first_line(exc)}") from None

    def follow(self, job_id: str, out: TextIO, poll_s: float = 1.0) -> JobState:
        """Stream the job's logs to ``out`` until it finishes; return its final state."""
        self.state(job_id)

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            asyncio.run(tail())
        except Exception as exc:  # noqa: BLE001 - the stream broke; the status poll below still tells the end
            out.write(f"[sspctl] log stream interrupted ({_first_line(exc)}); waiting for the job to end\n")
        state = self.state(job_id)
        while not state.finished:
            time.sleep(poll_s)
            state = self.state(job_id)
        return state


def _first_line(exc: BaseException) -> str:
    """The informative line of an error: the last line of a server-side traceback, else the first."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if any(c.isalnum() for c in line)]
    if not lines:
        return type(exc).__name__
    if any(line.startswith("Traceback") or "Traceback (most recent call last)" in line for line in lines):
        return f"{lines[0].split('Traceback')[0].strip()} {lines[-1]}".strip()[:300]
    return lines[0][:300]
