"""The worker runtime without Ray: identity, reductions over a real gloo group, report/resume, restore, jobs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from orchestrator.ui import free_port
from trainers.checkpoint import CheckpointError, TrainState, capture_rng, load_checkpoint, restore, save_checkpoint
from trainers.jobs import FinetuneJob, PretrainJob
from trainers.runtime import WorkerContext, augmentation_seed
from trainers.tracking import NullTracker


def test_context_outside_ray_is_rank_0_of_1_on_the_cpu() -> None:
    ctx = WorkerContext.start()
    assert (ctx.rank, ctx.world_size, ctx.in_ray, ctx.device.type) == (0, 1, False, "cpu")
    assert ctx.is_chief
    assert ctx.resume() is None  # nothing reported outside Ray
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert ctx.reduce_sum(values) is values
    assert ctx.mean(torch.tensor(6.0), 4) == 1.5


def test_generator_is_seeded_per_rank_and_epoch() -> None:
    cpu = torch.device("cpu")
    ranks = [WorkerContext(r, 2, False, cpu) for r in (0, 1)]
    draws = [torch.rand(3, generator=ctx.generator(7, 3)) for ctx in ranks]
    expected = torch.rand(3, generator=torch.Generator().manual_seed(augmentation_seed(7, 1, 3)))
    assert torch.equal(draws[1], expected)
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(torch.rand(3, generator=ranks[0].generator(7, 3)), draws[0])  # replays exactly


def test_global_batch_draws_share_rank_0s_generator_and_keep_each_rank_s_rows() -> None:
    from trainers.augment import RankRows

    cpu = torch.device("cpu")
    ranks = [WorkerContext(r, 2, False, cpu) for r in (0, 1)]
    own = ranks[1].draws(7, 3, 5, global_batches=False)
    assert isinstance(own, torch.Generator) and torch.equal(torch.rand(3, generator=own),
                                                            torch.rand(3, generator=ranks[1].generator(7, 3, 5)))
    shared = [ctx.draws(7, 3, 5, global_batches=True) for ctx in ranks]
    assert all(isinstance(d, RankRows) for d in shared) and [d.rank for d in shared] == [0, 1]
    one = torch.rand(4, generator=ranks[0].generator(7, 3, 5))  # what one worker draws at this step
    assert all(torch.equal(torch.rand(4, generator=d.generator), one) for d in shared)


def _reduce_on_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = WorkerContext(rank, 2, False, torch.device("cpu"))
        summed = ctx.reduce_sum(torch.tensor([rank + 1.0, 10.0], dtype=torch.float64))
        mean = ctx.mean(torch.tensor(3.0 * (rank + 1)), 3 if rank == 0 else 1)
        torch.save({"sum": summed, "mean": mean}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_reductions_over_two_gloo_ranks(tmp_path: Path) -> None:
    """Rank sums: [1+2, 10+10]; mean of per-rank sums 3 (3 items) and 6 (1 item) = 9 / 4, on both ranks."""
    mp.spawn(_reduce_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["sum"].tolist() == [3.0, 20.0]
        assert got["mean"] == 2.25


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **extra: object) -> TrainState:
    return TrainState(epoch=2, global_step=7, model=model.state_dict(), optimizer=optimizer.state_dict(),
                      rng=capture_rng(), metrics={"epoch": 2.0}, **extra)  # type: ignore[arg-type]


def _checkpoints(folder: Path) -> list[Path]:
    return list(folder.glob("sspctl-ckpt-*"))


def test_report_writes_the_chief_checkpoint_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    chief = WorkerContext(0, 2, False, torch.device("cpu"))
    chief.report({"epoch": 2, "loss": 1.0}, _state(model, optimizer))
    assert _checkpoints(tmp_path) == []  # written, then removed
    with pytest.raises(CheckpointError, match="config"):  # proof that the chief writes (and checks) the state
        chief.report({"epoch": 2}, _state(model, optimizer, config={"bad": object()}))
    assert _checkpoints(tmp_path) == []  # removed on failure too
    other = WorkerContext(1, 2, False, torch.device("cpu"))
    other.report({"epoch": 2}, _state(model, optimizer, config={"bad": object()}))  # other ranks never write


def test_restore_brings_back_model_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5**e)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path, TrainState(epoch=0, global_step=1, model=model.state_dict(),
                                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                         rng=capture_rng()))
    after = torch.rand(4)

    torch.manual_seed(1)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda e: 0.5**e)
    restore(load_checkpoint(tmp_path), fresh, fresh_opt, scheduler=fresh_sched)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.05
    momentum = [fresh_opt.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, model.parameters()))
    assert fresh_sched.last_epoch == scheduler.last_epoch == 1
    assert torch.equal(torch.rand(4), after)  # the RNG continues where the checkpoint left it


def test_jobs_are_frozen_and_validated_first(tmp_path: Path) -> None:
    keys = {"store": "s3://bucket/store.zarr", "output": str(tmp_path / "run"), "config": {"method": "simclr"},
            "run_name": "r"}
    job = PretrainJob.model_validate(keys)
    assert job.store == "s3://bucket/store.zarr" and job.config.batch_size == 224  # paper default filled in
    assert PretrainJob.model_validate(job) is job
    assert isinstance(job.tracker_for(0), NullTracker) and isinstance(job.tracker_for(1), NullTracker)
    with pytest.raises(ValidationError):
        job.run_name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="tracker"):
        PretrainJob.model_validate({**keys, "tracker": "not a tracker"})
    with pytest.raises(ValidationError, match="budget"):
        FinetuneJob.model_validate({"store": "x", "split": "s.yaml", "output": str(tmp_path / "cell"),
                                    "config": {"budget": 0}})


def test_a_worker_rejects_a_bad_job_before_touching_anything(tmp_path: Path) -> None:
    from trainers.finetune import finetune_worker
    from trainers.pretrain import pretrain_worker

    output = tmp_path / "run"
    with pytest.raises(ValidationError, match="bogus"):
        pretrain_worker({"store": "missing.zarr", "output": str(output), "config": {"method": "mim"},
                         "run_name": "r", "bogus": 1})
    with pytest.raises(ValidationError, match="split"):
        finetune_worker({"store": "missing.zarr", "output": str(output), "config": {}})
    assert not output.exists()
