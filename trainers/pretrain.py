"""The per-worker SSP pretraining loop run by Ray Train (``pretrain_worker``): the recipe only.

One call of ``pretrain_worker(job)`` is one rank of a data-parallel run (``job``: a
``trainers.jobs.PretrainJob``); the worker runtime (``trainers.runtime``) gives it its rank, device,
reductions, resume and report, and ``trainers.pretrain_outputs`` the files rank 0 writes.

* **Data.** Rank ``r`` of ``N`` reads its own shard of all frames of the selected subjects through
  ``datastore.loader.SliceLoader`` with a per-rank batch of ``global_batch / N``: the global batch is
  the configured (paper) value whatever ``N`` is (``N`` must divide it). With
  ``RuntimeOptions.global_batches`` the global batches themselves (which slices, which augmentation
  draws) are the same at any ``N``: every rank reads the whole selection and keeps its rows of each
  global batch (``Shard.global_batches``, ``trainers.augment.RankRows``), so a run that loses or gains
  workers trains on exactly the batches a one-worker run would.
* **Model.** The method's ``modules`` go to the device; with ``N > 1`` BatchNorm layers normalise with
  the global batch's statistics (``RuntimeOptions.sync_batchnorm``, on by default: the paper trained
  one GPU whose BN saw the whole batch): torch's ``SyncBatchNorm`` on CUDA, and with global batches
  ``CrossRankBatchNorm`` (``trainers.cross_rank_batchnorm``) on CPU, where torch's refuses to run
  (``trainers.runtime.sync_batchnorm_applies``); networks the method keeps outside
  ``modules`` (DINO's EMA teacher) get the same conversion (``SSPMethod.convert_sync_batchnorm``) and
  move with ``SSPMethod.to``, and the module is wrapped in DDP (gloo on CPU, NCCL on GPU;
  ``TorchTrainer`` set the process group up). Contrastive gathers and DINO's centre all-reduce live in
  the methods.
* **Precision.** CPU: fp32 always. GPU: the config's ``precision`` -- ``"fp16"`` is the published recipe
  (fp16 autocast + ``GradScaler``), ``"bf16"`` bf16 autocast (no scaler), ``"fp32"`` none.
  ``channels_last`` and ``torch.compile`` are optional (``PretrainConfig``).
* **Randomness.** Augmentation draws from a ``torch.Generator`` seeded from ``(seed, rank, epoch, step)``,
  so every rank augments independently and a resumed epoch replays exactly (with ``global_batches``:
  one generator seeded the same on every rank, each rank keeping its rows of the global batch's draws).
* **Checkpoints.** After every epoch all ranks report (a barrier); rank 0 attaches a safe checkpoint
  (``trainers.checkpoint``) of model, optimizer, scheduler, scaler, method extra state, epoch, RNG
  states and config. On start the run resumes from the last reported checkpoint.
* **Validation and best checkpoint** (``trainers.pretrain_validation``). With validation subjects
  and a ``valid_batch_size``, every epoch ends with the SSP loss on those subjects (no gradient, the
  same augmented views every epoch, mean over all ranks), logged as ``valid_loss``; the epoch with the
  lowest one is the best (DINO: lowest epoch training loss, as published). Its weights travel in the
  checkpoint (``TrainState.best``), so a resumed run still selects over every epoch.
* **Determinism.** ``deterministic: true`` switches to deterministic kernels and turns the cuDNN
  benchmark off (``trainers.determinism``).
* **Tracking.** Rank 0 alone logs params, per-epoch loss, valid_loss, lr, slices/s and epoch time
  through the job's ``Tracker``, writes a small progress file the driver polls, logs the method's
  epoch figures (MIM: reconstructions) and at the end exports one ``<part>.pt`` per part the method
  exports (``SSPMethod.parts``), the best epoch's ``<part>_best.pt`` and ``manifest.json``
  (``trainers.weights``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trainers.checkpoint import TrainState, capture_rng, restore
from trainers.jobs import PretrainJob
from trainers.loading import for_worker, loader_record, loader_tags, shard
from trainers.methods.config import PretrainConfig
from trainers.optimizers import build_optimizer
from trainers.pretrain_outputs import (
    ProgressWriter, append_event, export_weights, log_epoch_figures, maybe_inject_fault, parse_fault,
)
from trainers import preemption
from trainers.preemption import exit_now
from trainers.pretrain_position import Position, StepCheckpoints, WorkerStopped
from trainers.pretrain_validation import BestSoFar, best_file_name, open_validation, validation_loss
from trainers.runtime import (
    WorkerContext, autocast, device_batches, per_rank_batch, resolve_precision, wait_for_committed_checkpoint, wrap_model,
)
from trainers.schedules import apply_schedule, lr_at, total_steps


def build_method(config: PretrainConfig) -> Any:
    """The registered ``SSPMethod`` for ``config.method.name`` (networks built on the CPU)."""
    from trainers.methods import METHODS

    return METHODS[config.method.name](config, config.image_size)


def pretrain_worker(job: PretrainJob | Mapping[str, Any]) -> dict[str, Any]:
    """One rank of a pretraining run.

    Returns (rank 0's value becomes ``Result.return_value``) ``{"final_loss", "epochs", "run_dir",
    "files", "resumed_from", "best", "validation_skipped"}``: ``best`` is ``{"epoch", "loss", "metric",
    "files"}`` or ``None``; ``validation_skipped`` the one-line reason there was no validation, or ``None``.
    """
    from datastore.loader import SliceLoader

    job = PretrainJob.model_validate(job)
    config, options, output = job.config, job.runtime, job.output
    output.mkdir(parents=True, exist_ok=True)
    fault = parse_fault(job.fault_inject)
    ctx = WorkerContext.start(deterministic=config.deterministic, cudnn_benchmark=True,
                              checkpoint_dir=job.runtime.checkpoint_dir)
    tracker, device, chief = job.tracker_for(ctx.rank), ctx.device, ctx.is_chief

    batch = per_rank_batch(config.batch_size, ctx.world_size)
    read, budget_from = for_worker(job.read, ctx.in_ray)
    loader = SliceLoader(job.store, job.subjects, labelled_only=False, batch_size=batch,
                         shard=shard(ctx, config.seed, global_batches=options.global_batches), read=read)
    steps_per_epoch = min(len(loader), config.steps_per_epoch or len(loader))
    valid_loader, skipped = open_validation(job, ctx.rank, ctx.world_size, read)

    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    method = build_method(config)
    model, modules = wrap_model(method.modules, device, ctx.world_size, options,
                                channels_last=config.channels_last, compile=config.compile, method=method)
    method.to(device, channels_last=config.channels_last)
    optimizer = build_optimizer(config, modules)
    amp_dtype, use_scaler = resolve_precision(config.precision, device, options.cpu_fp32)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    start_epoch, global_step, last_loss = 0, 0, float("nan")
    best = BestSoFar(config.best_metric)
    state = ctx.resume()
    position = Position.fresh()
    if state is not None:
        restore(state, modules, optimizer, scaler=scaler)
        if state.method_extra:
            method.load_extra_state({k: v.to(device) for k, v in state.method_extra.items()})
        start_epoch, global_step = state.epoch + 1, state.global_step
        last_loss = float(state.metrics.get("loss", float("nan")))
        best = BestSoFar.from_state(config.best_metric, state.best)
        if not chief:
            best.weights = None  # only rank 0 exports
        position = Position.from_state(state.position, start_epoch)
        start_epoch = position.epoch

    resolved = config.model_dump(mode="json")
    if chief:
        _log_start(job, ctx, tracker, resumed=state is not None, start_epoch=start_epoch, batch=batch,
                   steps_per_epoch=steps_per_epoch, skipped=skipped, position=position, global_step=global_step,
                   loading=loader_record(loader, budget_from))
    progress = ProgressWriter(output, config.epochs, steps_per_epoch, options.progress_interval_s, config.batch_size)

    def train_state(epoch: int, step: int, metrics: dict[str, float], at: dict[str, Any] | None) -> TrainState | None:
        """Rank 0's checkpoint after optimiser step ``step`` (``at``: the position inside an epoch, or None at its end)."""
        if not chief:
            return None
        return TrainState(
            epoch=epoch if at is None else epoch - 1, global_step=step, model=modules.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler={"kind": config.schedule.kind, "global_step": step, "steps_per_epoch": steps_per_epoch},
            scaler=None if scaler is None else scaler.state_dict(), method_extra=method.extra_state(),
            rng=capture_rng(), config=resolved, metrics={k: float(v) for k, v in metrics.items()},
            best=best.to_state(), position=at,
        )

    def step_checkpoint(epoch: int, batch_done: int, step: int, loss_sum: torch.Tensor) -> None:
        """Inside an epoch: every rank reports; rank 0 attaches a checkpoint at this position."""
        mean_sum = ctx.mean(loss_sum, 1)  # the mean over ranks of their step-loss sums so far
        at = {"epoch": epoch, "batch": batch_done, "world_size": ctx.world_size, "loss_sum": mean_sum}
        metrics = {"epoch": epoch, "global_step": step, "step_in_epoch": batch_done, "workers": ctx.world_size,
                   "loss": mean_sum / max(batch_done, 1)}
        if chief:
            tracker.log_metrics({"workers": ctx.world_size}, step=step)
            append_event(output, event="step_checkpoint", epoch=epoch, batch=batch_done, global_step=step,
                         world_size=ctx.world_size)
        ctx.report(metrics, train_state(epoch, step, metrics, at), name=f"step_{step:09d}")

    def stop(step: int) -> None:
        """After the stop checkpoint: the signalled worker exits, the others end with an error naming it."""
        wait_for_committed_checkpoint()
        if preemption.requested():
            exit_now()
        raise WorkerStopped(f"rank {ctx.rank}: another worker got SIGTERM; checkpoint at step {step} written, "
                            f"Ray Train restarts the group from it")

    installed = ctx.in_ray and options.preempt_grace_s is not None and preemption.install(options.preempt_grace_s)
    preemptible = ctx.in_ray and options.preempt_grace_s is not None and not ctx.any(not installed)  # same on every rank
    checkpoints = StepCheckpoints(
        options.checkpoint_every_steps, steps_per_epoch, step_checkpoint,
        stop_requested=preemption.requested if preemptible else None, any_rank=ctx.any, on_stop=stop,
    )

    def after_step(epoch: int, batch_done: int, step: int, loss_sum: torch.Tensor) -> None:
        checkpoints.after_step(epoch, batch_done, step, loss_sum)
        maybe_inject_fault(fault, None, ctx.rank, output, step=step)

    for epoch in range(start_epoch, config.epochs):
        maybe_inject_fault(fault, epoch, ctx.rank, output)
        loader.set_epoch(epoch)
        started = time.perf_counter()
        skip = position.batch if epoch == position.epoch else 0
        loss_sum, lr, global_step = train_epoch(
            ctx, config, method, model, modules, optimizer, scaler, amp_dtype, loader, epoch, global_step,
            steps_per_epoch, progress, skip=skip, loss_sum=position.loss_sum if skip else 0.0,
            after_step=after_step, global_batches=options.global_batches,
        )
        epoch_time = time.perf_counter() - started
        done_here = steps_per_epoch - skip
        last_loss = ctx.mean(loss_sum, steps_per_epoch)
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"epoch {epoch}: training loss is {last_loss}; lower the learning rate or use fp32")
        metrics = {"loss": last_loss, "lr": lr, "slices_per_s": done_here * config.batch_size / epoch_time,
                   "epoch_time_s": epoch_time, "epoch": epoch, "workers": ctx.world_size}
        if valid_loader is not None:
            metrics["valid_loss"] = validation_loss(
                method, modules, valid_loader, device, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
                steps=config.valid_steps, amp_dtype=amp_dtype, channels_last=config.channels_last,
            )
        if valid_loader is not None or config.best_metric == "train_loss":
            best.offer(epoch, metrics["valid_loss" if config.best_metric == "valid_loss" else "loss"],
                       method.export if chief else None)
        is_last = epoch + 1 == config.epochs
        checkpoint = None
        if (epoch + 1) % config.checkpoint_every == 0 or is_last:
            checkpoint = train_state(epoch, global_step, metrics, None)
        if chief:
            tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "workers")}, step=epoch)
            tracker.log_metrics({"workers": ctx.world_size}, step=global_step)
            progress.update(epoch=epoch + 1, step=0, loss=last_loss, slices_per_s=metrics["slices_per_s"], force=True)
            append_event(output, event="epoch", epoch=epoch, loss=last_loss, slices_per_s=metrics["slices_per_s"],
                         epoch_time_s=epoch_time, started=time.time() - epoch_time, global_step=global_step,
                         world_size=ctx.world_size, valid_loss=metrics.get("valid_loss"),
                         best_epoch=best.epoch if best.found else None)
            if (epoch + 1) % options.recon_every == 0 or is_last:
                log_epoch_figures(method, modules, loader, device, epoch, output, tracker, config.seed)
        ctx.report(metrics, checkpoint)

    return _finish(job, chief, method, tracker, progress, best, last_loss, skipped,
                   resumed_from=None if state is None else state.epoch, resumed_at_step=None if state is None else state.global_step)


def _finish(
    job: PretrainJob, chief: bool, method: Any, tracker: Any, progress: ProgressWriter, best: BestSoFar,
    last_loss: float, skipped: str | None, *, resumed_from: int | None, resumed_at_step: int | None,
) -> dict[str, Any]:
    """Rank 0 exports the weights and the manifest and marks the run done; every rank returns the summary."""
    config, output = job.config, job.output
    files: dict[str, str] = {}
    if chief:
        files = export_weights(
            method, output, run_name=job.run_name, config=config.model_dump(mode="json"),
            dataset_hash=job.dataset_hash or "", epochs=config.epochs, final_loss=last_loss,
            image_size=config.image_size, model_width=config.model_width, mlflow_run_id=job.mlflow_run_id,
            tracker=tracker, best=best if best.found else None,
        )
        progress.update(epoch=config.epochs, step=0, loss=last_loss, slices_per_s=0.0, force=True, state="done")
        append_event(output, event="done", epoch=config.epochs - 1, loss=last_loss)
    best_summary = None
    if best.found:
        best_summary = {"epoch": best.epoch, "loss": best.loss, "metric": best.metric,
                        "files": {part: best_file_name(part) for part in files}}
    return {"final_loss": last_loss, "epochs": config.epochs, "run_dir": str(output), "files": files,
            "resumed_from": resumed_from, "resumed_at_step": resumed_at_step, "best": best_summary,
            "validation_skipped": skipped}


def _log_start(
    job: PretrainJob, ctx: WorkerContext, tracker: Any, *, resumed: bool, start_epoch: int, batch: int,
    steps_per_epoch: int, skipped: str | None, position: Position, global_step: int, loading: dict[str, Any],
) -> None:
    """Rank 0: the loader's line, the start (or resume) event, the worker count now, the params on a fresh
    run, and the run's tags.

    ``loading`` is ``trainers.loading.loader_record`` of the training loader (cache or stream, and why).
    """
    config = job.config
    print(loading["line"], flush=True)
    append_event(job.output, event="resume" if resumed else "start", epoch=start_epoch, global_step=global_step,
                 batch=position.batch if position.epoch == start_epoch else 0, saved_world_size=position.world_size,
                 world_size=ctx.world_size, device=str(ctx.device), torch_threads=torch.get_num_threads(),
                 validation_skipped=skipped, pid=os.getpid(), loader=loading)
    tracker.log_metrics({"workers": ctx.world_size}, step=global_step)
    if not resumed:
        tracker.log_params({**config.model_dump(mode="json"), "runtime": job.runtime.model_dump(mode="json"),
                            "read": job.read.model_dump(mode="json"), "world_size": ctx.world_size,
                            "per_worker_batch": batch, "steps_per_epoch": steps_per_epoch})
    tracker.set_tags({"sspctl.stage": "pretrain", "sspctl.method": config.method.name,
                      "sspctl.device": ctx.device.type, "sspctl.world_size": str(ctx.world_size), **loader_tags(loading)})


def train_epoch(
    ctx: WorkerContext, config: PretrainConfig, method: Any, model: torch.nn.Module, modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scaler: Any | None, amp_dtype: torch.dtype | None, loader: Any, epoch: int,
    global_step: int, steps_per_epoch: int, progress: ProgressWriter, *, skip: int = 0, loss_sum: float = 0.0,
    after_step: Callable[[int, int, int, torch.Tensor], None] | None = None, global_batches: bool = False,
) -> tuple[torch.Tensor, float, int]:
    """One epoch of SSP steps (LR and weight decay set per step); returns ``(loss sum, last lr, global step)``.

    ``skip`` steps of the epoch are already done (a run resumed inside it): their batches are drawn and
    dropped and ``loss_sum`` carries their summed loss. ``after_step(epoch, steps done in the epoch,
    global step, loss sum)`` runs after every optimiser step (step checkpoints, preemption).
    ``loss sum`` is this rank's float64 sum of step losses, on the device. ``global_batches``: augment
    with this rank's rows of the global batch's draws (``WorkerContext.draws``).
    """
    device = ctx.device
    modules.train()
    total_loss = torch.full((), loss_sum, device=device, dtype=torch.float64)
    started = time.perf_counter()
    total = total_steps(config, steps_per_epoch)
    lr = lr_at(config, max(global_step - 1, 0), steps_per_epoch)  # the last step's, if every step was done before a resume
    batches = device_batches(loader, device, config.channels_last, steps_per_epoch, skip=skip)
    for step, batch in enumerate(batches, start=skip):
        lr = apply_schedule(config, optimizer, global_step, steps_per_epoch)
        generator = ctx.draws(config.seed, epoch, step, global_batches=global_batches)  # per step: a resume replays it
        with autocast(device, amp_dtype):
            loss = method.training_step(batch, model, epoch, step, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            method.before_optimizer_step(epoch)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            method.before_optimizer_step(epoch)
            optimizer.step()
        global_step += 1
        method.after_optimizer_step(epoch, global_step, total)
        total_loss += loss.detach().double()
        if ctx.is_chief:
            rate = (step + 1 - skip) * config.batch_size / max(time.perf_counter() - started, 1e-9)
            progress.update(epoch=epoch, step=step + 1, loss=None, slices_per_s=rate)
        if after_step is not None:
            after_step(epoch, step + 1, global_step, total_loss)
    return total_loss, lr, global_step


__all__ = ["build_method", "pretrain_worker", "train_epoch"]
