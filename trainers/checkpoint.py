"""The safe training-checkpoint format: tensors and JSON-able values only.

A checkpoint directory holds one ``state.pt`` written with ``torch.save`` whose content is built only
from tensors, numbers, strings, booleans, ``None`` and lists/tuples/dicts of those, so that it loads
with ``torch.load(weights_only=True)`` (no pickled classes, no code execution on load). RNG states are
stored as tensors. Next to it, ``meta.json`` repeats the epoch and the resolved config for humans and
tools that do not want to import torch.

Layout of ``state.pt``::

    {"format": 1, "epoch": int (last finished epoch, 0-based), "global_step": int,
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict | None,
     "scaler": state_dict | None, "method_extra": dict[str, Tensor], "rng": dict[str, Tensor],
     "config": dict (JSON-able), "metrics": dict[str, float],
     "best": None | {"epoch": int, "loss": float, "metric": str, "weights": {part: state_dict}},
     "position": None | {"epoch": int, "batch": int, "world_size": int, "loss_sum": float}}

``best`` is the pretraining loop's best-so-far epoch with the exported weights of that epoch, so a
resumed run keeps selecting over every epoch, the ones before the crash included (checkpoints written
before it existed load with ``best=None``).

``position`` marks a checkpoint written inside an epoch (``--checkpoint-every-steps``): ``batch``
optimiser steps of epoch ``position.epoch`` are done (``epoch`` is then the last *finished* epoch,
``position.epoch - 1``), on ``world_size`` workers, and ``loss_sum`` is the mean over ranks of their
summed step losses so far in that epoch. ``None`` for a checkpoint at the end of an epoch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.safe_io import atomic_torch_save, safe_torch_load

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"

_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file and the key."""


def check_safe(value: Any, where: str = "<root>") -> None:
    """Raise ``CheckpointError`` naming the key if ``value`` holds anything but safe types.

    Safe: tensors, ``bool/int/float/str/None``, and lists, tuples and dicts (str or int keys; optimizer
    state dicts use int keys, which ``weights_only`` accepts) of safe values.
    """
    if isinstance(value, torch.Tensor) or isinstance(value, _SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_safe(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"checkpoint key {where}: dict key {key!r} is {type(key).__name__}, not str/int")
            check_safe(item, f"{where}.{key}")
        return
    raise CheckpointError(f"checkpoint key {where}: {type(value).__name__} cannot be saved safely (tensors and JSON values only)")


def capture_rng() -> dict[str, torch.Tensor]:
    """RNG states of python ``random``, numpy's global generator, torch CPU and every CUDA device, as tensors."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor([py_version, *py_internal], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_scalars": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if py_gauss is not None:
        state["python_gauss"] = torch.tensor([py_gauss], dtype=torch.float64)
    if np_name != "MT19937":  # pragma: no cover - numpy's legacy global state is always MT19937
        raise CheckpointError(f"unexpected numpy RNG {np_name}")
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = cuda_state
    return state


def restore_rng(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of ``capture_rng`` (CUDA states are restored for the devices present in both)."""
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0]) if "python_gauss" in state else None
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss))
    pos, has_gauss, np_gauss = state["numpy_scalars"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(np_gauss)))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in state:
                torch.cuda.set_rng_state(state[f"cuda{i}"].to(torch.uint8), i)


@dataclass
class TrainState:
    """Everything a resumed run needs (see module doc for the meaning of each field)."""

    epoch: int
    global_step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    method_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    position: dict[str, Any] | None = None


def _to_cpu(value: Any) -> Any:
    """Detached CPU copies of every tensor in a nested structure (so saving never touches the GPU state)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_checkpoint(directory: str | Path, state: TrainState) -> Path:
    """Write ``state`` into ``directory`` (created) as ``state.pt`` + ``meta.json``; return the directory.

    The write is atomic per file (temporary name, then rename), so a crash never leaves a truncated
    ``state.pt`` behind.

    Raises:
        CheckpointError: if any value is not a tensor or JSON-able (the key is named).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "epoch": int(state.epoch),
        "global_step": int(state.global_step),
        "model": _to_cpu(state.model),
        "optimizer": _to_cpu(state.optimizer),
        "scheduler": _to_cpu(state.scheduler),
        "scaler": _to_cpu(state.scaler),
        "method_extra": _to_cpu(state.method_extra),
        "rng": _to_cpu(state.rng),
        "config": state.config,
        "metrics": {k: float(v) for k, v in state.metrics.items()},
        "best": _to_cpu(state.best),
        "position": state.position,
    }
    check_safe(payload)
    try:
        json.dumps(state.config)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint key config: not JSON-able ({exc})") from None
    atomic_torch_save(payload, directory / STATE_FILE)
    meta = {"format": FORMAT_VERSION, "epoch": state.epoch, "global_step": state.global_step,
            "position": state.position, "metrics": payload["metrics"], "config": state.config}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_checkpoint(directory: str | Path) -> TrainState:
    """Read a checkpoint written by ``save_checkpoint`` with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        CheckpointError: one line naming the file if it is missing, unreadable or of another format.
    """
    path = Path(directory) / STATE_FILE
    payload = safe_torch_load(path, CheckpointError, "checkpoint file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected format {FORMAT_VERSION})")
    missing = [k for k in ("epoch", "global_step", "model", "optimizer") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks key(s) {', '.join(missing)}")
    return TrainState(
        epoch=int(payload["epoch"]),
        global_step=int(payload["global_step"]),
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload.get("scheduler"),
        scaler=payload.get("scaler"),
        method_extra=payload.get("method_extra") or {},
        rng=payload.get("rng") or {},
        config=payload.get("config") or {},
        metrics=payload.get("metrics") or {},
        best=payload.get("best"),
        position=payload.get("position"),
    )


def restore(
    state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
    scaler: Any | None = None, scheduler: Any | None = None,
) -> None:
    """Load ``state`` into a run's model, optimizer, ``GradScaler`` and LR scheduler, and restore the RNGs.

    The scaler and the scheduler are restored when both the object and its saved state exist (a run
    without a scaler ignores a saved one; pretraining keeps its schedule in closed form and passes no
    scheduler).
    """
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    if scheduler is not None and state.scheduler:
        scheduler.load_state_dict(state.scheduler)
    if state.rng:
        restore_rng(state.rng)


def save_local(directory: str | Path, name: str, state: TrainState, keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``<directory>/<name>`` and keep only the ``keep`` latest there.

    For a run outside Ray Train that keeps its own checkpoints (a single-worker grid cell). The
    checkpoint is written under a temporary name and renamed, so ``latest_local`` never sees half of
    one; "latest" is the largest ``global_step`` (then epoch) in ``meta.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    staging = directory / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, state)
    shutil.rmtree(final, ignore_errors=True)  # a rerun of the same epoch replaces its checkpoint
    os.replace(staging, final)
    for stale in _local_checkpoints(directory)[keep:]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_local(directory: str | Path) -> TrainState | None:
    """The latest checkpoint ``save_local`` wrote into ``directory`` (``None``: none yet)."""
    found = _local_checkpoints(Path(directory))
    return load_checkpoint(found[0]) if found else None


def _local_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints in ``directory``, latest first (by ``global_step``, then epoch)."""
    def order(path: Path) -> tuple[int, int]:
        meta = json.loads((path / META_FILE).read_text())
        return int(meta["global_step"]), int(meta["epoch"])

    if not directory.is_dir():
        return []
    done = [p for p in directory.iterdir() if not p.name.startswith(".") and (p / META_FILE).is_file()]
    return sorted(done, key=order, reverse=True)


def resume_state(in_ray: bool) -> TrainState | None:
    """The last checkpoint Ray Train reported for this run (``None`` outside Ray or on a fresh run)."""
    if not in_ray:
        return None
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory)
