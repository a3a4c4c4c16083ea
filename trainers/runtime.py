"""The worker runtime under both training loops (pretraining and fine-tuning).

A loop asks the runtime for everything that is not its recipe:

* **Who am I.** ``WorkerContext.start()``: rank, world size, whether it runs inside a Ray Train
  worker, and the device (Ray Train's assignment inside a worker, else CUDA if present, else CPU);
  it also switches the process to deterministic kernels when asked (``trainers.determinism``).
* **Across ranks.** ``WorkerContext.reduce_sum`` (a float64 vector summed over ranks) and
  ``WorkerContext.mean`` (a mean of per-rank sums); the identity for one rank.
* **Checkpoints.** ``WorkerContext.resume()`` gives the last checkpoint Ray Train reported (``None``
  on a fresh run); ``WorkerContext.report(metrics, state)`` reports the metrics on every rank
  (``ray.train.report`` is a barrier) and, on rank 0, writes ``state`` as a safe checkpoint
  (``trainers.checkpoint``) attached to the report, then removes the temporary copy. Outside Ray
  Train a run given ``RuntimeOptions.checkpoint_dir`` keeps its checkpoints there instead (a
  single-worker grid cell running in its Tune trial's process); without one it keeps none.
* **Model and precision.** ``wrap_model`` (SyncBatchNorm, device, channels_last, DDP, compile),
  ``resolve_precision`` and ``autocast``; ``per_rank_batch`` splits a global batch;
  ``augmentation_seed`` seeds a rank's augmentation per epoch (``WorkerContext.generator``).
* **Files.** ``write_json_atomic`` for the files the driver polls.

Nothing here imports Ray at module level: outside a Ray Train worker every call works in a plain
process (``in_ray`` False, rank 0 of 1), which is how the unit tests run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.augment import Draws, RankRows
from trainers.checkpoint import TrainState, latest_local, resume_state, save_checkpoint, save_local
from trainers.runtime_options import RuntimeOptions


class LoopError(ValueError):
    """The loop cannot start with this configuration; one line naming the key."""


# ----------------------------------------------------------------------------------------------
# Pure helpers
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


def augmentation_seed(seed: int, rank: int, epoch: int, step: int | None = None) -> int:
    """A 63-bit seed from ``(seed, rank, epoch[, step])``: distinct streams per rank and epoch (and step),
    stable across runs. Seeding per step lets a run resumed inside an epoch replay the same draws."""
    key = f"{seed}/{rank}/{epoch}" if step is None else f"{seed}/{rank}/{epoch}/{step}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
    """Whether BatchNorm normalises with the global batch's statistics: more than one rank, asked for, and
    a CUDA device (torch's SyncBatchNorm) or a run with global batches (``CrossRankBatchNorm`` on CPU:
    its all-reduce per layer is latency a toy batch feels, so per-rank runs keep per-worker BN on CPU)."""
    return world_size > 1 and options.sync_batchnorm and (device.type == "cuda" or options.global_batches)


def batchnorm_converter(device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """The conversion to cross-rank BatchNorm for ``device``: torch's ``SyncBatchNorm`` on CUDA (which
    refuses CPU tensors), ``trainers.cross_rank_batchnorm`` elsewhere (CPU, gloo)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm
    from trainers.cross_rank_batchnorm import convert_cross_rank_batchnorm

    return convert_cross_rank_batchnorm


def convert_sync_batchnorm(modules: nn.Module, device: torch.device, method: Any | None = None) -> nn.Module:
    """BatchNorm -> cross-rank BatchNorm (``batchnorm_converter(device)``) in ``modules`` and in the
    networks an SSP ``method`` keeps outside them.

    ``method.convert_sync_batchnorm(convert)`` converts those (DINO: its EMA teacher), so a network that
    runs beside ``modules`` on the same batch normalises with the same (global) statistics. Conversion
    keeps parameter names, order and state-dict keys and shares the weights.

    Returns:
        The converted ``modules`` (the same object unless ``modules`` itself is a BatchNorm layer).
    """
    convert = batchnorm_converter(device)
    modules = convert(modules)
    if method is not None:
        method.convert_sync_batchnorm(convert)
    return modules


def wrap_model(
    modules: nn.Module, device: torch.device, world_size: int, options: RuntimeOptions,
    *, channels_last: bool = False, compile: bool = False, method: Any | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Move ``modules`` to ``device`` (SyncBN + DDP when ``world_size > 1``; optional channels_last/compile).

    With SyncBN (``sync_batchnorm_applies``) ``modules`` is converted, and so are the networks an SSP
    ``method`` keeps outside them (``method.convert_sync_batchnorm()``, DINO's teacher); those are
    neither moved nor wrapped here (``method.to`` moves them).

    Returns ``(model, modules)``: what the training step calls, and the (possibly SyncBN-converted)
    module whose ``state_dict`` the checkpoint holds (never the DDP/compile wrapper, so keys carry no
    ``module.``/``_orig_mod.`` prefix).
    """
    if sync_batchnorm_applies(device, world_size, options):
        modules = convert_sync_batchnorm(modules, device, method)
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


def device_batches(
    loader: Any, device: torch.device, channels_last: bool, limit: int, skip: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``skip`` to ``limit - 1`` of ``loader`` on ``device`` (``image`` NHWC if ``channels_last``).

    The first ``skip`` batches are drawn and dropped without moving them: a run resumed inside an
    epoch continues at the position of its deterministic epoch order.
    """
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        if i < skip:
            continue
        batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        yield batch


def wait_for_committed_checkpoint(timeout_s: float = 60) -> None:
    """Inside Ray Train: block until the controller has committed every reported checkpoint, so a
    worker that exits next is resumed from the checkpoint it just reported. Outside Ray: nothing."""
    try:
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s
        )
    except Exception:  # noqa: BLE001 - outside Ray there is nothing to wait for
        pass


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via a temporary file and rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The worker context
# ----------------------------------------------------------------------------------------------


def ray_identity() -> tuple[int, int, bool]:
    """``(rank, world_size, in_ray)``: Ray Train's values inside a worker; outside Ray the default
    process group's (a caller that set one up, e.g. the 1-vs-2-worker tests), else ``(0, 1, False)``."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), True
    except Exception:  # noqa: BLE001 - plain process (unit use, benchmarks)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), False
        return 0, 1, False


@dataclass(frozen=True)
class WorkerContext:
    """One rank of a training run: who it is, where it computes, and how it talks to the others."""

    rank: int
    world_size: int
    in_ray: bool
    device: torch.device
    checkpoint_dir: Path | None = None

    @classmethod
    def start(
        cls, *, deterministic: bool = False, cudnn_benchmark: bool = False, checkpoint_dir: str | Path | None = None
    ) -> WorkerContext:
        """This process's context; sets the CUDA device and the determinism switches.

        ``cudnn_benchmark`` turns cuDNN's algorithm search on for a non-deterministic CUDA run
        (pretraining does; fine-tuning keeps torch's default). ``checkpoint_dir``: where a run
        outside Ray Train keeps its own checkpoints (``RuntimeOptions.checkpoint_dir``).
        """
        from trainers.determinism import configure_determinism

        rank, world_size, in_ray = ray_identity()
        device = select_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if cudnn_benchmark:
                torch.backends.cudnn.benchmark = not deterministic
        configure_determinism(deterministic, device)
        local = Path(checkpoint_dir) if checkpoint_dir is not None and not in_ray else None
        return cls(rank, world_size, in_ray, device, local)

    @property
    def is_chief(self) -> bool:
        """Rank 0: the one rank that tracks, writes files and exports."""
        return self.rank == 0

    def generator(self, seed: int, epoch: int, step: int | None = None) -> torch.Generator:
        """This rank's augmentation generator for ``epoch`` (and ``step``): ``augmentation_seed(seed, rank, epoch, step)``."""
        return torch.Generator(device=self.device).manual_seed(augmentation_seed(seed, self.rank, epoch, step))

    def draws(self, seed: int, epoch: int, step: int | None = None, *, global_batches: bool) -> Draws:
        """What ``epoch`` (step ``step``) augments with: this rank's ``generator``, or with
        ``global_batches`` this rank's rows of draws made for the global batch from a generator seeded
        the same on every rank (rank 0's: one worker draws exactly what it drew before)."""
        if not global_batches:
            return self.generator(seed, epoch, step)
        shared = torch.Generator(device=self.device).manual_seed(augmentation_seed(seed, 0, epoch, step))
        return RankRows(shared, self.rank, self.world_size)

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a float64 CPU vector over ranks; the identity for one rank or no process group."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        if not dist.is_initialized():
            return values
        # gloo handles CPU tensors; NCCL needs them on the current CUDA device.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
        out = values.to(device)
        dist.all_reduce(out)
        return out.cpu()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective: every rank calls it equally often)."""
        return bool(self.reduce_sum(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)

    def mean(self, total: torch.Tensor, count: int | float) -> float:
        """Mean of per-rank sums ``total`` over ``count`` items per rank, over all ranks (same on every rank)."""
        pair = torch.stack([total.detach().double().cpu(), torch.tensor(float(count), dtype=torch.float64)])
        pair = self.reduce_sum(pair)
        return float(pair[0] / max(pair[1].item(), 1.0))

    def resume(self) -> TrainState | None:
        """The last checkpoint of this run: Ray Train's, or the latest in ``checkpoint_dir`` outside Ray
        Train (``None`` on a fresh run, or outside Ray Train without a ``checkpoint_dir``)."""
        if self.checkpoint_dir is not None:
            return latest_local(self.checkpoint_dir)
        return resume_state(self.in_ray)

    def report(self, metrics: dict[str, Any], state: TrainState | None = None, name: str | None = None) -> None:
        """Report ``metrics`` of epoch ``metrics["epoch"]`` (every rank must call it equally often).

        On rank 0 a given ``state`` is written as a checkpoint and attached to the report; other
        ranks' states are ignored. The temporary checkpoint copy is removed once Ray has taken it.
        ``name`` is the checkpoint's directory name (unique per checkpoint; default ``epoch_<EEEE>``).
        """
        epoch = int(metrics["epoch"])
        if self.checkpoint_dir is not None:  # outside Ray Train: one process, nothing to report to
            if state is not None and self.is_chief:
                save_local(self.checkpoint_dir, name or f"epoch_{epoch:04d}", state)
            return
        directory = Path(tempfile.mkdtemp(prefix="sspctl-ckpt-")) if state is not None and self.is_chief else None
        try:
            if directory is not None:
                save_checkpoint(directory, state)  # type: ignore[arg-type]
            if self.in_ray:
                import ray.train

                checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name or f"epoch_{epoch:04d}")
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)


__all__ = [
    "LoopError", "RuntimeOptions", "WorkerContext", "augmentation_seed", "autocast", "batchnorm_converter", "convert_sync_batchnorm", "device_batches",
    "per_rank_batch", "ray_identity", "resolve_precision", "select_device", "sync_batchnorm_applies", "wait_for_committed_checkpoint", "wrap_model",
    "write_json_atomic",
]
