"""How a training loop runs, apart from the method: ``RuntimeOptions`` (pydantic only, no torch).

Torch-free so that ``orchestrator/grid_spec.py`` can type a cell's job with it; ``trainers.runtime``
re-exports it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RuntimeOptions(BaseModel):
    """How a loop runs (not part of the published method, so not in the method config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sync_batchnorm: bool = Field(
        True, description="world size > 1: BatchNorm normalises with the global batch's statistics "
        "(torch SyncBatchNorm on CUDA; on CPU trainers.cross_rank_batchnorm, with global_batches only)",
    )
    global_batches: bool = Field(
        False, description="the same global batches at any worker count: every rank reads the whole selection, "
        "takes its rows of each global batch and draws augmentation for the global batch (elastic runs)",
    )
    find_unused_parameters: bool = Field(False, description="DDP find_unused_parameters")
    cpu_fp32: bool = Field(True, description="ignore mixed precision on CPU (autocast on CPU is slow)")
    recon_every: int = Field(
        5, ge=1, description="pretraining: log the method's epoch figures (MIM: reconstructions) every N epochs (and the last)"
    )
    progress_interval_s: float = Field(1.0, gt=0, description="seconds between progress-file writes")
    preempt_grace_s: float | None = Field(
        25.0, gt=0, description="pretraining: on SIGTERM checkpoint at the next step, exit after at most this (None: off)"
    )
    checkpoint_dir: str | None = Field(
        None, description="outside Ray Train: the directory where the run keeps its own two latest checkpoints and "
        "resumes from (a single-worker grid cell runs in its Tune trial's process); ignored inside Ray Train",
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="pretraining: also checkpoint every N optimiser steps (global steps), inside epochs"
    )


__all__ = ["RuntimeOptions"]
