"""Where a study's files live: one run directory holding the MLflow database, Ray storage and outputs.

Defaults to ``./runs`` (override with ``--output`` or ``SSPCTL_HOME``). Every path handed to Ray
workers or MLflow is absolute, because workers run in their own temporary working directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "runs"


@dataclass(frozen=True)
class Workspace:
    """Absolute locations derived from one root directory."""

    root: Path

    @classmethod
    def resolve(cls, root: str | Path | None = None, create: bool = True) -> "Workspace":
        """``root``, else ``$SSPCTL_HOME``, else ``./runs``; made absolute and (with ``create``) created."""
        chosen = Path(root or os.environ.get("SSPCTL_HOME") or DEFAULT_HOME).expanduser().resolve()
        if create:
            chosen.mkdir(parents=True, exist_ok=True)
        return cls(chosen)

    def folder(self, *names: str) -> Path:
        """``<root>/<names...>`` for names checked as plain folder names: it cannot leave the workspace."""
        from orchestrator.paths import inside

        return inside(self.root, *names)

    @property
    def tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` if set, else an absolute sqlite file in the workspace."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        """Artifact location for experiments created on the local sqlite backend."""
        return (self.root / "mlartifacts").as_uri()

    @property
    def storage_path(self) -> str:
        """Ray Train/Tune ``storage_path`` (checkpoints, run state)."""
        path = self.root / "ray"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
