"""MLflow-backed ``Tracker`` that never kills a run.

Rank 0 of a train loop logs through this object. It is picklable (only the URI and run id
travel to Ray workers), creates its ``MlflowClient`` lazily in the process that uses it, and turns
every tracking failure into a warning: while the server is unreachable it stops trying for
``retry_after_s`` seconds, so a long training run keeps its pace and resumes logging when the server
comes back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sspctl.tracking")

#: MLflow's own retry loop would stall training for minutes when a server is down.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_LEN = 6000


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


class MlflowTracker:
    """Log to one MLflow run; failures become warnings (see module doc)."""

    def __init__(self, tracking_uri: str, run_id: str, retry_after_s: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retry_after_s = retry_after_s
        self._client: Any = None
        self._down_until = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "retry_after_s": self.retry_after_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _call(self, what: str, fn_name: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now < self._down_until:
            return
        try:
            if self._client is None:
                for key, value in _FAST_FAIL_ENV.items():
                    os.environ.setdefault(key, value)
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(self.tracking_uri)
            getattr(self._client, fn_name)(self.run_id, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._down_until = now + self.retry_after_s
            log.warning(
                "MLflow %s failed at %s (%s); training continues, retrying in %.0fs",
                what, self.tracking_uri, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                self.retry_after_s,
            )

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), 100):
            self._call("log_params", "log_batch", params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self._call("log_metrics", "log_batch", metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        fn = "log_artifacts" if Path(path).is_dir() else "log_artifact"
        self._call("log_artifact", fn, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("set_tag", "set_tag", key, str(value))
