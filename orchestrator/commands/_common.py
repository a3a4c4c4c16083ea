"""Helpers shared by command modules: consistent errors and exit codes."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

import typer


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
