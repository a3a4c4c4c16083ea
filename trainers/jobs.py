"""The typed jobs that cross into a Ray Train worker: one frozen model per loop.

The orchestrator builds a job once (``PretrainJob`` / ``FinetuneJob``) and hands it to
``TorchTrainer``; the worker starts by validating it (``Job.model_validate`` accepts the job itself
or the same keys as a dict), so a wrong key fails before any data is read, naming the key. Every
field is JSON-able except ``tracker``, a picklable ``trainers.tracking.Tracker`` that rank 0 alone
uses (``None``: no tracking).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, InstanceOf

from datastore.loader_options import ReadOptions

from trainers.finetune_config import FinetuneConfig
from trainers.methods.config import PretrainConfig
from trainers.runtime_options import RuntimeOptions
from trainers.tracking import NullTracker, Tracker


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field(description="slice store path or fsspec URL")
    output: Path = Field(description="absolute run (or cell) directory the worker writes into")
    runtime: RuntimeOptions = RuntimeOptions()
    read: ReadOptions = Field(ReadOptions(), description="how each rank's slice loaders read the store (datastore.loader_options)")
    tracker: InstanceOf[Tracker] | None = Field(None, description="picklable tracker used by rank 0; None = no tracking")

    def tracker_for(self, rank: int) -> Tracker:
        """The job's tracker on rank 0, a ``NullTracker`` elsewhere (or when the job has none)."""
        return (self.tracker or NullTracker()) if rank == 0 else NullTracker()


class PretrainJob(_Job):
    """One pretraining run (``trainers.pretrain.pretrain_worker``)."""

    config: PretrainConfig = Field(description="the resolved method config (trainers.methods.config)")
    subjects: list[str] | None = Field(None, description="subject ids to pretrain on (None = every subject)")
    valid_subjects: list[str] | None = Field(None, description="subject ids of the validation loss (None/empty = none)")
    run_name: str = Field(description="deterministic run name (also in the manifest)")
    dataset_hash: str | None = Field(None, description="the store's content hash (for the manifest)")
    mlflow_run_id: str | None = Field(None, description="recorded in the manifest")
    fault_inject: str | None = Field(None, description='test only: "epoch=E,rank=R" kills that rank once at epoch E')


class FinetuneJob(_Job):
    """One fine-tuning cell (``trainers.finetune.finetune_worker``)."""

    split: str = Field(description="split YAML path")
    config: FinetuneConfig
    evaluate: bool = Field(True, description="evaluate the split's test subjects at the end")


__all__ = ["FinetuneJob", "PretrainJob"]
