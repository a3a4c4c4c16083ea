"""Start or join Ray: the cluster in ``RAY_ADDRESS`` if set, else a private local one."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

from orchestrator import signals

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Tune's newer console output ignores ``verbose=0`` and prints a banner per grid; sspctl shows its own bar.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """Initialise Ray for the duration of a command (no-op if already initialised).

    Without ``RAY_ADDRESS`` this starts a local cluster with ``address="local"`` so that a
    ``ray start`` cluster elsewhere on the machine is never joined by accident. The dashboard
    process runs because Train V2 polls the State API it serves (without it, Ray warns once a
    second). Worker logs reach the terminal only with ``SSPCTL_RAY_LOGS=1`` (``sspctl -v``):
    commands print their own progress, and errors come back as exceptions either way.

    SIGTERM, SIGHUP and Ctrl-C, also during start-up, arrive as ``KeyboardInterrupt``
    (``orchestrator.signals``) and shut Ray down on the way out.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        _init(num_cpus, num_gpus)
    except SystemExit as exc:  # Ray's own SIGTERM handler (sys.exit), active while ray.init runs
        ray.shutdown()
        if exc.code == signal.SIGTERM:
            raise signals.Terminated(signal.SIGTERM) from None
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGHUP during start-up: stop what was started
        ray.shutdown()
        raise
    signals.install()  # ray.init replaced the SIGTERM handler; keep sspctl's clean-up and message
    try:
        yield
    finally:
        ray.shutdown()


def _init(num_cpus: int | None, num_gpus: int | None) -> None:
    """``ray.init``: join ``RAY_ADDRESS`` or start a private local cluster (see ``ray_session``)."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    log_to_driver = os.environ.get("SSPCTL_RAY_LOGS", "0") == "1"
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=None,
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
    )
