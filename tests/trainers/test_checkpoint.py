"""The safe checkpoint format: full round trip through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainers.checkpoint import (
    STATE_FILE, CheckpointError, TrainState, capture_rng, check_safe, load_checkpoint, restore_rng,
    save_checkpoint,
)


def _trained_state() -> tuple[torch.nn.Module, TrainState]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(2, 1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 1, 8, 8)).square().mean().backward()
        opt.step()
        sched.step()
    state = TrainState(
        epoch=2, global_step=3, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
        scaler=scaler.state_dict(), method_extra={"center": torch.arange(4.0)}, rng=capture_rng(),
        config={"method": "simclr", "optimizer": {"lr": 0.1}, "sizes": [1, 2]}, metrics={"loss": 1.5},
    )
    return model, state


def test_round_trip_loads_with_weights_only(tmp_path):
    model, state = _trained_state()
    save_checkpoint(tmp_path / "ck", state)
    # The file itself must be loadable by the strict unpickler, independent of our loader.
    raw = torch.load(tmp_path / "ck" / STATE_FILE, weights_only=True)
    assert raw["epoch"] == 2 and raw["config"]["optimizer"]["lr"] == 0.1
    back = load_checkpoint(tmp_path / "ck")
    assert back.epoch == 2 and back.global_step == 3 and back.metrics == {"loss": 1.5}
    for key, value in state.model.items():
        assert torch.equal(back.model[key], value), key
    # Optimizer momentum buffers and the scheduler continue exactly where they were.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    opt.load_state_dict(back.optimizer)
    for k, buf in state.optimizer["state"].items():
        assert torch.equal(opt.state_dict()["state"][k]["momentum_buffer"], buf["momentum_buffer"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    sched.load_state_dict(back.scheduler)
    assert sched.last_epoch == 3 and sched.get_last_lr() == state.scheduler["_last_lr"]
    assert back.scaler["scale"] == 1024.0
    assert torch.equal(back.method_extra["center"], torch.arange(4.0))
    assert (tmp_path / "ck" / "meta.json").read_text().count('"epoch": 2') == 1


def test_rng_state_restores_python_numpy_torch(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    state = TrainState(epoch=0, global_step=0, model={}, optimizer={}, rng=capture_rng())
    save_checkpoint(tmp_path, state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path).rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1)) == expected


def test_unsafe_values_are_refused_with_the_key(tmp_path):
    state = TrainState(epoch=0, global_step=0, model={"w": torch.zeros(1)}, optimizer={}, config={"bad": object()})
    with pytest.raises(CheckpointError, match=r"config\.bad: object"):
        save_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"x\[1\]: ndarray"):
        check_safe([1, np.zeros(2)], "x")
    assert not (tmp_path / STATE_FILE).exists()


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path)
    # A pickle of an arbitrary object is refused by weights_only, and reported as such.
    torch.save({"format": 1, "obj": torch.nn.Linear(1, 1)}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="not a readable safe checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"format": 99}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path)


def test_best_so_far_with_its_weights_survives_the_checkpoint(tmp_path):
    from trainers.pretrain_validation import BestSoFar

    model, state = _trained_state()
    best = BestSoFar("valid_loss")
    assert best.to_state() is None
    assert best.offer(0, 2.0, lambda: {"encoder": model.state_dict()})
    assert not best.offer(1, 2.5, lambda: {"encoder": {}}) and not best.offer(2, float("nan"), None)
    state.best = best.to_state()
    save_checkpoint(tmp_path / "ck", state)
    back = BestSoFar.from_state("valid_loss", load_checkpoint(tmp_path / "ck").best)
    assert (back.epoch, back.loss, back.metric) == (0, 2.0, "valid_loss")
    for key, value in model.state_dict().items():
        assert torch.equal(back.weights["encoder"][key], value), key
    # a later epoch must beat the restored loss, not start from infinity
    assert not back.offer(3, 2.1, None) and back.offer(3, 1.9, None) and back.epoch == 3
    # checkpoints written before ``best`` existed (or by another selection rule) start afresh
    payload = torch.load(tmp_path / "ck" / STATE_FILE, weights_only=True)
    del payload["best"]
    torch.save(payload, tmp_path / "ck" / STATE_FILE)
    assert load_checkpoint(tmp_path / "ck").best is None
    assert not BestSoFar.from_state("train_loss", state.best).found


def test_local_checkpoints_keep_the_two_latest_and_resume_from_the_latest(tmp_path):
    """A run outside Ray Train (``RuntimeOptions.checkpoint_dir``) keeps its own checkpoints."""
    from dataclasses import replace

    from trainers.checkpoint import latest_local, save_local
    from trainers.runtime import WorkerContext

    _, state = _trained_state()
    directory = tmp_path / "checkpoints"
    assert latest_local(directory) is None  # a fresh run
    ctx = WorkerContext.start(checkpoint_dir=directory)
    assert (ctx.rank, ctx.world_size, ctx.in_ray, ctx.checkpoint_dir) == (0, 1, False, directory)
    assert ctx.resume() is None
    for epoch in range(4):
        ctx.report({"epoch": epoch, "loss": 1.0}, replace(state, epoch=epoch, global_step=10 * (epoch + 1)))
    ctx.report({"epoch": 4, "loss": 1.0})  # metrics without a state write nothing
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_0002", "epoch_0003"]
    resumed = ctx.resume()
    assert (resumed.epoch, resumed.global_step) == (3, 40)
    assert torch.equal(resumed.model["0.weight"], state.model["0.weight"])
    # "latest" is the largest global step, not the name: an in-epoch checkpoint after epoch 3's
    save_local(directory, "a-step", replace(state, epoch=3, global_step=45))
    assert latest_local(directory).global_step == 45
    assert sorted(p.name for p in directory.iterdir()) == ["a-step", "epoch_0003"]
    # a half-written checkpoint (a crash before the rename) is never taken for one
    (directory / ".epoch_0009.tmp").mkdir()
    assert latest_local(directory).global_step == 45
    # without a directory nothing is kept (unit use, benchmarks)
    plain = WorkerContext.start()
    plain.report({"epoch": 0}, state)
    assert plain.checkpoint_dir is None and plain.resume() is None
