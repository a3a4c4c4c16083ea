"""``sspctl``: the command-line entry point.

Each stage of the pipeline registers its commands from its own module in
``orchestrator/commands/``; this file only assembles them. Heavy imports (torch, MONAI, Ray,
MLflow) happen inside the commands so that ``sspctl --help`` stays fast.
"""

from __future__ import annotations

import logging
import os

import typer

from orchestrator.commands import agreement, data, deploy, evaluate, finetune, pretrain, splits, study, sync, synth

app = typer.Typer(
    name="sspctl",
    help=(
        "Self-supervised pretraining studies for cardiac MR cine segmentation.\n\n"
        "Pipeline: synth/ingest -> splits -> pretrain -> finetune -> report "
        "(or all at once: study; on a laptop: demo)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (synth, data, splits, pretrain, finetune, evaluate, study, agreement, sync, deploy):
    module.register(app)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging and the Ray workers' logs.")) -> None:
    """Self-supervised pretraining studies for cardiac MR cine segmentation."""
    from orchestrator import signals

    signals.install()  # SIGTERM/SIGHUP clean up like Ctrl-C (docs/failures.md)
    if verbose:
        os.environ["SSPCTL_RAY_LOGS"] = "1"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # "Creating initial MLflow database tables..." on every new sqlite backend
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


if __name__ == "__main__":
    app()
