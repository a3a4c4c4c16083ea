"""SIGTERM and SIGHUP stop a command the way Ctrl-C (SIGINT) does.

Python turns SIGINT into ``KeyboardInterrupt``, so every ``finally`` runs: Ray is shut down (its
raylet, GCS and workers stop), MLflow runs are marked KILLED, locks are released and child process
groups (``sspctl ui``'s ``mlflow server`` and its uvicorn worker) are killed. SIGTERM and SIGHUP
would end the process without any of that. :func:`install` makes them raise :class:`Terminated`,
a ``KeyboardInterrupt``, in the main thread; :func:`exit_code` gives ``128 + signal number``.

Only the first SIGTERM/SIGHUP raises: later ones are ignored so that the clean-up is not cut short.
"""

from __future__ import annotations

import signal
from types import FrameType

#: The signals handled like Ctrl-C (SIGINT is Python's own ``KeyboardInterrupt``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The command received SIGTERM or SIGHUP (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_once(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def install() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Terminated` (main thread only; a no-op elsewhere)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_once)


def exit_code(exc: BaseException) -> int:
    """``128 + signal``: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def signal_name(exc: BaseException) -> str:
    """``SIGTERM``/``SIGHUP`` for :class:`Terminated`, else ``Ctrl-C``."""
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "Ctrl-C"
