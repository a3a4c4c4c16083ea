"""Step checkpoints, the position inside an epoch, and the SIGTERM handler (no Ray)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainers.pretrain_position import Position, StepCheckpoints
from trainers.runtime import device_batches


def test_step_checkpoints_every_n_global_steps_but_not_at_an_epoch_end():
    calls: list[tuple[int, int, int]] = []
    hook = StepCheckpoints(4, 6, lambda e, b, s, loss: calls.append((e, b, s)))
    step = 0
    for epoch in range(3):
        for batch in range(1, 7):
            step += 1
            hook.after_step(epoch, batch, step, torch.zeros(()))
    # global steps 4, 8, 16 (12 and 18 end an epoch: the end-of-epoch report checkpoints them)
    assert calls == [(0, 4, 4), (1, 2, 8), (2, 4, 16)]


def test_a_stop_request_on_any_rank_checkpoints_then_stops():
    calls: list[int] = []
    stopped: list[int] = []
    requests = iter([False, False, True])
    hook = StepCheckpoints(None, 6, lambda e, b, s, loss: calls.append(s), stop_requested=lambda: next(requests),
                           any_rank=lambda flag: flag, on_stop=stopped.append)
    for step in (1, 2, 3):
        hook.after_step(0, step, step, torch.zeros(()))
    assert calls == [3] and stopped == [3]
    # a stop at an epoch's last step still checkpoints there
    calls.clear()
    StepCheckpoints(None, 6, lambda e, b, s, loss: calls.append(b), stop_requested=lambda: True,
                    on_stop=lambda s: None).after_step(0, 6, 6, torch.zeros(()))
    assert calls == [6]


def test_position_round_trips_through_a_checkpoint(tmp_path: Path):
    at = {"epoch": 3, "batch": 5, "world_size": 2, "loss_sum": 12.5}
    state = TrainState(epoch=2, global_step=23, model={"w": torch.ones(2)}, optimizer={}, position=at)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c", state))
    assert loaded.position == at
    assert Position.from_state(loaded.position, loaded.epoch + 1) == Position(3, 5, 2, 12.5)
    assert Position.from_state(None, 4) == Position(4, 0, None, 0.0)  # an end-of-epoch checkpoint


def test_device_batches_skips_the_done_part_of_the_epoch():
    loader = [{"image": torch.full((1,), float(i))} for i in range(10)]
    got = [int(b["image"][0]) for b in device_batches(loader, torch.device("cpu"), False, limit=8, skip=3)]
    assert got == [3, 4, 5, 6, 7]


def test_sigterm_requests_a_stop_and_exits_after_the_grace_period():
    code = textwrap.dedent("""
        import sys, time
        from trainers import preemption
        assert preemption.install(1.5)
        print("ready", flush=True)
        while not preemption.requested():
            time.sleep(0.05)
        print("requested", flush=True)
        time.sleep(60)  # never reaches a step boundary: the grace timer ends the process
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "requested"
    assert proc.wait(timeout=30) == 143
    assert 1.0 < time.monotonic() - sent < 20
