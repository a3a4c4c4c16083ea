"""Start or join Ray: the cluster in ``RAY_ADDRESS`` if set, else a private local one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """Initialise Ray for the duration of a command (no-op if already initialised).

    Without ``RAY_ADDRESS`` this starts a local cluster with ``address="local"`` so that a
    ``ray start`` cluster elsewhere on the machine is never joined by accident.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    try:
        yield
    finally:
        ray.shutdown()
