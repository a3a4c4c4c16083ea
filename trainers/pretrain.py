"""The per-worker SSP pretraining loop run by Ray Train (``pretrain_worker``) and its helpers.

One call of ``pretrain_worker`` is one rank of a data-parallel run:

* **Data.** Rank ``r`` of ``N`` reads its own shard of all frames of the selected subjects through
  ``datastore.loader.SliceLoader`` with a per-rank batch of ``global_batch / N``: the global batch is
  the configured (paper) value whatever ``N`` is (``N`` must divide it).
* **Model.** The method's ``modules`` go to the device; with ``N > 1`` BatchNorm layers become
  ``SyncBatchNorm`` on CUDA (``RuntimeOptions.sync_batchnorm``, on by default: the paper trained one
  GPU whose BN saw the whole batch, and synced BN keeps those statistics at any ``N``; torch has no
  CPU SyncBatchNorm, so on CPU the statistics stay per worker); networks the method keeps outside
  ``modules`` (DINO's EMA teacher) get the same conversion, and the module is
  wrapped in DDP (gloo on CPU, NCCL on GPU; ``TorchTrainer`` set the process group up). Contrastive
  gathers and DINO's centre all-reduce live in the methods.
* **Precision.** CPU: fp32 always. GPU: the config's ``precision`` -- ``"fp16"`` is the published recipe
  (fp16 autocast + ``GradScaler``), ``"bf16"`` bf16 autocast (no scaler), ``"fp32"`` none.
  ``channels_last`` and ``torch.compile`` are optional (``RuntimeOptions``).
* **Randomness.** Augmentation draws from a ``torch.Generator`` seeded from ``(seed, rank, epoch)``,
  so every rank augments independently and a resumed epoch replays exactly.
* **Checkpoints.** After every epoch all ranks call ``ray.train.report`` (a barrier); rank 0 attaches
  a safe checkpoint (``trainers.checkpoint``) of model, optimizer, scheduler, scaler, method extra
  state, epoch, RNG states and config. On start, ``ray.train.get_checkpoint()`` resumes from it.
* **Validation and best checkpoint** (``trainers.pretrain_validation``). With validation subjects
  and a ``valid_batch_size``, every epoch ends with the SSP loss on those subjects (no gradient, the
  same augmented views every epoch, mean over all ranks), logged as ``valid_loss``; the epoch with the
  lowest one is the best (DINO: lowest epoch training loss, as published). Its weights travel in the
  checkpoint (``TrainState.best``), so a resumed run still selects over every epoch.
* **Determinism.** ``deterministic: true`` switches to deterministic kernels and turns the cuDNN
  benchmark off (``trainers.determinism``).
* **Tracking.** Rank 0 alone logs params, per-epoch loss, valid_loss, lr, slices/s and epoch time
  through the ``Tracker`` it receives, writes a small progress file the driver polls, and at the end
  exports ``encoder.pt`` (+ ``encoder_decoder.pt`` for MIM), the best epoch's ``encoder_best.pt``
  (+ ``encoder_decoder_best.pt``) and ``manifest.json`` (``trainers.weights``).

``loop_config`` keys (all JSON-able except ``tracker``)::

    store: str                  store path/URL
    subjects: list[str] | None  subject ids to pretrain on (None = every subject of the store)
    valid_subjects: list[str] | None  subject ids of the validation loss (None/empty = no validation)
    config: dict                the resolved method config (``trainers.methods.config``)
    runtime: dict               ``RuntimeOptions``
    run_name: str               deterministic run name (also in the manifest)
    output: str                 absolute run directory for weights, manifest, progress and events
    dataset_hash: str           the store's content hash (for the manifest)
    tracker: Tracker | None     picklable tracker (rank 0 uses it); None = no tracking
    mlflow_run_id: str | None   recorded in the manifest
    fault_inject: str | None    test only: "epoch=E,rank=R" kills that rank once at the start of epoch E
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainers.checkpoint import TrainState, capture_rng, restore_rng, resume_state, save_checkpoint
from trainers.tracking import NullTracker, Tracker
from trainers.weights import WeightsManifest, save_weights, write_manifest

log = logging.getLogger("sspctl.pretrain")

PROGRESS_FILE = "progress.json"
EVENTS_FILE = "events.jsonl"
FAULT_MARKER = ".fault_injected"
FAULT_ENV = "SSPCTL_FAULT_INJECT"


class LoopError(ValueError):
    """The loop cannot start with this configuration; one line naming the key."""


class RuntimeOptions(BaseModel):
    """How the loop runs (not part of the published method, so not in the method config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sync_batchnorm: bool = Field(True, description="convert BatchNorm to SyncBatchNorm when world size > 1 (CUDA only)")
    find_unused_parameters: bool = Field(False, description="DDP find_unused_parameters")
    cpu_fp32: bool = Field(True, description="ignore mixed precision on CPU (autocast on CPU is slow)")
    recon_every: int = Field(5, ge=1, description="MIM: log a reconstruction image every N epochs (and the last)")
    progress_interval_s: float = Field(1.0, gt=0, description="seconds between progress-file writes")
    cache: bool = Field(True, description="hold the rank's slices in memory (SliceLoader cache)")


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def per_rank_batch(global_batch: int, world_size: int, key: str = "batch_size") -> int:
    """Per-rank batch of a global batch split over ``world_size`` ranks (``key`` names it in errors).

    Raises:
        LoopError: if ``world_size`` does not divide ``global_batch``.
    """
    if global_batch % world_size:
        raise LoopError(
            f"{key}: the global batch {global_batch} is not divisible by {world_size} workers; "
            f"choose a worker count that divides it"
        )
    return global_batch // world_size


def augmentation_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed from ``(seed, rank, epoch)``: distinct streams per rank and epoch, stable across runs."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def parse_fault(spec: str | None) -> tuple[int, int] | None:
    """``"epoch=E,rank=R"`` -> ``(E, R)``; ``None``/empty -> ``None``.

    Raises:
        LoopError: on any other text.
    """
    if not spec:
        return None
    try:
        parts = dict(item.split("=", 1) for item in spec.replace(" ", "").split(","))
        return int(parts["epoch"]), int(parts.get("rank", 0))
    except (ValueError, KeyError):
        raise LoopError(f"{FAULT_ENV}: expected 'epoch=E,rank=R', got {spec!r}") from None


def select_device() -> torch.device:
    """This rank's device: Ray Train's assignment inside a worker, else CUDA if present, else CPU."""
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # noqa: BLE001 - outside a Ray Train worker
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device, cpu_fp32: bool = True) -> tuple[torch.dtype | None, bool]:
    """Autocast dtype (or None) and whether to use a ``GradScaler``.

    ``precision`` is ``"fp32"``, ``"fp16"`` (autocast + GradScaler, the published recipe) or
    ``"bf16"`` (autocast, no scaler). On CPU everything runs in fp32 when ``cpu_fp32``.
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise LoopError(f"precision: expected fp32, fp16 or bf16, got {precision!r}")
    if precision == "fp32" or (device.type == "cpu" and cpu_fp32):
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync_batchnorm_applies(device: torch.device, world_size: int, options: RuntimeOptions) -> bool:
    """Whether BatchNorm becomes SyncBatchNorm: more than one rank, asked for, and a CUDA device.

    torch's SyncBatchNorm synchronises only CUDA tensors; on CPU (gloo) BN statistics stay per worker.
    """
    return world_size > 1 and options.sync_batchnorm and device.type == "cuda"


def convert_sync_batchnorm(modules: nn.Module, method: Any | None = None) -> nn.Module:
    """BatchNorm -> SyncBatchNorm in ``modules`` and in the networks ``method`` keeps outside them.

    ``method.convert_sync_batchnorm()`` is called when the method has one (DINO: its EMA teacher),
    so a network that runs beside ``modules`` on the same batch normalises with the same (global)
    statistics. Conversion keeps parameter names, order and state-dict keys and shares the weights;
    it works on CPU modules (only a synced forward needs CUDA and a process group).

    Returns:
        The converted ``modules`` (the same object unless ``modules`` itself is a BatchNorm layer).
    """
    modules = nn.SyncBatchNorm.convert_sync_batchnorm(modules)
    hook = getattr(method, "convert_sync_batchnorm", None)
    if callable(hook):
        hook()
    return modules


def wrap_model(
    modules: nn.Module, device: torch.device, world_size: int, options: RuntimeOptions,
    *, channels_last: bool = False, compile: bool = False, method: Any | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Move ``modules`` to ``device`` (SyncBN + DDP when ``world_size > 1``; optional channels_last/compile).

    With SyncBN (``sync_batchnorm_applies``) the networks ``method`` keeps outside ``modules`` (DINO's
    teacher) are converted too (``convert_sync_batchnorm``); they are neither moved nor wrapped here.

    Returns ``(model, modules)``: what the training step calls, and the (possibly SyncBN-converted)
    module whose ``state_dict`` the checkpoint holds (never the DDP/compile wrapper, so keys carry no
    ``module.``/``_orig_mod.`` prefix).
    """
    if sync_batchnorm_applies(device, world_size, options):
        modules = convert_sync_batchnorm(modules, method)
    modules = modules.to(device)
    if channels_last:
        modules = modules.to(memory_format=torch.channels_last)
    model: nn.Module = modules
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(modules, device_ids=device_ids, find_unused_parameters=options.find_unused_parameters)
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model, modules


# ----------------------------------------------------------------------------------------------
# Files rank 0 writes for the driver and for people
# ----------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via a temporary file and rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def append_event(output: Path, **event: Any) -> None:
    """Append one JSON line to ``events.jsonl`` (start/resume/epoch/fault/done, with wall time)."""
    with (output / EVENTS_FILE).open("a") as handle:
        handle.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_events(output: str | Path) -> list[dict[str, Any]]:
    """The events a run wrote so far (empty if none)."""
    path = Path(output) / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressWriter:
    """Rank 0's throttled progress file: epoch, step, loss, slices/s, ETA (read by the driver)."""

    def __init__(self, output: Path, epochs: int, steps_per_epoch: int, interval_s: float, global_batch: int) -> None:
        self.path = output / PROGRESS_FILE
        self.epochs, self.steps_per_epoch, self.interval_s = epochs, steps_per_epoch, interval_s
        self.global_batch = global_batch
        self._last = 0.0

    def update(self, *, epoch: int, step: int, loss: float | None, slices_per_s: float, force: bool = False,
               state: str = "running") -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        done = epoch * self.steps_per_epoch + step
        total = self.epochs * self.steps_per_epoch
        steps_per_s = slices_per_s / max(self.global_batch, 1) if slices_per_s else 0.0
        eta = (total - done) / steps_per_s if steps_per_s > 0 else None
        write_json_atomic(self.path, {
            "state": state, "epoch": epoch, "epochs": self.epochs, "step": step,
            "steps_per_epoch": self.steps_per_epoch, "done_steps": done, "total_steps": total,
            "loss": loss, "slices_per_s": slices_per_s, "eta_s": eta, "time": time.time(),
        })


# ----------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------


def _ray_context() -> tuple[int, int]:
    """(rank, world_size) inside a Ray Train worker, (0, 1) outside."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 - plain process (benchmarks, unit use)
        return 0, 1


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None, epoch: int, in_ray: bool) -> None:
    """``ray.train.report`` (every rank; rank 0 passes the checkpoint directory)."""
    if not in_ray:
        return
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")


def mean_over_ranks(total: torch.Tensor, count: int, world_size: int) -> float:
    """Mean of per-rank sums over all ranks (same value on every rank)."""
    pair = torch.stack([total.detach().double().cpu(), torch.tensor(float(count), dtype=torch.float64)])
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            # gloo handles CPU tensors; move to the default device for NCCL.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else pair.device
            pair = pair.to(device)
            dist.all_reduce(pair)
            pair = pair.cpu()
    return float(pair[0] / max(pair[1].item(), 1.0))


def _maybe_inject_fault(spec: tuple[int, int] | None, epoch: int, rank: int, output: Path) -> None:
    """Test-only: kill this process once (a marker file in the run dir makes it fire only once)."""
    if spec is None or spec != (epoch, rank):
        return
    marker = output / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(json.dumps({"epoch": epoch, "rank": rank, "time": time.time()}))
    try:  # wait until the controller has committed the last checkpoint, so the test is not a race
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60
        )
    except Exception:  # noqa: BLE001 - outside Ray there is nothing to wait for
        pass
    append_event(output, event="fault_injected", epoch=epoch, rank=rank)
    log.warning("fault injection: rank %d exits at the start of epoch %d", rank, epoch)
    os._exit(1)


def device_batches(loader: Any, device: torch.device, channels_last: bool, limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """At most ``limit`` batches of ``loader`` on ``device`` (``image`` NHWC if ``channels_last``)."""
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        yield batch


def pretrain_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One rank of a pretraining run (see the module docstring for ``loop_config``).

    Returns (rank 0's value becomes ``Result.return_value``) ``{"final_loss", "epochs", "run_dir",
    "files", "resumed_from", "best", "validation_skipped"}``: ``best`` is ``{"epoch", "loss", "metric",
    "files"}`` or ``None``; ``validation_skipped`` the one-line reason there was no validation, or ``None``.
    """
    from datastore.loader import SliceLoader
    from trainers.determinism import configure_determinism
    from trainers.methods.config import PretrainConfig
    from trainers.pretrain_validation import BestSoFar, best_file_name, build_valid_loader, skip_reason, validation_loss

    in_ray = _in_ray_worker()
    rank, world_size = _ray_context()
    config = PretrainConfig.model_validate(loop_config["config"])
    options = RuntimeOptions.model_validate(loop_config.get("runtime") or {})
    output = Path(loop_config["output"])
    output.mkdir(parents=True, exist_ok=True)
    tracker: Tracker = (loop_config.get("tracker") or NullTracker()) if rank == 0 else NullTracker()
    fault = parse_fault(loop_config.get("fault_inject"))
    device = select_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not config.deterministic
    configure_determinism(config.deterministic, device)

    batch = per_rank_batch(config.batch_size, world_size)
    loader = SliceLoader(
        loop_config["store"], loop_config.get("subjects"), labelled_only=False, batch_size=batch,
        rank=rank, world_size=world_size, seed=config.seed, cache=options.cache, progress=False,
    )
    steps_per_epoch = min(len(loader), config.steps_per_epoch or len(loader))
    valid_subjects = loop_config.get("valid_subjects")
    valid_loader, skipped = None, skip_reason(config, valid_subjects)
    if skipped is None:
        valid_loader, skipped = build_valid_loader(loop_config["store"], valid_subjects, config, rank, world_size,
                                                   options.cache)
    if skipped is not None and rank == 0:
        (log.info if config.best_metric == "train_loss" else log.warning)("validation: %s", skipped)
    total_steps = config.total_steps(steps_per_epoch)

    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    method = build_method(config)
    model, modules = wrap_model(method.modules, device, world_size, options,
                                channels_last=config.channels_last, compile=config.compile, method=method)
    _move_method_state(method, device, config.channels_last)
    optimizer = config.build_optimizer(modules)
    amp_dtype, use_scaler = resolve_precision(config.precision, device, options.cpu_fp32)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    start_epoch, global_step, last_loss = 0, 0, float("nan")
    selects_best = valid_loader is not None or config.best_metric == "train_loss"
    best = BestSoFar(config.best_metric)
    state = resume_state(in_ray)
    if state is not None:
        modules.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        if state.method_extra:
            method.load_extra_state({k: v.to(device) for k, v in state.method_extra.items()})
        if state.rng:
            restore_rng(state.rng)
        start_epoch, global_step = state.epoch + 1, state.global_step
        last_loss = float(state.metrics.get("loss", float("nan")))
        best = BestSoFar.from_state(config.best_metric, state.best)
        if rank != 0:
            best.weights = None  # only rank 0 exports

    resolved = config.model_dump(mode="json")
    if rank == 0:
        append_event(output, event="resume" if state is not None else "start", epoch=start_epoch,
                     world_size=world_size, device=str(device), torch_threads=torch.get_num_threads(),
                     validation_skipped=skipped)
        if start_epoch == 0:
            tracker.log_params({**resolved, "runtime": options.model_dump(mode="json"), "world_size": world_size,
                                "per_worker_batch": batch, "steps_per_epoch": steps_per_epoch})
        tracker.set_tags({"sspctl.stage": "pretrain", "sspctl.method": config.method.name,
                          "sspctl.device": device.type, "sspctl.world_size": str(world_size)})
    progress = ProgressWriter(output, config.epochs, steps_per_epoch, options.progress_interval_s, config.batch_size)

    for epoch in range(start_epoch, config.epochs):
        _maybe_inject_fault(fault, epoch, rank, output)
        loader.set_epoch(epoch)
        generator = torch.Generator(device=device).manual_seed(augmentation_seed(config.seed, rank, epoch))
        modules.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        started = time.perf_counter()
        lr = config.lr_at(global_step, steps_per_epoch)
        for step, batch_data in enumerate(device_batches(loader, device, config.channels_last, steps_per_epoch)):
            lr = config.apply_schedule(optimizer, global_step, steps_per_epoch)
            with autocast(device, amp_dtype):
                out = method.training_step(batch_data, model, epoch, step, generator)
            loss = out["loss"]
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
            method.after_optimizer_step(epoch, global_step, total_steps)
            loss_sum += loss.detach().double()
            if rank == 0:
                rate = (step + 1) * config.batch_size / max(time.perf_counter() - started, 1e-9)
                progress.update(epoch=epoch, step=step + 1, loss=None, slices_per_s=rate)
        epoch_time = time.perf_counter() - started
        last_loss = mean_over_ranks(loss_sum, steps_per_epoch, world_size)
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"epoch {epoch}: training loss is {last_loss}; lower the learning rate or use fp32")
        metrics = {"loss": last_loss, "lr": lr, "slices_per_s": steps_per_epoch * config.batch_size / epoch_time,
                   "epoch_time_s": epoch_time, "epoch": epoch}
        if valid_loader is not None:
            metrics["valid_loss"] = validation_loss(
                method, modules, valid_loader, device, seed=config.seed, rank=rank, world_size=world_size,
                steps=config.valid_steps, amp_dtype=amp_dtype, channels_last=config.channels_last,
            )
        if selects_best:
            best.offer(epoch, metrics["valid_loss" if config.best_metric == "valid_loss" else "loss"],
                       method.export if rank == 0 else None)
        checkpoint_dir = None
        is_last = epoch + 1 == config.epochs
        if rank == 0:
            if (epoch + 1) % config.checkpoint_every == 0 or is_last:
                checkpoint_dir = Path(tempfile.mkdtemp(prefix="sspctl-ckpt-"))
                save_checkpoint(checkpoint_dir, TrainState(
                    epoch=epoch, global_step=global_step, model=modules.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler={"kind": config.schedule.kind, "global_step": global_step,
                               "steps_per_epoch": steps_per_epoch},
                    scaler=None if scaler is None else scaler.state_dict(),
                    method_extra=method.extra_state(), rng=capture_rng(), config=resolved,
                    metrics={k: float(v) for k, v in metrics.items()}, best=best.to_state(),
                ))
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            progress.update(epoch=epoch + 1, step=0, loss=last_loss, slices_per_s=metrics["slices_per_s"], force=True)
            append_event(output, event="epoch", epoch=epoch, loss=last_loss, slices_per_s=metrics["slices_per_s"],
                         epoch_time_s=epoch_time, started=time.time() - epoch_time,
                         valid_loss=metrics.get("valid_loss"), best_epoch=best.epoch if best.found else None)
            if config.method.name == "mim" and ((epoch + 1) % options.recon_every == 0 or is_last):
                _log_reconstruction(method, modules, loader, device, epoch, output, tracker, config.seed)
        _report(metrics, checkpoint_dir, epoch, in_ray)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    files: dict[str, str] = {}
    if rank == 0:
        files = export_weights(
            method, output, run_name=loop_config["run_name"], config=resolved,
            dataset_hash=loop_config.get("dataset_hash") or "", epochs=config.epochs, final_loss=last_loss,
            image_size=config.image_size, model_width=config.model_width,
            mlflow_run_id=loop_config.get("mlflow_run_id"), tracker=tracker, best=best if best.found else None,
        )
        progress.update(epoch=config.epochs, step=0, loss=last_loss, slices_per_s=0.0, force=True, state="done")
        append_event(output, event="done", epoch=config.epochs - 1, loss=last_loss)
    best_summary = None
    if best.found:
        best_summary = {"epoch": best.epoch, "loss": best.loss, "metric": best.metric,
                        "files": {part: best_file_name(part) for part in files}}
    return {"final_loss": last_loss, "epochs": config.epochs, "run_dir": str(output), "files": files,
            "resumed_from": None if state is None else state.epoch, "best": best_summary,
            "validation_skipped": skipped}


def build_method(config: Any) -> Any:
    """The registered ``SSPMethod`` for ``config.method.name`` (networks built on the CPU)."""
    from trainers.methods import METHODS

    return METHODS[config.method.name](config, config.image_size)


def _in_ray_worker() -> bool:
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001
        return False


def _move_method_state(method: Any, device: torch.device, channels_last: bool = False) -> None:
    """Move method state outside ``modules`` (DINO teacher and centre) to ``device`` if the method allows."""
    to = getattr(method, "to", None)
    if callable(to):
        to(device, channels_last=channels_last)


def export_weights(
    method: Any, output: Path, *, run_name: str, config: dict[str, Any], dataset_hash: str, epochs: int,
    final_loss: float, image_size: int, model_width: int, mlflow_run_id: str | None, tracker: Tracker,
    best: Any | None = None,
) -> dict[str, str]:
    """Write ``<part>.pt`` for every part the method exports, the best epoch's ``<part>_best.pt`` when
    ``best`` (a ``BestSoFar`` holding weights) is given, then ``manifest.json`` (last); log them.

    Returns ``{part: file name}`` of the last epoch's files.
    """
    from trainers.pretrain_validation import best_file_name
    from trainers.weights import BestCheckpoint

    files: dict[str, str] = {}
    digests: dict[str, str] = {}
    for part, state in method.export().items():
        name = f"{part}.pt"
        digests[name] = save_weights(state, output / name)
        files[part] = name
    best_entry = None
    if best is not None and best.weights:
        best_files = {}
        for part, state in best.weights.items():
            name = best_file_name(part)
            digests[name] = save_weights(state, output / name)
            best_files[part] = name
        best_entry = BestCheckpoint(epoch=best.epoch, loss=best.loss, metric=best.metric, files=best_files)
    manifest = WeightsManifest(
        method=str(method.name), run_name=run_name, config=config, dataset_hash=dataset_hash,
        epochs=epochs, final_loss=final_loss, image_size=image_size, model_width=model_width,
        mlflow_run_id=mlflow_run_id,
        files=files, sha256=digests, best=best_entry,
    )
    for name in digests:
        tracker.log_artifact(output / name, "weights")
    path = write_manifest(output, manifest)
    tracker.log_artifact(path, "weights")
    return files


def _log_reconstruction(
    method: Any, modules: nn.Module, loader: Any, device: torch.device, epoch: int, output: Path,
    tracker: Tracker, seed: int,
) -> None:
    """MIM: save and log a PNG of input / masked input / reconstruction for a few slices."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        images = next(iter(loader))["image"][:4].to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = modules.training
        modules.eval()
        with torch.no_grad():
            masked, _ = method.masked_input(images, generator)
            recon = modules(masked)
        modules.train(was_training)
        rows = [images, masked, recon]
        fig, axes = plt.subplots(3, images.shape[0], figsize=(2 * images.shape[0], 6), squeeze=False)
        for r, (title, row) in enumerate(zip(("input", "masked", "reconstruction"), rows)):
            for c in range(images.shape[0]):
                axes[r][c].imshow(row[c, 0].float().cpu().numpy(), cmap="gray")
                axes[r][c].set_axis_off()
            axes[r][0].set_title(title, fontsize=8, loc="left")
        fig.suptitle(f"MIM epoch {epoch}")
        path = output / "reconstructions" / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        tracker.log_artifact(path, "reconstructions")
    except Exception as exc:  # noqa: BLE001 - a figure must never stop training
        log.warning("MIM reconstruction figure failed: %s", exc)


__all__ = [
    "LoopError", "RuntimeOptions", "augmentation_seed", "autocast", "build_method", "convert_sync_batchnorm",
    "device_batches", "export_weights", "mean_over_ranks", "parse_fault", "per_rank_batch", "pretrain_worker",
    "read_events", "resolve_precision", "select_device",
    "sync_batchnorm_applies", "wrap_model",
]
