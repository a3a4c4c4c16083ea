"""MLflow-backed ``Tracker`` that never kills a run and loses nothing in a tracking outage.

Rank 0 of a train loop logs through this object. It is picklable (only the URI, run id and spool
path travel to Ray workers) and creates its ``MlflowClient`` lazily in the process that uses it.

Outage handling: a call that fails (server down, disk full under a local artifact store) is kept
in order in a buffer, and training goes on. The buffer is retried with exponential backoff
(``retry_after_s`` doubling up to ``max_retry_s``) on later calls; while it is not empty, new
records queue behind it so that MLflow sees them in order. With a ``spool`` file (in the run
folder) the buffer is also written there on every change, so it survives the worker process: the
driver's :func:`finish_run` flushes it and sets the run's final status, or leaves it (status
included) for a rerun or ``sspctl sync`` (:func:`replay_spool`). One warning when tracking goes
down, one when it comes back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sspctl.tracking")

#: MLflow's own retry loop would stall training for minutes when a server is down.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_LEN = 6000
#: File name of a run's pending tracking records (in its run folder).
SPOOL_NAME = "tracking-pending.json"


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` with values as strings MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:_MAX_PARAM_LEN]
    return flat


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class MlflowTracker:
    """Log to one MLflow run; failures are buffered and retried (see module doc).

    Records are JSON dicts: ``{"kind": "batch", "metrics": [[key, value, ms, step]...], "params":
    [[key, value]...], "tags": [[key, value]...]}``, ``{"kind": "artifact", "path", "artifact_path"}``
    and ``{"kind": "status", "status"}``.
    """

    def __init__(
        self, tracking_uri: str, run_id: str, retry_after_s: float = 2.0, max_retry_s: float = 60.0,
        spool: str | Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retry_after_s = retry_after_s
        self.max_retry_s = max_retry_s
        self.spool = Path(spool) if spool is not None else None
        self._client: Any = None
        self._pending: list[dict[str, Any]] | None = None  # loaded from the spool on first use
        self._down_until = 0.0
        self._backoff = retry_after_s

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "retry_after_s": self.retry_after_s,
                "max_retry_s": self.max_retry_s, "spool": str(self.spool) if self.spool else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # -- the buffer ---------------------------------------------------------------------------

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Records not yet in MLflow, oldest first (those an earlier process spooled included)."""
        if self._pending is None:
            self._pending = _read_spool(self.spool)["records"] if self.spool and self.spool.is_file() else []
        return self._pending

    def _save_spool(self) -> None:
        if self.spool is None:
            return
        try:
            if not self.pending:
                self.spool.unlink(missing_ok=True)
                return
            tmp = self.spool.with_name(f".{self.spool.name}.tmp")
            tmp.write_text(json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id,
                                       "records": self.pending}))
            os.replace(tmp, self.spool)
        except OSError as exc:  # e.g. the disk is full: the records stay in memory
            log.warning("could not write %s (%s); %d tracking records kept in memory only",
                        self.spool, exc.strerror or exc, len(self.pending))

    def _send(self, record: dict[str, Any]) -> None:
        if self._client is None:
            for key, value in _FAST_FAIL_ENV.items():
                os.environ.setdefault(key, value)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        kind = record["kind"]
        if kind == "batch":
            from mlflow.entities import Metric, Param, RunTag

            self._client.log_batch(
                self.run_id,
                metrics=[Metric(k, float(v), int(ms), int(step)) for k, v, ms, step in record.get("metrics", [])],
                params=[Param(k, v) for k, v in record.get("params", [])],
                tags=[RunTag(k, v) for k, v in record.get("tags", [])],
            )
        elif kind == "artifact":
            path = Path(record["path"])
            if not path.exists():
                log.warning("pending artifact %s no longer exists; dropped", path)
                return
            fn = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
            fn(self.run_id, str(path), record.get("artifact_path"))
        elif kind == "status":
            self._client.set_terminated(self.run_id, status=record["status"])
        else:
            raise ValueError(f"unknown tracking record kind {kind!r}")

    def flush(self) -> bool:
        """Send the buffered records in order; True when none is left. Never raises."""
        sent = 0
        try:
            while self.pending:
                self._send(self.pending[0])
                self.pending.pop(0)
                sent += 1
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._mark_down(exc)
            if sent:
                self._save_spool()
            return False
        if sent:
            self._save_spool()
            log.warning("MLflow at %s reachable again: %d buffered tracking records logged", self.tracking_uri, sent)
        self._down_until, self._backoff = 0.0, self.retry_after_s
        return True

    def flush_until(self, deadline: float) -> bool:
        """Retry :meth:`flush` with its backoff until nothing is left or ``deadline`` (monotonic) would pass."""
        while not self.flush():
            pause = max(0.0, self._down_until - time.monotonic())
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_until == 0.0:
            log.warning("MLflow at %s failed (%s); training continues, records are buffered and retried",
                        self.tracking_uri, _first_line(exc))
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_retry_s)

    def _record(self, record: dict[str, Any]) -> None:
        if not self.pending or time.monotonic() >= self._down_until:
            if self.flush():
                try:
                    self._send(record)
                    return
                except Exception as exc:  # noqa: BLE001
                    self._mark_down(exc)
        self.pending.append(record)
        self._save_spool()

    # -- the Tracker protocol -----------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        items = [[k, v] for k, v in flatten_params(params).items()]
        for start in range(0, len(items), 100):
            self._record({"kind": "batch", "params": items[start : start + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self._record({"kind": "batch", "metrics": [[k, float(v), stamp, int(step)] for k, v in metrics.items()]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._record({"kind": "artifact", "path": str(Path(path).absolute()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record({"kind": "batch", "tags": [[k, str(v)] for k, v in tags.items()]})

    def set_status(self, status: str) -> None:
        """Queue the run's final status (``FINISHED``/``FAILED``/``KILLED``) behind the buffered records."""
        self._record({"kind": "status", "status": status})


def _read_spool(path: Path | None) -> dict[str, Any]:
    """A spool file's ``{"tracking_uri", "run_id", "records"}``; ``records`` empty if unreadable."""
    try:
        data = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        log.warning("%s is unreadable; its pending tracking records are lost", path)
        return {"records": []}
    return data if isinstance(data, dict) and isinstance(data.get("records"), list) else {"records": []}


@dataclass(frozen=True)
class FinishResult:
    """What :func:`finish_run` or :func:`replay_spool` achieved."""

    ok: bool
    pending: int
    spool: Path | None

    def line(self, run_id: str, uri: str) -> str:
        """One line for the user when records are left (empty when everything was logged)."""
        if self.ok:
            return ""
        return (f"MLflow at {uri} unreachable: {self.pending} tracking record(s) of run {run_id} (final status "
                f"included) kept in {self.spool}; `sspctl sync` or a rerun of the same command logs them")


def finish_run(
    tracking_uri: str, run_id: str | None, status: str, spool: Path | None, wait_s: float | None = None
) -> FinishResult:
    """Flush the run's spooled records and set its final status, retrying with backoff for ``wait_s``.

    ``wait_s`` defaults to ``$SSPCTL_TRACKING_WAIT_S`` or 30 s. If the server stays away, every
    record (the status included) is left in ``spool``. Never raises.
    """
    if run_id is None:
        return FinishResult(True, 0, spool)
    if wait_s is None:
        wait_s = float(os.environ.get("SSPCTL_TRACKING_WAIT_S", "30"))
    tracker = MlflowTracker(tracking_uri, run_id, retry_after_s=1.0, max_retry_s=10.0, spool=spool)
    tracker.set_status(status)
    tracker.flush_until(time.monotonic() + wait_s)
    return FinishResult(not tracker.pending, len(tracker.pending), spool)


def replay_spool(spool: Path, wait_s: float = 0.0) -> FinishResult:
    """Log a spool file's records into the run it names (``sspctl sync``); the file goes when empty."""
    data = _read_spool(spool)
    if not data.get("records"):
        return FinishResult(True, 0, spool)
    tracker = MlflowTracker(data["tracking_uri"], data["run_id"], retry_after_s=1.0, spool=spool)
    tracker.flush_until(time.monotonic() + wait_s)
    return FinishResult(not tracker.pending, len(tracker.pending), spool)


def find_spools(root: Path) -> list[Path]:
    """Every spool file under a workspace root."""
    return sorted(root.rglob(SPOOL_NAME))


def replay_left_over(run_dir: Path, echo: Callable[[str], None] = log.warning) -> bool:
    """Log the records an earlier attempt of a run left in ``run_dir`` (a tracking outage), if any.

    Returns True when nothing is left pending; says in one line what happened when there was something.
    """
    spool = run_dir / SPOOL_NAME
    if not spool.is_file():
        return True
    result = replay_spool(spool)
    echo(f"logged the tracking records an earlier attempt left in {spool}" if result.ok
         else f"MLflow still unreachable: {result.pending} tracking record(s) stay in {spool}")
    return result.ok
