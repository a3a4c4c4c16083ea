"""End to end: synth -> ingest -> real Zarr store -> ``sspctl pretrain`` on a real local Ray, real sqlite MLflow.

Ray ``fit()`` is the expensive part (about 20 s each here), so the suite runs five: the four methods
with one worker, and one two-worker run that is killed once and resumes; all pretrain on a split's
train subjects and validate on its valid subjects. The remaining checks
(rerun of a finished run, bad input, a dead tracking server in the worker) need no ``fit()``.
"""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.ui import free_port
from trainers.models.unet import UNet2d
from trainers.pretrain import pretrain_worker
from trainers.pretrain_outputs import FAULT_MARKER, parse_fault, read_events
from trainers.runtime import LoopError, augmentation_seed, per_rank_batch
from trainers.weights import load_pretrained, read_manifest

pytestmark = pytest.mark.slow

IMAGE = 32
#: Mild augmentation so that 2 short epochs reliably lower a contrastive loss on 6 phantom subjects.
MILD = {"rotation_deg": 10.0, "scale_range": [0.9, 1.1], "translate_fraction": 0.05, "flip_p": 0.0, "noise_p": 0.0,
        "smooth_p": 0.0, "scale_intensity_p": 0.0, "shift_p": 0.0, "gamma_p": 0.0}
WIDTH = 8  # U-Net channels 8..64 at 32 px: fast on 2 cores
CONFIGS = {
    "simclr": {"method": {"name": "simclr", "augment": MILD}, "optimizer": {"lr": 0.03}},
    "pcl": {"method": {"name": "pcl", "augment": MILD}, "optimizer": {"lr": 0.03}},
    "dino": {"method": {"name": "dino", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2}},
    "mim": {"method": {"name": "mim", "augment": MILD}},
}
for _name, _config in CONFIGS.items():
    _config["model_width"] = WIDTH
    if _name != "dino":  # DINO has no validation loop (published)
        _config["valid_batch_size"] = 8
COMMON = ["--epochs", "2", "--batch-size", "8", "--steps-per-epoch", "5", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """6 phantom M&Ms subjects, 3 frames x 4-5 slices, ingested at 32 px: about 80 slices."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.synth import write_dataset

    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "raw", "mnms", n_subjects=6, seed=0, size=64, frames=(3, 3), slices=(4, 5), trivial=True)
    plan = plan_ingest({"mnms": root / "raw"}, str(root / "store.zarr"), IngestConfig(size=IMAGE, spacing=4.0, chunk_slices=16))
    execute_ingest(plan, executor="serial", progress=False)
    return str(root / "store.zarr")


@pytest.fixture(scope="module")
def split(store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train and 2 validation subjects of the store (no test subjects: pretraining never reads them)."""
    from datastore.store import SliceStore

    ids = [str(s) for s in SliceStore.open(store).subjects["subject_id"]]
    path = tmp_path_factory.mktemp("split") / "split.yaml"
    path.write_text(yaml.safe_dump({"train": {"mm1": ids[:4]}, "valid": {"mm1": ids[4:]}, "test": {"mm1": []}}))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """One private local Ray for the module (``sspctl`` reuses an initialised Ray)."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MLFLOW_TRACKING_URI", "SSPCTL_HOME", "SSPCTL_FAULT_INJECT", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    return monkeypatch


def _config_file(tmp: Path, method: str) -> Path:
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(CONFIGS[method]))
    return path


def _pretrain(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["pretrain", *args])
    return result.exit_code, result.output


def _run_dir(workspace: Path) -> Path:
    (run_dir,) = [p for p in (workspace / "pretrain").iterdir() if p.is_dir()]
    return run_dir


def _fixed_batch_losses(ray_run: Path, store: str) -> tuple[float, float]:
    """Loss of one fixed, identically augmented batch under the initial and the last-checkpoint weights."""
    from datastore.loader import Shard, SliceLoader
    from trainers.checkpoint import load_checkpoint
    from trainers.methods.config import PretrainConfig
    from trainers.pretrain import build_method

    state = load_checkpoint(max(ray_run.glob("epoch_*")))
    config = PretrainConfig.model_validate(state.config)
    torch.manual_seed(config.seed)  # what the loop does before building the method
    initial = build_method(config)
    trained = build_method(config)
    trained.modules.load_state_dict(state.model)
    batch = next(iter(SliceLoader(store, None, labelled_only=False, batch_size=32, shard=Shard(seed=123))))

    def loss(method: object) -> float:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return float(method.training_step(batch, method.modules, epoch=0, step=0, generator=generator)["loss"])

    return loss(initial), loss(trained)


def test_four_methods_train_log_and_export_then_rerun_is_skipped(store, split, ray_cluster, clean_env, tmp_path):
    from mlflow.tracking import MlflowClient

    for method in ("simclr", "pcl", "dino", "mim"):
        ws = tmp_path / method
        code, out = _pretrain("--method", method, "--store", store, "--config", str(_config_file(tmp_path, method)),
                              "--output", str(ws), "--split", str(split), *COMMON)
        assert code == 0, out
        run_dir = _run_dir(ws)
        manifest = read_manifest(run_dir)
        assert manifest.method == method and manifest.epochs == 2 and manifest.image_size == IMAGE
        assert manifest.run_name == run_dir.name and manifest.dataset_hash and manifest.model_width == WIDTH
        expected_parts = {"encoder", "encoder_decoder"} if method == "mim" else {"encoder"}
        assert set(manifest.files) == expected_parts
        for part in expected_parts:  # the fine-tuning U-Net takes every exported part strictly, last and best
            for checkpoint in ("last", "best"):
                report = load_pretrained(UNet2d(IMAGE, 4, width=WIDTH), run_dir, part, checkpoint)  # type: ignore[arg-type]
                assert report.matched and not report.missing
        assert manifest.best is not None and manifest.best.files == {p: f"{p}_best.pt" for p in expected_parts}
        assert set(manifest.sha256) == {*manifest.files.values(), *manifest.best.files.values()}

        client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
        run = client.get_run(manifest.mlflow_run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["method.name"] == method and run.data.params["batch_size"] == "8"
        assert run.data.params["world_size"] == "1"
        losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
        assert len(losses) == 2 and all(map(math.isfinite, losses)), (method, losses)
        if method != "pcl":
            assert losses[1] < losses[0], (method, losses)
        else:
            # PCL's epoch loss on 5 batches of 8 phantom slices is dominated by which slice positions
            # share a batch (positives span subjects), so compare on one fixed batch instead: the
            # trained network (last checkpoint) against its own initial weights.
            initial, trained = _fixed_batch_losses(ws / "ray" / run_dir.name, store)
            assert trained < initial, (method, initial, trained)
        for name in ("lr", "slices_per_s", "epoch_time_s"):
            assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
        assert not [k for k in run.data.metrics if k.startswith("system/")], "system metrics are opt-in"
        valid = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "valid_loss"), key=lambda m: m.step)]
        if method == "dino":  # no validation loop: the best epoch is the lowest training loss
            assert valid == [] and "DINO has no validation loop" in out
            assert manifest.best.metric == "train_loss" and manifest.best.loss == pytest.approx(min(losses))
        else:
            assert len(valid) == 2 and all(map(math.isfinite, valid)) and "validation: 2 subjects" in out
            assert manifest.best.metric == "valid_loss" and manifest.best.loss == pytest.approx(min(valid))
            assert manifest.best.epoch == valid.index(min(valid))
        assert f"best checkpoint: epoch {manifest.best.epoch + 1}" in out
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
        assert {f"weights/{f}" for f in manifest.sha256} | {"weights/manifest.json"} <= artifacts
        if method == "mim":
            assert client.list_artifacts(run.info.run_id, "reconstructions"), "MIM logs a reconstruction PNG"

    # Rerunning a finished command does not train again (no Ray run, no new events) and says where it is.
    events_before = read_events(run_dir)
    started = time.monotonic()
    code, out = _pretrain("--method", "mim", "--store", store, "--config", str(_config_file(tmp_path, "mim")),
                          "--output", str(tmp_path / "mim"), "--split", str(split), *COMMON)
    assert code == 0, out
    assert "already finished" in out and str(run_dir) in out
    assert read_events(run_dir) == events_before
    assert time.monotonic() - started < 15


def test_relative_paths_a_second_command_and_a_stale_run_lock(store, ray_cluster, clean_env, tmp_path):
    """A relative --store used to fail in the Ray workers; the same command twice used to retrain into one folder."""
    import os
    import subprocess
    import sys

    from orchestrator.run_lock import RUN_LOCK_NAME

    work = tmp_path / "cwd"
    work.mkdir()
    _config_file(work, "mim")
    clean_env.chdir(work)
    args = ["--method", "mim", "--store", os.path.relpath(store, work), "--config", "mim.yaml", "--output", "ws",
            "--cache-gb", "1", *COMMON]
    code, out = _pretrain(*args)
    assert code == 0, out
    run_dir = _run_dir(work / "ws")
    assert read_manifest(run_dir).epochs == 2
    # --cache-gb reached the worker's loader, which said (through the driver) that its share fits
    (line,) = [line for line in out.splitlines() if line.startswith("loader: ")]
    assert line.startswith("loader: cache: this rank's ") and line.endswith(" <= budget 1 GB (cache_gb given)"), out

    script = ("import sys; from pathlib import Path; from orchestrator.run_lock import RunLock; "
              "lock = RunLock(Path(sys.argv[1]), 'x'); lock.acquire(); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script, str(run_dir / RUN_LOCK_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, out = _pretrain(*args)
        assert code == 2, out
        assert out.strip().splitlines()[-1].startswith(f"error: pretraining run {run_dir.name} is already running as "
                                                       f"pid {holder.pid} on {socket.gethostname()}"), out
    finally:
        holder.kill()  # SIGKILL: the lock file stays, nobody holds it
        holder.wait(timeout=60)
    assert (run_dir / RUN_LOCK_NAME).is_file()
    code, out = _pretrain(*args)
    assert code == 0 and "already finished" in out, out
    assert out.count(f"taking over the lock left by pid {holder.pid}") == 1, out
    assert not (run_dir / RUN_LOCK_NAME).exists()


def test_two_workers_killed_worker_resumes_from_checkpoint_with_dead_tracking_server(
    store, split, ray_cluster, clean_env, tmp_path
):
    from trainers.checkpoint import load_checkpoint

    clean_env.setenv("SSPCTL_FAULT_INJECT", "epoch=1,rank=1")
    clean_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    ws = tmp_path / "ws"
    code, out = _pretrain("--method", "simclr", "--store", store, "--config", str(_config_file(tmp_path, "simclr")),
                          "--output", str(ws), "--workers", "2", "--max-failures", "1", "--split", str(split), *COMMON)
    assert code == 0, out
    run_dir = _run_dir(ws)
    assert (run_dir / FAULT_MARKER).exists()
    events = [(e["event"], e["epoch"]) for e in read_events(run_dir)]
    assert events[0] == ("start", 0)
    assert ("fault_injected", 1) in events
    # The replacement worker group resumed after the epoch-0 checkpoint, not from scratch.
    assert events[events.index(("fault_injected", 1)) + 1] == ("resume", 1)
    assert [e for e in events if e[0] == "epoch"] == [("epoch", 0), ("epoch", 1)]
    assert events[-1][0] == "done"
    manifest = read_manifest(run_dir)
    assert manifest.mlflow_run_id is None  # the tracking server was down: trained untracked
    assert json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])["world_size"] == 2
    checkpoints = sorted(p.name for p in (ws / "ray" / run_dir.name).glob("epoch_*"))
    assert checkpoints == ["epoch_0000", "epoch_0001"]
    # The best-so-far epoch travelled through the checkpoint: the resumed attempt chose over both epochs,
    # the one scored before the kill included.
    valid = [e["valid_loss"] for e in read_events(run_dir) if e["event"] == "epoch"]
    assert len(valid) == 2 and all(map(math.isfinite, valid))
    first = load_checkpoint(ws / "ray" / run_dir.name / "epoch_0000").best
    assert first is not None and (first["epoch"], first["loss"]) == (0, valid[0])
    assert set(first["weights"]) == {"encoder"}
    assert manifest.best is not None and manifest.best.loss == min(valid) and manifest.best.epoch == valid.index(min(valid))


def test_worker_survives_dead_tracking_server_outside_ray(store, tmp_path):
    """Rank 0 logging through ``MlflowTracker`` to a dead server: warnings, and the run still finishes."""
    from orchestrator.tracking import MlflowTracker

    tracker = MlflowTracker(f"http://127.0.0.1:{free_port()}", "0" * 32, retry_after_s=0.0)
    config = {"method": {"name": "simclr", "augment": MILD}, "epochs": 1, "batch_size": 4, "steps_per_epoch": 2,
              "image_size": IMAGE, "optimizer": {"lr": 0.03}, "model_width": WIDTH}
    out = pretrain_worker({"store": store, "subjects": None, "config": config, "runtime": {}, "run_name": "dead",
                           "output": str(tmp_path), "dataset_hash": "h", "tracker": tracker})
    assert out["files"] == {"encoder": "encoder.pt"} and torch.isfinite(torch.tensor(out["final_loss"]))
    assert read_manifest(tmp_path).final_loss == pytest.approx(out["final_loss"])


def test_bad_input_is_one_line_and_non_zero(store, split, clean_env, tmp_path):
    code, out = _pretrain("--method", "simclr", "--store", store, "--workers", "3", "--batch-size", "8", "--output", str(tmp_path))
    assert code != 0 and "not divisible by 3 workers" in out and len(out.strip().splitlines()) == 1
    # the validation batch (paper: 224) must split over the workers too, once there are validation subjects
    code, out = _pretrain("--method", "simclr", "--store", store, "--workers", "3", "--batch-size", "9",
                          "--split", str(split), "--output", str(tmp_path))
    assert code != 0 and "valid_batch_size: the global batch 224 is not divisible by 3" in out
    assert len(out.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: simclr}\nepochz: 3\n")
    code, out = _pretrain("--method", "simclr", "--store", store, "--config", str(bad), "--output", str(tmp_path))
    assert code != 0 and "epochz: unknown key" in out and str(bad) in out
    bad.write_text("method: {name: dino}\n")
    code, out = _pretrain("--method", "simclr", "--store", store, "--config", str(bad), "--output", str(tmp_path))
    assert code != 0 and "--method is 'simclr'" in out
    code, out = _pretrain("--method", "mim", "--store", str(tmp_path / "nope.zarr"), "--output", str(tmp_path))
    assert code != 0 and "nope.zarr" in out and "not found" in out
    split = tmp_path / "split.yaml"
    split.write_text("train: {mm1: [NOPE01]}\nvalid: {mm1: []}\ntest: {mm1: []}\n")
    code, out = _pretrain("--method", "simclr", "--store", store, "--split", str(split), "--output", str(tmp_path))
    assert code != 0 and str(split) in out


def test_loop_helpers():
    assert per_rank_batch(224, 4) == 56
    with pytest.raises(LoopError, match="not divisible by 3"):
        per_rank_batch(224, 3)
    assert parse_fault("epoch=2, rank=1") == (2, 1, None) and parse_fault(None) is None
    assert parse_fault("step=7,rank=1") == (None, 1, 7)
    with pytest.raises(LoopError, match="SSPCTL_FAULT_INJECT"):
        parse_fault("when=2")
    seeds = {augmentation_seed(0, r, e) for r in range(4) for e in range(50)}
    assert len(seeds) == 200 and augmentation_seed(0, 1, 2) == augmentation_seed(0, 1, 2)


def test_split_holds_its_valid_subjects_out_of_pretraining(store, split):
    from datastore.store import SliceStore
    from orchestrator.pretrain_launch import pretrain_subjects

    ids = [str(s) for s in SliceStore.open(store).subjects["subject_id"]]
    chosen = pretrain_subjects(SliceStore.open(store), split)
    assert chosen.train == ids[:4] and chosen.valid == ids[4:]  # validated on, never pretrained on
    assert pretrain_subjects(SliceStore.open(store), None) == type(chosen)(train=None, valid=None)
