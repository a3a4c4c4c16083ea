"""One fine-tuning cell end to end on a tiny synthetic store, as the grid runs a one-worker cell.

synth -> ingest -> splits -> ``finetune_worker`` (pretrained encoder, strict load) -> resume from its
checkpoint directory in a second call -> native-space test evaluation; plus the loop's pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trainers.augment import AugmentConfig, augment_pair
from trainers.finetune import build_model, train_step
from trainers.finetune_config import FinetuneConfig
from trainers.models.unet import UNet2d
from trainers.schedules import poly_factor
from trainers.weights import PartMismatchError, save_weights

IMAGE_SIZE = 16  # 3 levels, 2 heads: the smallest U-Net, fast on 2 shared cores (the ``cell_data`` store's size)


def _encoder_file(path: Path, drop: str | None = None) -> Path:
    torch.manual_seed(123)
    state = {k: v for k, v in UNet2d(IMAGE_SIZE, 4).state_dict().items() if k.startswith("encoder.")}
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    save_weights(state, path)
    return path


def test_config_defaults_follow_the_recipe() -> None:
    scratch = FinetuneConfig()
    assert (scratch.learning_rate, scratch.batch_size, scratch.momentum, scratch.nesterov) == (0.01, 32, 0.99, True)
    assert scratch.weight_decay == 3e-5 and scratch.poly_power == 0.9 and scratch.epochs == 1000
    assert FinetuneConfig(method="mim", weights="w.pt", part="encoder_decoder").learning_rate == 0.005
    assert FinetuneConfig(method="mim", weights="w.pt", lr=0.1).learning_rate == 0.1
    with pytest.raises(ValueError, match="weights"):
        FinetuneConfig(method="simclr")
    with pytest.raises(ValueError, match="weights"):
        FinetuneConfig(weights="w.pt")
    with pytest.raises(ValueError, match="extra"):
        FinetuneConfig(learning_rat=0.1)  # type: ignore[call-arg]


def test_poly_lr_matches_torch_polynomial_lr_per_epoch() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01)
    reference = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=50, power=0.9)
    factor = poly_factor(50, 0.9)
    for epoch in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor(epoch), rel=1e-9, abs=1e-15)
        opt.step()
        reference.step()
    assert factor(49) == pytest.approx((1 / 50) ** 0.9) and factor(50) == 0.0 and factor(0) == 1.0


def test_build_model_loads_the_whole_encoder_and_refuses_partial(tmp_path: Path) -> None:
    full = _encoder_file(tmp_path / "encoder.pt")
    model, report = build_model(IMAGE_SIZE, FinetuneConfig(method="simclr", weights=str(full)))
    saved = torch.load(full, weights_only=True)
    assert report is not None and report["matched"] == len(saved)
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value)
    partial = _encoder_file(tmp_path / "partial.pt", drop="encoder.blocks.2")
    with pytest.raises(PartMismatchError, match="missing"):
        build_model(IMAGE_SIZE, FinetuneConfig(method="simclr", weights=str(partial)))
    with pytest.raises(PartMismatchError):  # no decoder in the file
        build_model(IMAGE_SIZE, FinetuneConfig(method="mim", weights=str(full), part="encoder_decoder"))


def test_frozen_encoder_step_updates_only_decoder_and_heads() -> None:
    torch.manual_seed(0)
    model = UNet2d(IMAGE_SIZE, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    image, label = torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, 4, (2, IMAGE_SIZE, IMAGE_SIZE))
    loss = train_step(model, opt, image, label, frozen=list(model.encoder.parameters()))
    assert np.isfinite(loss)
    params = dict(model.named_parameters())
    for name, param in params.items():
        moved = not torch.equal(param, before[name])
        assert moved == (not name.startswith("encoder.")), name
    train_step(model, opt, image, label)  # unfrozen: the encoder moves too
    assert not torch.equal(params["encoder.blocks.0.conv1.conv.weight"], before["encoder.blocks.0.conv1.conv.weight"])


def test_augment_pair_moves_label_with_image() -> None:
    image = torch.zeros(3, 1, 32, 32)
    image[:, :, 8:20, 10:24] = 1.0
    label = (image[:, 0] > 0.5).long() * 3
    cfg = AugmentConfig(noise_p=0, smooth_p=0, scale_intensity_p=0, shift_p=0, gamma_p=0)
    gen = torch.Generator().manual_seed(0)
    out_image, out_label = augment_pair(image, label, cfg, gen)
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert set(out_label.unique().tolist()) <= {0, 3}
    inside = out_image[:, 0] > 0.5
    agreement = (inside == (out_label == 3)).float().mean()
    assert agreement > 0.97  # bicubic image edge vs nearest label edge
    assert not torch.equal(out_label, label)  # it did move


def test_cell_end_to_end_resumes_from_its_checkpoints(cell_data: dict[str, Path], tmp_path: Path) -> None:
    """A cell as the grid runs a one-worker cell (in one process, its checkpoints in
    ``runtime.checkpoint_dir``): trained for 2 epochs, then resumed for a third, evaluated, tracked.
    The same worker under Ray Train is covered by tests/orchestrator/test_elastic_e2e.py."""
    from orchestrator.tracking import MlflowTracker
    from trainers.finetune import finetune_worker

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ft", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    output = tmp_path / "cell"
    weights = _encoder_file(tmp_path / "encoder.pt")
    config = {"method": "simclr", "weights": str(weights), "budget": 2, "seed": 0, "epochs": 2, "batch_size": 4,
              "valid_batch_size": 16, "frozen_encoder_epochs": 1}
    loop = {"store": str(cell_data["store"]), "split": str(cell_data["split"]), "output": str(output),
            "config": config, "tracker": MlflowTracker(uri, run_id), "evaluate": False,
            "runtime": {"checkpoint_dir": str(output / "checkpoints")}}
    first = finetune_worker(loop)
    assert first["resumed_from"] is None and first["dice"] == []
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["epoch_0000", "epoch_0001"]
    # The same checkpoint directory: the run resumes from its last checkpoint and trains only epoch 2.
    value = finetune_worker({**loop, "config": {**config, "epochs": 3}, "evaluate": True})
    assert value["resumed_from"] == 1 and value["epochs"] == 3

    table = pd.DataFrame(value["dice"])
    assert list(table.columns) == ["subject_id", "phase", "class", "dice"]
    from datastore.splits import load_split

    test_ids = set(load_split(cell_data["split"]).subjects("test"))
    assert set(table["subject_id"]) == test_ids and set(table["phase"]) == {"ED", "ES"}
    assert len(table) == len(test_ids) * 2 * 3 and table["dice"].between(0, 1).all()
    assert set(value["summary"]) == {"dice_mean", "dice_LV", "dice_MYO", "dice_RV"}

    written = pd.read_csv(output / "test_dice3d.csv", dtype={"subject_id": str})
    assert np.allclose(written["dice"], table["dice"])
    assert (output / "test_dice2d.csv").is_file() and (output / "test_overlay.png").is_file()
    meta = json.loads((output / "model.json").read_text())
    assert meta["image_size"] == IMAGE_SIZE and meta["spacing_mm"] == 5.0 and meta["checkpoint"] == "last"
    state = torch.load(output / "model.pt", weights_only=True)
    UNet2d(IMAGE_SIZE, 4).load_state_dict(state)  # strict: the file is a complete model

    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    # epochs 0-1 of the 2-epoch run, then epoch 2 of the resumed 3-epoch run: poly per epoch, lr0 0.005
    assert lrs == pytest.approx({0: 0.005, 1: 0.005 * 0.5**0.9, 2: 0.005 * (1 / 3) ** 0.9})
    logged = client.get_run(run_id).data
    assert logged.params["learning_rate"] == "0.005" and logged.params["pretrained_keys"] != "0"
    assert "test_dice_mean" in logged.metrics and logged.tags["sspctl.stage"] == "finetune"


class _CountingLoader:
    """A loader stand-in that yields ``(epoch id, index)`` for ``n`` batches per pass."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.n)])


def test_epoch_batches_cycles_a_small_budget_and_cuts_a_large_one() -> None:
    from trainers.finetune import epoch_batches

    cycled = list(epoch_batches(_CountingLoader(3), epoch=2, steps=7))
    assert len(cycled) == 7
    assert [e for e, _ in cycled] == [20000] * 3 + [20001] * 3 + [20002]  # a fresh shuffle per pass
    assert list(epoch_batches(_CountingLoader(5), epoch=1, steps=2)) == [(10000, 0), (10000, 1)]
    assert list(epoch_batches(_CountingLoader(0), epoch=0, steps=4)) == []


def _pretrained_run(directory: Path, with_best: bool = True) -> Path:
    """A pretraining run directory: different last and best encoders, and their manifest."""
    from trainers.weights import BestCheckpoint, WeightsManifest, write_manifest

    digests = {}
    for seed, name in ((1, "encoder.pt"), (2, "encoder_best.pt")):
        torch.manual_seed(seed)
        state = {k: v for k, v in UNet2d(IMAGE_SIZE, 4).state_dict().items() if k.startswith("encoder.")}
        digests[name] = save_weights(state, directory / name)
    best = BestCheckpoint(epoch=0, loss=1.0, metric="valid_loss", files={"encoder": "encoder_best.pt"})
    write_manifest(directory, WeightsManifest(
        method="simclr", run_name=directory.name, config={}, dataset_hash="h", epochs=2, final_loss=1.0,
        image_size=IMAGE_SIZE, files={"encoder": "encoder.pt"}, sha256=digests, best=best if with_best else None,
    ))
    return directory


def test_deterministic_cell_twice_is_bit_identical_and_returns_what_it_started_from(
    cell_data: dict[str, Path], tmp_path: Path, one_torch_thread: None, restore_determinism: None
) -> None:
    from trainers.finetune import finetune_worker
    from trainers.weights import WeightsError, load_weights, read_manifest

    run = _pretrained_run(tmp_path / "pretrain")
    config = {"method": "simclr", "weights": str(run), "pretrained_checkpoint": "best", "budget": 2, "seed": 0,
              "epochs": 2, "iterations_per_epoch": 2, "batch_size": 4, "valid_batch_size": 16, "deterministic": True}
    results = [finetune_worker({"store": str(cell_data["store"]), "split": str(cell_data["split"]),
                                "output": str(tmp_path / f"cell{i}"), "config": config, "evaluate": False})
               for i in range(2)]
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    first, second = (load_weights(tmp_path / f"cell{i}" / "model.pt") for i in range(2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert results[0]["valid"] == results[1]["valid"] and results[0]["best_valid_loss"] == results[1]["best_valid_loss"]
    # the cell reports the exact file it started from: the run's best encoder, not its last one
    value = results[0]
    assert value["init_weights"] == str(run / "encoder_best.pt")
    assert value["init_sha256"] == read_manifest(run).sha256["encoder_best.pt"] != read_manifest(run).sha256["encoder.pt"]
    assert (value["subset_seed"], value["train_seed"]) == (0, 0)

    from trainers.finetune import provenance

    assert provenance(FinetuneConfig(seed=2, train_seed=5), None) == {"init_weights": None, "init_sha256": None,
                                                                      "subset_seed": 2, "train_seed": 5}
    assert provenance(FinetuneConfig(seed=2), None)["train_seed"] == 2
    no_best = _pretrained_run(tmp_path / "no-best", with_best=False)
    with pytest.raises(WeightsError, match="no best checkpoint"):
        build_model(IMAGE_SIZE, FinetuneConfig(method="simclr", weights=str(no_best), pretrained_checkpoint="best"))
    _, report = build_model(IMAGE_SIZE, FinetuneConfig(method="simclr", weights=str(no_best)))  # default: last
    assert report is not None and report["file"] == str(no_best / "encoder.pt")
