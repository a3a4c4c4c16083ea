"""Shared fixtures (torch at import only, so the GPU tests still collect on a bare CUDA machine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test with one torch thread: tiny convolutions are fastest so on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """Undo a worker's process-wide ``deterministic: true`` switch after the test."""
    import os

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]
    if before[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[3]


@pytest.fixture(scope="module")
def cell_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 8-subject store (16 px at 5 mm) and a split with a 2-subject budget (fine-tuning cells)."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.splits import make_splits
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    root = tmp_path_factory.mktemp("ft")
    write_dataset(root / "raw", "mnms", 8, 0, size=40, frames=(3, 3), slices=(4, 4), trivial=True)
    plan = plan_ingest({"mnms": root / "raw"}, str(root / "store.zarr"),
                       IngestConfig(size=16, spacing=5.0, chunk_slices=8))
    execute_ingest(plan, executor="serial", progress=False)
    split = make_splits(SliceStore.open(root / "store.zarr").subjects, test_per_vendor=1, seed=0,
                        valid_fraction=0.25, budgets=(2,), seeds=(0,))
    split.save(root / "split.yaml")
    return {"root": root, "store": root / "store.zarr", "split": root / "split.yaml"}

