"""What a pretraining run's rank 0 writes besides checkpoints: the files the driver polls, the events
log, the exported weights with their manifest, the method's epoch figures, and the test-only fault.

Run directory (``output``)::

    progress.json     throttled progress (epoch, step, slices/s, ETA), rewritten atomically
    events.jsonl      one JSON line per start/resume/epoch/fault/done, with wall time
    <part>.pt         exported weights per part, <part>_best.pt for the best epoch, manifest.json
    <figure>/epoch_NNNN.png   the method's epoch figures (MIM: reconstructions/)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from trainers.runtime import LoopError, wait_for_committed_checkpoint, write_json_atomic
from trainers.tracking import Tracker
from trainers.weights import WeightsManifest, save_weights, write_manifest

log = logging.getLogger("sspctl.pretrain")

PROGRESS_FILE = "progress.json"
EVENTS_FILE = "events.jsonl"
FAULT_MARKER = ".fault_injected"
FAULT_ENV = "SSPCTL_FAULT_INJECT"


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


class Fault(NamedTuple):
    """Test-only fault: rank ``rank`` exits at the start of epoch ``epoch``, or after global step ``step``."""

    epoch: int | None
    rank: int
    step: int | None = None


def parse_fault(spec: str | None) -> Fault | None:
    """``"epoch=E,rank=R"`` or ``"step=S,rank=R"`` -> ``Fault``; ``None``/empty -> ``None``.

    Raises:
        LoopError: on any other text.
    """
    if not spec:
        return None
    try:
        parts = dict(item.split("=", 1) for item in spec.replace(" ", "").split(","))
        if set(parts) - {"epoch", "rank", "step"} or ("epoch" in parts) == ("step" in parts):
            raise KeyError
        step = int(parts["step"]) if "step" in parts else None
        return Fault(None if step is not None else int(parts["epoch"]), int(parts.get("rank", 0)), step)
    except (ValueError, KeyError):
        raise LoopError(f"{FAULT_ENV}: expected 'epoch=E,rank=R' or 'step=S,rank=R', got {spec!r}") from None


def maybe_inject_fault(
    spec: Fault | None, epoch: int | None, rank: int, output: Path, step: int | None = None,
) -> None:
    """Test-only: kill this process once (a marker file in the run dir makes it fire only once).

    Called at the start of every epoch (``epoch``) and after every optimiser step (``step``).
    """
    if spec is None or spec.rank != rank or (spec.step, spec.epoch) != (step, None if step is not None else epoch):
        return
    marker = output / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(json.dumps({"epoch": epoch, "step": step, "rank": rank, "time": time.time()}))
    wait_for_committed_checkpoint()  # so the test is not a race with the last checkpoint
    append_event(output, event="fault_injected", epoch=epoch, step=step, rank=rank)
    log.warning("fault injection: rank %d exits (epoch %s, step %s)", rank, epoch, step)
    os._exit(1)


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


def log_epoch_figures(
    method: Any, modules: Any, loader: Any, device: Any, epoch: int, output: Path, tracker: Tracker, seed: int,
) -> None:
    """Save and log the method's figures of ``epoch`` (``SSPMethod.epoch_figures``) as
    ``<output>/<name>/epoch_NNNN.png``, artifact folder ``<name>``. A figure never stops training."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, fig in method.epoch_figures(modules, lambda: next(iter(loader))["image"], device, epoch, seed).items():
            path = output / name / f"epoch_{epoch:04d}.png"
            path.parent.mkdir(exist_ok=True)
            fig.savefig(path, dpi=80)
            plt.close(fig)
            tracker.log_artifact(path, name)
    except Exception as exc:  # noqa: BLE001 - a figure must never stop training
        log.warning("%s epoch figure failed: %s", method.name, exc)


__all__ = [
    "EVENTS_FILE", "FAULT_ENV", "FAULT_MARKER", "PROGRESS_FILE", "Fault", "ProgressWriter", "append_event", "export_weights",
    "log_epoch_figures", "maybe_inject_fault", "parse_fault", "read_events",
]
