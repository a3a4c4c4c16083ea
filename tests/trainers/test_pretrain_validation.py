"""Pretraining validation and best checkpoint, and ``deterministic: true``, on a real phantom store.

The loop runs in-process (``pretrain_worker`` outside Ray: no resume); the Ray path, resume
included, is exercised in ``tests/orchestrator/test_pretrain_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datastore.loader_options import ReadOptions
from orchestrator.ui import free_port
from trainers.methods.config import PretrainConfig
from trainers.pretrain import build_method, pretrain_worker
from trainers.pretrain_outputs import read_events
from trainers.pretrain_validation import build_valid_loader, skip_reason, validation_loss, validation_seed
from trainers.weights import load_weights, read_manifest

IMAGE = 32
MILD = {"rotation_deg": 10.0, "scale_range": [0.9, 1.1], "flip_p": 0.0, "noise_p": 0.0, "smooth_p": 0.0,
        "scale_intensity_p": 0.0, "shift_p": 0.0, "gamma_p": 0.0}


def _config(name: str = "simclr", **over: object) -> PretrainConfig:
    base = {"method": {"name": name, "augment": MILD}, "epochs": 2, "batch_size": 8, "valid_batch_size": 8,
            "steps_per_epoch": 3, "image_size": IMAGE, "model_width": 4, "optimizer": {"lr": 0.03}}
    return PretrainConfig.model_validate({**base, **over})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """7 phantom subjects (3 frames x 4 slices) at 32 px: 4 to train on, 3 to validate on (36 slices)."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    root = tmp_path_factory.mktemp("ssp-valid")
    write_dataset(root / "raw", "mnms", 7, 0, size=48, frames=(3, 3), slices=(4, 4), trivial=True)
    plan = plan_ingest({"mnms": root / "raw"}, str(root / "store.zarr"), IngestConfig(size=IMAGE, spacing=4.0, chunk_slices=8))
    execute_ingest(plan, executor="serial", progress=False)
    ids = [str(s) for s in SliceStore.open(root / "store.zarr").subjects["subject_id"]]
    return {"store": str(root / "store.zarr"), "train": ids[:4], "valid": ids[4:]}


def test_validation_scores_the_same_views_every_epoch_and_leaves_the_weights_alone(data, one_torch_thread):
    config = _config()
    torch.manual_seed(0)
    method = build_method(config)
    loader, reason = build_valid_loader(data["store"], data["valid"], config, 0, 1, read=ReadOptions(progress=False))
    assert reason is None and len(loader) >= 2
    before = {k: v.clone() for k, v in method.modules.state_dict().items()}

    def score() -> float:
        return validation_loss(method, method.modules, loader, torch.device("cpu"), seed=0, rank=0, world_size=1,
                               steps=None, amp_dtype=None)

    first = score()
    loader.set_epoch(7)  # the training loop moved on: validation still scores epoch 0's order and views
    assert score() == first
    assert method.modules.training  # train mode restored
    for key, value in method.modules.state_dict().items():  # BatchNorm statistics did not see validation data
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        next(p for p in method.modules.parameters() if p.ndim == 4).mul_(1.5)
    assert score() != first  # it does score the weights
    assert validation_seed(0, 0) != validation_seed(0, 1) and validation_seed(1, 0) == validation_seed(1, 0)


def _gloo_worker(rank: int, port: int, store: str, valid: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        config = _config("mim")
        torch.manual_seed(0)
        method = build_method(config)
        loader, _ = build_valid_loader(store, valid, config, rank, 2, read=ReadOptions(progress=False))
        kwargs = {"seed": 0, "rank": rank, "steps": None, "amp_dtype": None}
        local = validation_loss(method, method.modules, loader, torch.device("cpu"), world_size=1, **kwargs)
        reduced = validation_loss(method, method.modules, loader, torch.device("cpu"), world_size=2, **kwargs)
        torch.save({"local": local, "reduced": reduced, "batches": len(loader)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_validation_loss_is_the_mean_over_all_ranks(data, tmp_path):
    port = free_port()
    mp.spawn(_gloo_worker, args=(port, data["store"], data["valid"], str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"]  # so the mean of rank means is the mean of batches
    assert ranks[0]["local"] != ranks[1]["local"]  # each rank scored its own share
    assert ranks[0]["reduced"] == ranks[1]["reduced"]
    assert ranks[0]["reduced"] == pytest.approx((ranks[0]["local"] + ranks[1]["local"]) / 2, rel=1e-12)


def test_skip_reasons_and_dino_has_no_validation_loop():
    assert skip_reason(_config(), ["a"]) is None
    assert "no validation subjects" in skip_reason(_config(), None)
    assert "no validation subjects" in skip_reason(_config(), [])
    assert "valid_batch_size is null" in skip_reason(_config(valid_batch_size=None), ["a"])
    dino = PretrainConfig.model_validate({"method": "dino"})
    assert dino.best_metric == "train_loss" and not dino.validates and "DINO" in skip_reason(dino, ["a"])
    with pytest.raises(ValueError, match="valid_batch_size: DINO has no validation loop"):
        PretrainConfig.model_validate({"method": "dino", "valid_batch_size": 64})


def _pretrain(data: dict[str, object], output: Path, config: PretrainConfig, valid: list[str] | None) -> dict:
    return pretrain_worker({"store": data["store"], "subjects": data["train"], "valid_subjects": valid,
                            "config": config.model_dump(mode="json"), "runtime": {}, "run_name": output.name,
                            "output": str(output), "dataset_hash": "h", "tracker": None})


def test_deterministic_pretraining_twice_is_bit_identical_with_a_best_checkpoint(
    data, tmp_path, one_torch_thread, restore_determinism
):
    config = _config(deterministic=True)
    runs = [_pretrain(data, tmp_path / f"run{i}", config, data["valid"]) for i in range(2)]
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    manifests = [read_manifest(tmp_path / f"run{i}") for i in range(2)]
    assert manifests[0].sha256 == manifests[1].sha256  # last and best weights, bit for bit
    assert set(manifests[0].sha256) == {"encoder.pt", "encoder_best.pt"}
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    valid = [[e["valid_loss"] for e in read_events(tmp_path / f"run{i}") if e["event"] == "epoch"] for i in range(2)]
    assert valid[0] == valid[1] and len(valid[0]) == 2
    best = manifests[0].best
    assert best is not None and best.metric == "valid_loss" and best.files == {"encoder": "encoder_best.pt"}
    assert best.loss == min(valid[0]) and best.epoch == valid[0].index(min(valid[0]))
    assert runs[0]["best"] == best.model_dump() and runs[0]["validation_skipped"] is None
    last, best_weights = (load_weights(tmp_path / "run0" / name) for name in ("encoder.pt", "encoder_best.pt"))
    same = all(torch.equal(last[k], best_weights[k]) for k in last)
    assert same == (best.epoch == 1)  # the best file holds the best epoch's weights, not the last ones


def test_without_validation_subjects_there_is_no_best_checkpoint_but_dino_selects_by_training_loss(
    data, tmp_path, one_torch_thread
):
    out = _pretrain(data, tmp_path / "simclr", _config(epochs=1), None)
    assert out["best"] is None and "no validation subjects" in out["validation_skipped"]
    assert read_manifest(tmp_path / "simclr").best is None and not (tmp_path / "simclr" / "encoder_best.pt").exists()
    assert [e["valid_loss"] for e in read_events(tmp_path / "simclr") if e["event"] == "epoch"] == [None]

    dino = PretrainConfig.model_validate({
        "method": {"name": "dino", "out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "n_local_crops": 0},
        "epochs": 2, "batch_size": 8, "steps_per_epoch": 2, "image_size": IMAGE, "model_width": 4,
    })
    out = _pretrain(data, tmp_path / "dino", dino, data["valid"])
    losses = [e["loss"] for e in read_events(tmp_path / "dino") if e["event"] == "epoch"]
    best = read_manifest(tmp_path / "dino").best
    assert best is not None and best.metric == "train_loss" and best.loss == min(losses)
    assert "DINO" in out["validation_skipped"]
