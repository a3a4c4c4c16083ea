"""Supervised fine-tuning of one grid cell: the Ray Train per-worker function ``finetune_worker``.

One call is one rank of a data-parallel run (method-spec section 5):

* **Data.** The training subjects are the split's ``budget(b, seed)`` subset (``seed`` = subset
  seed; ``train_seed`` drives initialisation, data order and augmentation); rank ``r`` of ``N``
  reads its share of their labelled (ED/ES) slices through ``SliceLoader(labelled_only=True)``
  with a per-rank batch of ``batch_size / N`` (global batch 32 whatever ``N``). An epoch is one pass
  over those slices, or exactly ``iterations_per_epoch`` steps when set (cycling the slices, as
  nnU-Net does). With ``RuntimeOptions.global_batches`` (the grid sets it for an elastic
  ``workers_per_trial``) every rank reads all of them and takes its rows of world-size-independent
  global batches, augmented with its rows of the global batch's draws (``trainers.augment.RankRows``).
  Validation reads the split's ``valid`` subjects in store order without augmentation.
* **Augmentation.** ``trainers.augment.augment_pair``: the random affine applied with the
  same parameters to the image (bicubic) and to the label map (nearest neighbour), as the
  published resampler, then the intensity chain on the image only.
* **Model.** ``UNet2d(image_size, 4)`` with deep supervision; pretrained weights (if any) are loaded
  with the strict part loader ``trainers.weights.load_pretrained``. With ``frozen_encoder_epochs``
  the encoder's gradients are dropped before the optimizer step for those epochs (SGD skips
  parameters without a gradient, as the published code does with ``requires_grad=False``).
* **Optimiser.** SGD (nesterov, momentum 0.99, weight decay 3e-5), poly LR
  ``lr0 * (1 - e / epochs) ** 0.9`` set once per epoch (``trainers.schedules.poly_factor``, the closed
  form of ``PolynomialLR(total_iters=epochs, power=0.9)``). Loss: ``trainers.losses.segmentation_loss``.
* **Checkpoints.** Every ``val_every`` epochs and after the last one all ranks report
  the metrics (``train_loss``, ``valid_loss``, ``valid_dice``...); rank 0
  attaches a safe checkpoint (``trainers.checkpoint``) of the *last* state. Rank 0 also keeps the
  weights of the lowest validation loss in ``<output>/best_model.pt``. A restarted worker group
  resumes from the last reported checkpoint.
* **Result.** Rank 0 writes the fine-tuned model (``<output>/model.pt`` + ``model.json``, the
  ``eval_checkpoint`` state, by default the last as published), evaluates the split's test subjects
  in native space (``trainers.evaluation``), writes ``test_dice3d.csv``, ``test_dice2d.csv`` and
  ``test_overlay.png`` into ``output`` and returns the per-subject table.

The job is a ``trainers.jobs.FinetuneJob`` (store, split, config, output, tracker, runtime options,
evaluate); the worker runtime (``trainers.runtime``) gives the rank, device, reductions, resume and
report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.augment import augment_pair
from trainers.checkpoint import TrainState, capture_rng, restore
from trainers.finetune_config import FinetuneConfig
from trainers.jobs import FinetuneJob
from trainers.loading import for_worker, loader_record, loader_tags, shard
from trainers.losses.segmentation import segmentation_loss
from trainers.optimizers import sgd
from trainers.runtime import WorkerContext, autocast, per_rank_batch, resolve_precision, wrap_model
from trainers.schedules import poly_factor
from trainers.tracking import Tracker

log = logging.getLogger("sspctl.finetune")

MODEL_FILE = "model.pt"
MODEL_META = "model.json"
BEST_FILE = "best_model.pt"
MODEL_FORMAT = 1


class FinetuneError(ValueError):
    """The cell cannot run with this configuration or data; one line naming the key or file."""


# ----------------------------------------------------------------------------------------------
# Model files
# ----------------------------------------------------------------------------------------------


def build_model(image_size: int, config: FinetuneConfig) -> tuple[nn.Module, dict[str, Any] | None]:
    """``UNet2d(image_size, 4)`` initialised from ``config.training_seed``, with the pretrained part loaded.

    Returns ``(model, load report as a dict or None)``.

    Raises:
        trainers.weights.PartMismatchError / WeightsError: the weights do not match the part exactly.
    """
    from datastore.conventions import NUM_CLASSES
    from trainers.models.unet import UNet2d
    from trainers.weights import load_pretrained

    torch.manual_seed(config.training_seed)
    model = UNet2d(image_size, NUM_CLASSES, width=config.model_width)
    if config.weights is None:
        return model, None
    report = load_pretrained(model, config.weights, config.part, config.pretrained_checkpoint)
    return model, {"matched": len(report.matched), "ignored": len(report.ignored), "part": config.part,
                   "file": report.file, "sha256": report.sha256}


def provenance(config: FinetuneConfig, load_report: dict[str, Any] | None) -> dict[str, Any]:
    """What a cell started from: the weights file loaded and its sha256 (``None`` from scratch), and its
    seeds (``subset_seed`` picks the labelled subjects, ``train_seed`` drives init, order and augmentation)."""
    report = load_report or {}
    return {"init_weights": report.get("file"), "init_sha256": report.get("sha256"),
            "subset_seed": config.seed, "train_seed": config.training_seed}


def save_model_dir(
    directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write a fine-tuned model: ``model.pt`` (plain state dict, ``weights_only``-safe) + ``model.json``.

    ``meta`` must hold ``image_size`` and ``spacing_mm``; ``num_classes`` and ``format`` are added.
    """
    from trainers.weights import save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key in ("image_size", "spacing_mm"):
        if key not in meta:
            raise FinetuneError(f"{directory / MODEL_META}: missing key {key}")
    sha = save_weights(state_dict, directory / MODEL_FILE)
    full = {"format": MODEL_FORMAT, "num_classes": 4, "file": MODEL_FILE, "sha256": sha, **meta}
    (directory / MODEL_META).write_text(json.dumps(full, indent=2, default=str))
    return directory


# ----------------------------------------------------------------------------------------------
# Epoch pieces
# ----------------------------------------------------------------------------------------------


def validate(model: nn.Module, loader: Any, ctx: WorkerContext) -> dict[str, float]:
    """Mean validation loss (deep-supervision loss, as in training) and mean 2D Dice per class.

    Every slice counts once per rank; the sums are reduced over ranks.
    """
    from datastore.conventions import FOREGROUND_CLASSES, LABEL_NAMES
    from trainers.metrics import batch_dice_2d

    model.eval()
    sums = torch.zeros(2 + len(FOREGROUND_CLASSES), dtype=torch.float64)  # loss*n, n, dice sums
    with torch.no_grad():
        for batch in loader:
            image, label = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
            heads = model(image, deep_supervision=True)
            n = image.shape[0]
            sums[0] += float(segmentation_loss(heads, label)) * n
            sums[1] += n
            dice = batch_dice_2d(heads[0].argmax(1).cpu(), label.cpu())
            sums[2:] += dice.sum(0)
    model.train()
    sums = ctx.reduce_sum(sums)
    n = max(float(sums[1]), 1.0)
    out = {"valid_loss": float(sums[0]) / n}
    per_class = {f"valid_dice_{LABEL_NAMES[c]}": float(sums[2 + j]) / n for j, c in enumerate(FOREGROUND_CLASSES)}
    out.update(per_class)
    out["valid_dice"] = sum(per_class.values()) / len(per_class)
    return out


def epoch_batches(loader: Any, epoch: int, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches of ``loader`` for ``epoch``: one pass cut short, or several passes.

    Later passes of the same epoch reshuffle with epoch ids ``epoch * 10_000 + k``, so a small
    label budget still gets ``steps`` distinct-order iterations (nnU-Net's fixed epoch length).
    """
    done = 0
    for repeat in range(steps):  # at most ``steps`` passes, each yields >= 1 batch
        loader.set_epoch(epoch * 10_000 + repeat)
        for batch in loader:
            yield batch
            done += 1
            if done >= steps:
                return
        if done == 0:
            return  # an empty loader: nothing to train on


def train_step(
    net: nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor, label: torch.Tensor,
    frozen: list[nn.Parameter] | None = None, amp_dtype: torch.dtype | None = None,
) -> float:
    """One SGD step on ``image`` ``(B, 1, H, W)`` / ``label`` ``(B, H, W)``; returns the loss value.

    Parameters in ``frozen`` lose their gradient before the step, so SGD leaves them (and their
    momentum and weight decay) untouched, as with ``requires_grad=False`` in the published code.
    With ``amp_dtype`` (bf16) the forward pass and loss run under autocast; the backward does not.
    """
    with autocast(image.device, amp_dtype):
        loss = segmentation_loss(net(image, deep_supervision=True), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in frozen or ():
        p.grad = None
    optimizer.step()
    return float(loss.detach())


def _encoder_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.encoder.parameters())  # type: ignore[union-attr]



# ----------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellData:
    """One rank's view of a cell's data: the store, its grid, the split's subjects and the loaders."""

    store: Any
    image_size: int
    spacing_mm: float
    split: Any
    train_ids: list[str]
    valid_ids: list[str]
    batch: int
    train: Any
    valid: Any | None
    loading: dict[str, Any]  # trainers.loading.loader_record of the training loader

    @classmethod
    def open(cls, job: FinetuneJob, ctx: WorkerContext) -> CellData:
        """Open the store and the split, check the model grid, and build this rank's loaders.

        Raises:
            FinetuneError: ``config.image_size`` differs from the store's.
        """
        from datastore.loader import SliceLoader
        from datastore.splits import load_split
        from datastore.store import SliceStore

        config = job.config
        read, budget_from = for_worker(job.read, ctx.in_ray)
        store = SliceStore.open(job.store)
        image_size = store.image_size
        spacing_mm = float(store.attrs.get("spacing", 1.25))
        if config.image_size is not None and config.image_size != image_size:
            raise FinetuneError(f"config.image_size: {config.image_size} px differs from the store's {image_size} px ({job.store})")
        split = load_split(job.split)
        train_ids, valid_ids = split.budget(config.budget, config.seed), split.subjects("valid")
        batch = per_rank_batch(config.batch_size, ctx.world_size)
        train = SliceLoader(job.store, train_ids, labelled_only=True, batch_size=batch,
                            shard=shard(ctx, config.training_seed, global_batches=job.runtime.global_batches), read=read)
        valid = None
        if valid_ids:
            valid = SliceLoader(job.store, valid_ids, labelled_only=True, batch_size=max(1, config.valid_batch_size // ctx.world_size),
                                shard=shard(ctx, config.seed, shuffle=False, drop_last=False), read=read)
        return cls(store, image_size, spacing_mm, split, train_ids, valid_ids, batch, train, valid,
                   loader_record(train, budget_from))


def finetune_worker(job: FinetuneJob | Mapping[str, Any]) -> dict[str, Any]:
    """One rank of one fine-tuning cell.

    Returns (rank 0's value becomes ``Result.return_value``)::

        {"dice": [{"subject_id", "phase", "class", "dice"}, ...]   # 3D test Dice, native space
         "summary": {"dice_mean", "dice_LV", "dice_MYO", "dice_RV"},
         "valid": {last validation metrics}, "best_valid_loss": float, "epochs": int,
         "output": str, "model": str, "resumed_from": int | None,
         "init_weights": str | None, "init_sha256": str | None,      # the exact file loaded; None = scratch
         "subset_seed": int, "train_seed": int}

    Other ranks return the same keys with an empty ``dice`` list and ``summary``.
    """
    job = FinetuneJob.model_validate(job)
    config, output = job.config, job.output
    ctx = WorkerContext.start(deterministic=config.deterministic, checkpoint_dir=job.runtime.checkpoint_dir)
    output.mkdir(parents=True, exist_ok=True)
    tracker, device = job.tracker_for(ctx.rank), ctx.device
    data = CellData.open(job, ctx)
    steps_per_epoch = config.iterations_per_epoch or len(data.train)

    model, load_report = build_model(data.image_size, config)
    net, modules = wrap_model(model, device, ctx.world_size, job.runtime, channels_last=config.channels_last)
    amp_dtype, _ = resolve_precision(config.precision, device, job.runtime.cpu_fp32)
    optimizer = sgd(config.optimizer, modules.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_factor(config.epochs, config.poly_power))
    resolved = config.model_dump(mode="json")

    start_epoch, global_step, best_valid = 0, 0, math.inf
    valid_metrics: dict[str, float] = {}
    state = ctx.resume()
    if state is not None:
        restore(state, modules, optimizer, scheduler=scheduler)
        factor = poly_factor(config.epochs, config.poly_power)(state.epoch + 1)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor  # closed form: follows this run's epochs
        start_epoch, global_step = state.epoch + 1, state.global_step
        best_valid = float(state.metrics.get("best_valid_loss", math.inf))
        valid_metrics = {k: v for k, v in state.metrics.items() if k.startswith("valid_")}
    if ctx.is_chief:
        _log_start(tracker, config, ctx, data, resolved, steps_per_epoch, load_report, fresh=state is None,
                   read=job.read.model_dump(mode="json"))

    frozen_params = _encoder_params(modules) if config.pretrained and config.frozen_encoder_epochs else []
    from tqdm.auto import tqdm

    bar = tqdm(total=config.epochs, initial=start_epoch, desc=f"finetune {config.method}/{config.budget}/{config.seed}/t{config.training_seed}",
               unit="epoch", disable=not ctx.is_chief, leave=False)
    for epoch in range(start_epoch, config.epochs):
        generator = ctx.draws(config.training_seed, epoch, global_batches=job.runtime.global_batches)
        net.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        for batch in epoch_batches(data.train, epoch, steps_per_epoch):
            image, label = batch["image"].to(device), batch["label"].to(device)
            if config.augment_enabled:
                image, label = augment_pair(image, label, config.augment, generator)
            if config.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            frozen = frozen_params if epoch < config.frozen_encoder_epochs else []
            loss_sum += torch.tensor([train_step(net, optimizer, image, label, frozen, amp_dtype), 1.0], dtype=torch.float64)
            global_step += 1
        scheduler.step()
        loss_sum = ctx.reduce_sum(loss_sum)
        train_loss = float(loss_sum[0] / max(float(loss_sum[1]), 1.0))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"epoch {epoch}: training loss is {train_loss}; lower config.lr")
        last = epoch + 1 == config.epochs
        do_validate = data.valid is not None and ((epoch + 1) % config.val_every == 0 or last)
        metrics: dict[str, float] = {"train_loss": train_loss, "lr": lr, "epoch": float(epoch),
                                     "epoch_time_s": time.perf_counter() - started, "workers": float(ctx.world_size)}
        if do_validate:
            valid_metrics = validate(net, data.valid, ctx)
            if ctx.is_chief and valid_metrics["valid_loss"] < best_valid:
                from trainers.weights import save_weights

                best_valid = valid_metrics["valid_loss"]
                save_weights(modules.state_dict(), output / BEST_FILE)
        metrics.update(valid_metrics)
        metrics["best_valid_loss"] = best_valid if math.isfinite(best_valid) else float("nan")
        if ctx.is_chief:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch" and math.isfinite(v)}, step=epoch)
            bar.set_postfix(loss=f"{train_loss:.3f}", valid=f"{valid_metrics.get('valid_dice', float('nan')):.3f}")
            bar.update(1)
        if do_validate or last or data.valid is None:
            ctx.report(metrics, TrainState(
                epoch=epoch, global_step=global_step, model=modules.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), rng=capture_rng(), config=resolved, metrics=metrics,
            ) if ctx.is_chief else None)
    bar.close()

    result: dict[str, Any] = {"dice": [], "summary": {}, "valid": valid_metrics,
                              "best_valid_loss": best_valid, "epochs": config.epochs, "output": str(output),
                              "model": str(output), "resumed_from": None if state is None else state.epoch,
                              **provenance(config, load_report)}
    if ctx.is_chief:
        result.update(_finish(job, ctx, data, modules.state_dict(), tracker, resolved, best_valid, valid_metrics))
    return result


def _log_start(
    tracker: Tracker, config: FinetuneConfig, ctx: WorkerContext, data: CellData, resolved: dict[str, Any],
    steps_per_epoch: int, load_report: dict[str, Any] | None, *, fresh: bool, read: dict[str, Any],
) -> None:
    """Rank 0: the loader's line, the loop's tags (with the loader's plan), and on a fresh start its params
    (with the job's ``read`` options).

    The cell's identity tags (``sspctl.method``: the arm, budget, seeds) belong to the grid, which
    creates the run: ``config.method`` is what initialises the model, which is ``scratch`` for the
    ``scratch-b`` arm, so it is tagged ``sspctl.init`` and never overwrites the arm.
    """
    print(data.loading["line"], flush=True)
    tracker.set_tags({"sspctl.stage": "finetune", "sspctl.init": config.method,
                      "sspctl.device": ctx.device.type, "sspctl.world_size": str(ctx.world_size),
                      "sspctl.torch_threads": str(torch.get_num_threads()),  # bit-identity needs the same count
                      **loader_tags(data.loading)})
    if fresh:
        tracker.log_params({**resolved, "learning_rate": config.learning_rate, "world_size": ctx.world_size,
                            "per_worker_batch": data.batch, "steps_per_epoch": steps_per_epoch,
                            "train_subjects": len(data.train_ids), "train_slices": data.train.n_selected,
                            "valid_subjects": len(data.valid_ids), "store_hash": data.store.hash or "",
                            "pretrained_keys": (load_report or {}).get("matched", 0), "read": read})


def _finish(
    job: FinetuneJob, ctx: WorkerContext, data: CellData, last_state: dict[str, torch.Tensor], tracker: Tracker,
    resolved: dict[str, Any], best_valid: float, valid_metrics: dict[str, float],
) -> dict[str, Any]:
    """Rank 0: write the fine-tuned model (``eval_checkpoint``'s state) and evaluate the test subjects.

    Returns ``{"dice": rows, "summary": {...}}`` when the job evaluates, else ``{}``.
    """
    config, output = job.config, job.output
    final_state, which = last_state, "last"
    if config.eval_checkpoint == "best" and (output / BEST_FILE).is_file():
        from trainers.weights import load_weights

        final_state, which = load_weights(output / BEST_FILE), "best"
    save_model_dir(output, final_state, {
        "image_size": data.image_size, "model_width": config.model_width, "spacing_mm": data.spacing_mm,
        "checkpoint": which, "epochs": config.epochs, "config": resolved, "store": str(job.store),
        "store_hash": data.store.hash, "split": str(job.split),
        "best_valid_loss": best_valid if math.isfinite(best_valid) else None, "valid": valid_metrics,
        "loader": data.loading,
    })
    tracker.log_artifact(output / MODEL_META, "model")
    if not job.evaluate:
        return {}
    from trainers.evaluation import evaluate_store, model_scores_fn
    from trainers.models.unet import UNet2d

    eval_model = UNet2d(data.image_size, 4, width=config.model_width)
    eval_model.load_state_dict(final_state)
    eval_model.to(ctx.device)
    evaluation = evaluate_store(model_scores_fn(eval_model, ctx.device), data.store, data.split.subjects("test"),
                                data.image_size, data.spacing_mm, progress=True)
    for path in evaluation.write(output, prefix="test"):
        tracker.log_artifact(path, "evaluation")
    summary = evaluation.summary()
    tracker.log_metrics({f"test_{k}": v for k, v in summary.items()}, step=config.epochs)
    return {"dice": evaluation.dice3d.to_dict(orient="records"), "summary": summary}


__all__ = ["BEST_FILE", "MODEL_FILE", "MODEL_META", "CellData", "FinetuneError", "build_model",
           "finetune_worker", "provenance", "save_model_dir", "train_step", "validate"]
