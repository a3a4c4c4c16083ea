"""``sspctl sync``: log the tracking records a run kept while MLflow was unreachable."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.commands._common import fail, path_arg


def sync(
    output: Path | None = typer.Option(None, "--output", help="Workspace root to search for pending tracking records. Default: $SSPCTL_HOME or ./runs."),
    wait: float = typer.Option(0.0, "--wait", min=0.0, help="Keep retrying an unreachable server for this many seconds."),
) -> None:
    """Replay every run's pending tracking records (metrics, artifacts, final status) into MLflow.

    A run whose tracking server was down when it ended keeps what it could not log in <run folder>/tracking-pending.json; this command (or rerunning the run's command) logs it and closes the MLflow run.

    Exit 1 when some records could not be logged yet (docs/failures.md).
    """
    from orchestrator.tracking import find_spools, replay_spool
    from orchestrator.workspace import Workspace

    root = Workspace.resolve(path_arg(output, "--output", kind="dir"), create=False).root
    if not root.is_dir():
        fail(f"--output {root}: not found", code=2)
    spools = find_spools(root)
    if not spools:
        typer.echo(f"{root}: nothing to sync")
        return
    left = 0
    for spool in spools:
        result = replay_spool(spool, wait_s=wait)
        if result.ok:
            typer.echo(f"synced {spool.parent}")
        else:
            left += 1
            typer.secho(f"not synced: {spool} ({result.pending} record(s); MLflow unreachable)", err=True,
                        fg=typer.colors.YELLOW)
    if left:
        fail(f"{left} of {len(spools)} run(s) still have pending tracking records; rerun `sspctl sync` later")


def register(app: typer.Typer) -> None:
    """Add ``sync`` to the root app."""
    app.command("sync")(sync)
