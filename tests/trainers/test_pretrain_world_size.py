"""One worker and two gloo workers train the same global batches to the same losses (elastic training).

``pretrain_worker`` runs as it runs under Ray Train, but in processes this test starts: one plain
process, and two processes joined by a gloo group (``WorkerContext`` takes the group's rank). With
``global_batches`` the two ranks read the same global batches as the one worker, augment them with
the same draws and normalise them with the global batch's BatchNorm statistics
(``CrossRankBatchNorm``), so the per-step losses agree within 1e-5 (in float64 networks: see
``_in_float64``); with per-rank batches they do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.ui import free_port
from trainers.methods.config import PretrainConfig
from trainers.pretrain import pretrain_worker
from trainers.pretrain_outputs import read_events
from trainers.weights import load_weights

IMAGE = 32
EPOCHS = 6  # one optimiser step per epoch: the epoch losses are the step losses


def _config(method: str) -> PretrainConfig:
    """Every augmentation op on (noise, blur, solarize for DINO), SGD-free optimisers as published."""
    return PretrainConfig.model_validate({
        "method": {"name": method}, "epochs": EPOCHS, "batch_size": 8, "steps_per_epoch": 1,
        "image_size": IMAGE, "model_width": 4, "valid_batch_size": None, "seed": 3,
    })


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """6 phantom subjects (3 frames x 4 slices) at 32 px: 72 slices, 9 global batches of 8."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    root = tmp_path_factory.mktemp("world-size")
    write_dataset(root / "raw", "mnms", 6, 0, size=48, frames=(3, 3), slices=(4, 4), trivial=True)
    plan = plan_ingest({"mnms": root / "raw"}, str(root / "store.zarr"), IngestConfig(size=IMAGE, spacing=4.0, chunk_slices=8))
    execute_ingest(plan, executor="serial", progress=False)
    ids = [str(s) for s in SliceStore.open(root / "store.zarr").subjects["subject_id"]]
    return {"store": str(root / "store.zarr"), "subjects": ids}


def _job(data: dict[str, object], method: str, output: Path, global_batches: bool) -> dict[str, object]:
    return {"store": data["store"], "subjects": data["subjects"], "config": _config(method).model_dump(mode="json"),
            "runtime": {"global_batches": global_batches, "progress_interval_s": 60.0},
            "read": {"progress": False}, "run_name": output.name, "output": str(output), "dataset_hash": "h",
            "tracker": None}


def _in_float64() -> None:
    """Run the loop in float64: networks built in float64, batches widened to it on the way in.

    In float32 the trajectory of this tiny recipe is at the mercy of rounding: a change of summation
    order alone (the same single worker on 2 threads instead of 1) moved SimCLR's third-step loss by
    3e-4 (docs/pretraining.md). In float64 the networks round at ~1e-16, so agreement within 1e-5 tests
    the logic (same batches, same draws, global BatchNorm, exact gradients), not the luck of the
    rounding. The losses themselves are computed in float32 by design (``trainers/losses``: safe under
    fp16 autocast), so the logged values agree to a float32 ulp or two (measured: at most 1.4e-6, DINO).
    """
    import trainers.pretrain

    torch.set_default_dtype(torch.float64)
    device_batches = trainers.pretrain.device_batches

    def widened(*args: object, **kwargs: object):
        for batch in device_batches(*args, **kwargs):
            yield {**batch, "image": batch["image"].double()}

    trainers.pretrain.device_batches = widened


def _rank(rank: int, port: int, world: int, jobs: list[dict[str, object]]) -> None:
    torch.set_num_threads(1)
    _in_float64()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for job in jobs:  # one process start for every run (most of a tiny run's time is the imports)
            pretrain_worker(job)
    finally:
        dist.destroy_process_group()


def _train(jobs: list[dict[str, object]], world: int) -> None:
    """Run ``jobs`` one after the other on ``world`` gloo ranks (spawned processes)."""
    port = free_port()
    mp.start_processes(_rank, args=(port, world, jobs), nprocs=world, join=True, start_method="spawn")


def _outcome(output: Path, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The epoch losses and the exported encoder of the run in ``output``."""
    events = read_events(output)
    assert [e["world_size"] for e in events if e["event"] == "start"] == [world]
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    assert len(losses) == EPOCHS
    return losses, load_weights(output / "encoder.pt")


METHODS = ["simclr", "pcl", "dino", "mim"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method on one worker and on two (global batches), and SimCLR on two with per-rank batches."""
    root = tmp_path_factory.mktemp("runs")
    _train([_job(data, m, root / f"{m}-1", global_batches=True) for m in METHODS], 1)
    _train([_job(data, m, root / f"{m}-2", global_batches=True) for m in METHODS]
           + [_job(data, "simclr", root / "simclr-2-rank", global_batches=False)], 2)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_workers_follow_the_one_worker_loss_trajectory(runs: Path, method: str) -> None:
    one, one_weights = _outcome(runs / f"{method}-1", 1)
    two, two_weights = _outcome(runs / f"{method}-2", 2)
    assert two == pytest.approx(one, rel=0, abs=1e-5), json.dumps({"one": one, "two": two})
    assert len(set(one)) == EPOCHS  # the loss moves: the runs compared are training
    for key, value in one_weights.items():
        assert torch.allclose(two_weights[key].float(), value.float(), rtol=1e-4, atol=1e-5), key


@pytest.mark.slow
def test_per_rank_batches_do_not_follow_it(runs: Path) -> None:
    """The control: two workers that read their own shares see other batches, and the losses part."""
    one, _ = _outcome(runs / "simclr-1", 1)
    two, _ = _outcome(runs / "simclr-2-rank", 2)
    assert max(abs(a - b) for a, b in zip(one, two)) > 1e-3, (one, two)
