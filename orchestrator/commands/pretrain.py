"""``sspctl pretrain``: one self-supervised pretraining run on Ray Train (docs/pretraining.md)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from orchestrator.commands._common import CACHE_GB_HELP, fail, interrupted, name_arg, path_arg, read_options, root_cause
from trainers.methods.names import METHOD_NAMES


#: ``--method`` choices: the method vocabulary (``trainers/methods/names.py``).
Method = Enum("Method", {name: name for name in METHOD_NAMES}, type=str)  # type: ignore[misc]


def pretrain(
    method: Method = typer.Option(..., "--method", help=f"SSP method: {', '.join(METHOD_NAMES[:-1])} or {METHOD_NAMES[-1]} (paper defaults per method)."),
    store: str = typer.Option(..., "--store", help="Slice store (path or fsspec URL) written by 'sspctl ingest'."),
    workers: str = typer.Option(
        "1", "--workers",
        help="Data-parallel workers (DDP ranks): N, or MIN-MAX for elastic training (starts with MIN, grows to MAX, "
        "goes on with fewer after a lost worker or node; needs --max-failures >= 1). The GLOBAL batch stays the "
        "configured value: each worker gets batch/count, so every count must divide it.",
    ),
    gpus_per_worker: float | None = typer.Option(None, "--gpus-per-worker", min=0.0, help="GPUs per worker (fractions allowed). Default: 1 if the Ray cluster has a GPU per worker, else 0 (CPU, fp32)."),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", min=0.0, help="Logical CPUs Ray reserves per worker (data loading and augmentation threads)."),
    config: Path | None = typer.Option(None, "--config", help="YAML PretrainConfig overriding the paper defaults (keys: epochs, batch_size, optimizer, schedule, method.*, ...)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Override the number of epochs (paper: 100)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Override the GLOBAL batch size in images (paper: simclr 224, pcl 64, dino 64, mim 128)."),
    steps_per_epoch: int | None = typer.Option(None, "--steps-per-epoch", min=1, help="Cap optimizer steps per epoch (quick demos; default: one full pass over the data)."),
    output: Path | None = typer.Option(None, "--output", help="Workspace root holding pretrain/, ray/ and mlflow.db (default: $SSPCTL_HOME or ./runs)."),
    max_failures: int = typer.Option(1, "--max-failures", min=-1, help="Worker-group restarts from the last checkpoint before giving up (-1: unlimited)."),
    split: Path | None = typer.Option(None, "--split", help="Split YAML: pretrain on every store subject outside its test and valid parts (all frames, labelled or not) and compute the validation loss on its valid subjects each epoch (best checkpoint = lowest valid_loss; DINO: lowest training loss). Default: every subject in the store, no validation."),
    study: str | None = typer.Option(None, "--study", help="MLflow experiment of the study (default: sspctl-<store hash8>); letters, digits, '.', '_', '-', at most 64."),
    cache_gb: float | None = typer.Option(None, "--cache-gb", help=CACHE_GB_HELP),
    no_sync_bn: bool = typer.Option(False, "--no-sync-bn", help="Keep plain per-worker BatchNorm when workers > 1 (default: BatchNorm uses the global batch's statistics: SyncBatchNorm on GPUs; on CPUs its CPU counterpart with --global-batches, per-worker BN otherwise)."),
    global_batches: bool | None = typer.Option(
        None, "--global-batches/--rank-batches",
        help="--global-batches: every global batch holds the same slices, augmented the same way, at any worker "
        "count, so a run that loses or gains workers trains on exactly the batches one worker would (each worker "
        "reads the whole selection: workers x the decode and loader memory). --rank-batches: each worker reads "
        "its own share (cheapest at scale; the batches depend on the count). Default: global for MIN-MAX, per-rank for N.",
    ),
    checkpoint_every_steps: int | None = typer.Option(
        None, "--checkpoint-every-steps", min=1,
        help="Also checkpoint every N optimiser (global) steps inside epochs, so a lost node or a preemption loses "
        "at most N steps; a resumed run continues at that step of the epoch (docs/pretraining.md).",
    ),
    preemption_grace: float = typer.Option(
        25.0, "--preemption-grace", min=0.0,
        help="On SIGTERM a worker checkpoints at its next optimiser step and exits after at most this many seconds "
        "(keep it below the pod's terminationGracePeriodSeconds); 0 turns the handler off.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not show the live progress bar."),
    system_metrics: bool = typer.Option(
        False, "--system-metrics",
        help="Log MLflow system metrics (system/*: CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py) from "
        "rank 0 every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10).",
    ),
) -> None:
    """Pretrain an encoder with one SSP method; rerunning the same command resumes or reports it done.

    Writes <output>/pretrain/<run>/encoder.pt (MIM also encoder_decoder.pt), the best epoch's encoder_best.pt (encoder_decoder_best.pt) and manifest.json, logs to MLflow (params, per-epoch loss, valid_loss, lr, slices/s, epoch time; MIM reconstructions) and checkpoints every epoch into <output>/ray/<run>/.

    deterministic: true in the --config YAML makes reruns on the same machine and thread count bit-identical (docs/pretraining.md).

    The run name is derived from config + data, so the same command resumes after a crash and skips a finished run.
    """
    from orchestrator.pretrain_launch import LaunchError, PretrainRequest, launch_pretrain
    from orchestrator.paths import removed_if_left_empty
    from orchestrator.run_lock import RunLockedError
    from orchestrator.worker_range import WorkerRangeError, parse_workers
    from orchestrator.workspace import Workspace

    read = read_options(cache_gb)
    try:
        worker_range = parse_workers(workers, "--workers")
    except WorkerRangeError as exc:
        fail(str(exc), code=2)
    store = path_arg(store, "--store", kind="dir")
    config_file = path_arg(config, "--config", kind="file")
    split_file = path_arg(split, "--split", kind="file")
    study = name_arg(study, "--study")
    workspace = Workspace.resolve(path_arg(output, "--output", must_exist=False), create=False)
    overrides = {"epochs": epochs, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch}
    request = PretrainRequest(
        method=method.value, store=store, workspace=workspace,
        config_file=Path(config_file) if config_file else None,
        overrides={k: v for k, v in overrides.items() if v is not None},
        split=Path(split_file) if split_file else None, workers=worker_range,
        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, max_failures=max_failures,
        runtime={"sync_batchnorm": not no_sync_bn, "checkpoint_every_steps": checkpoint_every_steps,
                 "preempt_grace_s": preemption_grace or None,
                 "global_batches": worker_range.elastic if global_batches is None else global_batches},
        read=read, study=study, system_metrics=system_metrics,
    )
    with removed_if_left_empty(workspace.root):
        try:
            launch_pretrain(request, echo=typer.echo, progress=not no_progress)
        except RunLockedError as exc:
            fail(str(exc), code=2)
        except LaunchError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            interrupted(exc, "rerun the same command to resume from the last checkpoint")
        except Exception as exc:  # noqa: BLE001 - a training failure: one line, non-zero exit
            fail(f"pretraining failed: {root_cause(exc)}")


def register(app: typer.Typer) -> None:
    """Add ``pretrain`` to the root app."""
    app.command("pretrain")(pretrain)
