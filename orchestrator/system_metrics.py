"""Opt-in MLflow system metrics (``--system-metrics``) logged from rank 0 of a Ray Train run.

MLflow's ``SystemMetricsMonitor`` runs as a thread in rank 0's process: it samples the node's CPU,
memory, disk and network (and NVIDIA GPUs when ``nvidia-ml-py`` is installed) every ``interval_s``
seconds and logs their means as ``system/*`` metrics on the run, their step continuing after a
resume. Only rank 0 logs: the other ranks of a one-node run would log the same machine again.
Sampling needs ``psutil`` (a dependency of sspctl). The monitor never fails training: if it cannot
start, a warning says why and the run goes on without system metrics.

The train function is wrapped (``monitored``) rather than changed, so ``trainers/`` stays unaware
of MLflow.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("sspctl.system_metrics")

#: MLflow's own variable for the sampling interval; read in the driver so the workers get its value.
INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


class SystemMetrics(BaseModel):
    """Where rank 0 logs system metrics (sent to the Ray workers with the train function)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str
    run_id: str = Field(min_length=1)
    interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, description="seconds between samples")


def sampling_interval() -> float:
    """Seconds between samples: ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` if set, else 10.

    Call it in the driver: Ray workers do not necessarily see the driver's environment.
    """
    return float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL_S)


def settings_for(interval_s: float | None, tracking_uri: str, run_id: str | None) -> SystemMetrics | None:
    """The settings of a run, or ``None`` when not asked for (``interval_s`` None) or the run is untracked."""
    if interval_s is None or not run_id:
        return None
    return SystemMetrics(tracking_uri=tracking_uri, run_id=run_id, interval_s=interval_s)


def monitored(worker_fn: Callable[[], Any], settings: SystemMetrics | None) -> Callable[[], Any]:
    """``worker_fn`` (a function of no argument: the job is bound to it) itself without settings, else a
    picklable wrapper that monitors rank 0 (or the one process outside Ray Train) while it runs."""
    if settings is None:
        return worker_fn
    return functools.partial(_run_monitored, worker_fn, settings)


def _run_monitored(worker_fn: Callable[[], Any], settings: SystemMetrics) -> Any:
    from trainers.runtime import ray_identity  # in the worker: torch is loaded there anyway

    rank, _, _ = ray_identity()  # rank 0 of a Ray Train run, or the one process of a cell in its Tune trial
    if rank != 0:
        return worker_fn()
    monitor = _start(settings)
    try:
        return worker_fn()
    finally:
        if monitor is not None:
            monitor.finish()  # joins the sampling thread and flushes what it batched


def _start(settings: SystemMetrics) -> Any:
    """A started ``SystemMetricsMonitor``, or ``None`` after a warning."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(settings.run_id, sampling_interval=settings.interval_s, resume_logging=True,
                                       tracking_uri=settings.tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - e.g. psutil missing or MLflow down: train anyway
        log.warning("system metrics not logged for run %s (%s)", settings.run_id,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None
