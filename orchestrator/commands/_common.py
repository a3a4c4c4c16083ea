"""Helpers shared by command modules: consistent errors, exit codes and checked paths and names."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from datastore.loader_options import ReadOptions

#: ``--help`` of ``--cache-gb`` (pretrain, finetune).
CACHE_GB_HELP = (
    "Loader memory budget per worker, in GB: a worker keeps its share of the slices in memory when it fits, else "
    "streams it in shuffled windows within the budget; the run says which (rank 0's 'loader:' line, events.jsonl, "
    "MLflow tags sspctl.loader.*). Default: half of the node's memory over the run's workers on that node."
)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr (one line) and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def root_cause(exc: BaseException) -> str:
    """One line for a training failure: the innermost ``SomethingError: message`` line Ray's report holds."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", line)
              and not line.startswith(("ray.train.", "Error:", "WorkerGroupError"))]
    text = causes[-1] if causes else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


def interrupted(exc: BaseException, next_step: str) -> NoReturn:
    """Exit after Ctrl-C, SIGTERM or SIGHUP: one line naming the signal and what a rerun does.

    Exit code ``128 + signal`` (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
    """
    from orchestrator.signals import exit_code, signal_name

    fail(f"interrupted ({signal_name(exc)}); {next_step}", code=exit_code(exc))


def path_arg(value: Path | str | None, flag: str, must_exist: bool = True, kind: str = "any") -> str | None:
    """``value`` as an absolute path (URLs unchanged; ``None`` stays ``None``); exit 2 when unusable.

    Called by every command for every path it takes, before Ray starts (``orchestrator.paths``).
    """
    from orchestrator.paths import PathCheckError, user_path

    if value is None:
        return None
    try:
        return user_path(value, flag, must_exist=must_exist, kind=kind)
    except PathCheckError as exc:
        fail(str(exc), code=2)


def read_options(cache_gb: float | None, flag: str = "--cache-gb") -> ReadOptions:
    """The loader's ``ReadOptions`` for a ``--cache-gb`` value (``None``: the workers' node default); exit 2 if not > 0."""
    from datastore.loader_options import ReadOptions

    if cache_gb is not None and not 0 < cache_gb < math.inf:
        fail(f"{flag}: the loader memory budget must be a positive number of GB, got {cache_gb:g}", code=2)
    return ReadOptions(cache_gb=cache_gb)


def name_arg(value: str | None, flag: str) -> str | None:
    """``value`` if it is a valid study/grid/run name (``orchestrator.paths.check_name``); exit 2 if not."""
    from orchestrator.paths import PathCheckError, check_name

    if value is None:
        return None
    try:
        return check_name(value, flag)
    except PathCheckError as exc:
        fail(str(exc), code=2)
