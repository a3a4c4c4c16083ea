"""The fine-tuning grid: unit checks, then one real 2 x 2 x 1 grid through Ray Tune + Train.

End to end: synthetic phantom -> ingest -> split -> a fabricated SimCLR run (a freshly initialised
UNet2d encoder saved per the weights contract) -> ``run_grid`` with the real
``trainers.finetune.finetune_worker`` (1 epoch, 1 step) on a private local Ray -> every cell in a
real sqlite MLflow with tags, curves, test Dice and artifacts -> rerun skips everything -> deleting
one completion marker makes exactly that cell run again, resuming from its final checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.commands.finetune import FlagError, parse_budgets, parse_pretrained, parse_seeds
from orchestrator.grid import (
    MARKER_NAME,
    GridError,
    GridSpec,
    _record_cell,
    execute_plan,
    max_concurrent_trials,
    plan_grid,
    resolve_pretrained,
    run_grid,
)
from orchestrator.grid_spec import CellJob, CellTrial, GridRequest, grid_request
from orchestrator.results import DiceTableError, dice_metrics
from orchestrator.study_tracking import PER_SUBJECT_ARTIFACT, open_study
from orchestrator.tracking import MlflowTracker
from orchestrator.ui import free_port
from orchestrator.workspace import Workspace

SIZE = 32
CONFIG = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "valid_batch_size": 8}


# -- unit checks (no Ray) ------------------------------------------------------------------------


def test_parsers_and_their_errors() -> None:
    assert parse_budgets("10, 15,all") == (10, 15, "all")
    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_pretrained("simclr=a, mim=/x/y") == {"simclr": "a", "mim": "/x/y"}
    for bad, match in (("10,x", "--budgets: 'x'"), ("0", "--budgets: 0 must be a positive"), ("", "--budgets: empty")):
        with pytest.raises(FlagError, match=match):
            parse_budgets(bad)
    with pytest.raises(FlagError, match="--seeds"):
        parse_seeds("a")
    with pytest.raises(FlagError, match="unknown SSP method 'moco'"):
        parse_pretrained("moco=r")
    with pytest.raises(FlagError, match="not METHOD=RUN"):
        parse_pretrained("simclr")


def test_max_concurrent_trials_from_resources() -> None:
    spec = GridSpec(methods=("scratch",), budgets=(10,), seeds=(0,), workers_per_trial=1, gpus_per_trial=0.25,
                    cpus_per_worker=2)
    # 16 CPUs / 2.01 per cell = 7; 1 GPU / 0.25 = 4 -> 4 cells share the GPU
    assert max_concurrent_trials(spec, {"CPU": 16, "GPU": 1}, n_cells=65) == 4
    assert max_concurrent_trials(spec, {"CPU": 16, "GPU": 8}, n_cells=65) == 7
    assert max_concurrent_trials(spec, {"CPU": 16, "GPU": 8}, n_cells=3) == 3
    cpu_only = GridSpec(methods=("scratch",), budgets=(10,), seeds=(0,), workers_per_trial=2)
    assert max_concurrent_trials(cpu_only, {"CPU": 3}, n_cells=4) == 1  # the 2-worker cell fits on num_cpus=3
    with pytest.raises(GridError, match="needs 2.01 CPUs"):
        max_concurrent_trials(cpu_only, {"CPU": 2}, n_cells=4)
    with pytest.raises(GridError, match="0.25 GPUs"):
        max_concurrent_trials(spec, {"CPU": 16}, n_cells=4)


def test_spec_always_includes_scratch_and_rejects_unknown_methods() -> None:
    assert GridSpec(methods=("mim", "simclr"), budgets=(10,), seeds=(0,)).methods == ("scratch", "simclr", "mim")
    with pytest.raises(ValueError, match="unknown method"):
        GridSpec(methods=("byol",), budgets=(10,), seeds=(0,))


def test_dice_metrics_closed_form() -> None:
    rows = [
        {"subject_id": "a", "phase": "ED", "class": "LV", "dice": 1.0},
        {"subject_id": "a", "phase": "ES", "class": "LV", "dice": 0.5},
        {"subject_id": "b", "phase": 1, "class": 2, "dice": 0.25},  # integer codes: ED, MYO
        {"subject_id": "b", "phase": "ES", "class": "MYO", "dice": 0.0},
    ]
    metrics = dice_metrics(rows)
    assert metrics["test_dice_LV_ED"] == 1.0 and metrics["test_dice_MYO_ED"] == 0.25
    assert metrics["test_dice_LV"] == 0.75 and metrics["test_dice_MYO"] == 0.125
    assert metrics["test_dice_ED"] == pytest.approx(0.625) and metrics["test_dice_ES"] == 0.25
    assert metrics["test_dice_mean"] == pytest.approx(1.75 / 4)
    with pytest.raises(DiceTableError, match="lacks columns"):
        dice_metrics([{"subject_id": "a", "dice": 1.0}])


def test_resolve_pretrained_errors(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    with pytest.raises(GridError, match="no manifest.json"):
        resolve_pretrained("simclr", "nope", ws)
    run = tmp_path / "pretrain" / "r1"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"method": "pcl"}))
    with pytest.raises(GridError, match="method is 'pcl', but it was given for 'simclr'"):
        resolve_pretrained("simclr", "r1", ws)
    assert resolve_pretrained("pcl", "r1", ws).path == run.resolve()
    (run / "manifest.json").write_text("{oops")
    with pytest.raises(GridError, match="unreadable manifest"):
        resolve_pretrained("pcl", str(run), ws)


def test_recording_survives_a_dead_tracking_server(tmp_path: Path) -> None:
    """Tracking that goes away at the end of a cell does not fail it: results land on disk."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    rows = [{"subject_id": "a", "phase": "ED", "class": c, "dice": d} for c, d in (("LV", 0.9), ("MYO", 0.6), ("RV", 0.3))]
    cell = CellTrial(name="ft-x", method="scratch", budget=2, seed=0, train_seed=0, run_id="0" * 32,
                     tracking_uri=uri, study="s", experiment_id="1", parent_run_id="p", storage_path=str(tmp_path),
                     job=CellJob(store="s.zarr", split="s.yaml", output=str(tmp_path / "ft-x"), config={"epochs": 3}))
    metrics = _record_cell(cell, rows, MlflowTracker(uri, "0" * 32, retry_after_s=0))
    assert metrics["test_dice_mean"] == pytest.approx(0.6)
    marker = json.loads((tmp_path / "ft-x" / MARKER_NAME).read_text())
    assert marker["metrics"]["test_dice_LV"] == pytest.approx(0.9)
    assert len(pd.read_csv(tmp_path / "ft-x" / PER_SUBJECT_ARTIFACT)) == 3


def test_cli_rejects_bad_flags_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "--store", str(tmp_path / "missing.zarr"), "--split", str(tmp_path / "s.yaml"),
                                 "--budgets", "10,lots", "--output", str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --budgets: 'lots' is neither a number of subjects nor 'all'"
    result = runner.invoke(app, ["finetune", "--store", str(tmp_path / "missing.zarr"), "--split", str(tmp_path / "s.yaml"),
                                 "--output", str(tmp_path / "ws")])
    assert result.exit_code == 2 and f"--store {tmp_path / 'missing.zarr'}: not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 10-subject 32-px phantom store, its split (budget 2, seed 0) and a fabricated SimCLR run."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.splits import make_splits
    from datastore.store import SliceStore
    from datastore.synth import write_dataset
    from trainers.models.unet import UNet2d
    from trainers.weights import WeightsManifest, save_weights, write_manifest

    root = tmp_path_factory.mktemp("grid")
    write_dataset(root / "raw", "mnms", n_subjects=10, seed=0, size=SIZE, frames=(3, 3), slices=(3, 4), trivial=True)
    store = root / "store.zarr"
    execute_ingest(plan_ingest({"mnms": root / "raw"}, store, IngestConfig(size=SIZE, chunk_slices=16)),
                   executor="serial", progress=False)
    opened = SliceStore.open(store)
    split = make_splits(opened.subjects, test_per_vendor=1, seed=0, budgets=(2,), seeds=(0,))
    split.save(root / "split.yaml")
    ws = Workspace.resolve(root / "ws")
    run = ws.root / "pretrain" / "simclr-tiny"
    run.mkdir(parents=True)
    encoder = {k: v for k, v in UNet2d(SIZE, 4).state_dict().items() if k.startswith("encoder.")}
    save_weights(encoder, run / "encoder.pt")
    write_manifest(run, WeightsManifest(method="simclr", run_name="simclr-tiny", config={}, dataset_hash=opened.hash,
                                        epochs=1, final_loss=0.0, image_size=SIZE, mlflow_run_id="pre123",
                                        files={"encoder": "encoder.pt"}))
    return {"store": store, "split": root / "split.yaml", "ws": ws, "hash": opened.hash,
            "test_subjects": split.subjects("test")}


def _grid_kwargs(dataset: dict) -> dict:
    return dict(store=dataset["store"], split=dataset["split"], budgets=[2, "all"], seeds=[0],
                pretrained={"simclr": "simclr-tiny"}, config=CONFIG, study="grid-test", workspace=dataset["ws"])


def _request(dataset: dict, **changes: object) -> GridRequest:
    return grid_request(**{**_grid_kwargs(dataset), **changes})


@pytest.fixture(scope="module")
def first_run(dataset: dict):
    return run_grid(_request(dataset), num_cpus=4, progress=False)


@pytest.mark.slow
def test_every_cell_lands_in_mlflow(first_run, dataset: dict) -> None:
    assert [c.status for c in first_run.cells] == ["done"] * 4, [c.error for c in first_run.cells]
    assert [(c.cell.method, c.cell.budget) for c in first_run.cells] == [
        ("scratch", 2), ("scratch", "all"), ("simclr", 2), ("simclr", "all")]
    study = open_study(dataset["ws"].tracking_uri, "grid-test", create=False)
    client = study.client
    assert client.get_run(first_run.parent_run_id).info.status == "FINISHED"
    for outcome in first_run.cells:
        run = client.get_run(outcome.run_id)
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and run.info.run_name == outcome.cell.name
        assert tags["mlflow.parentRunId"] == first_run.parent_run_id
        assert (tags["sspctl.method"], tags["sspctl.budget"], tags["sspctl.seed"]) == (
            outcome.cell.method, str(outcome.cell.budget), "0")
        assert tags["sspctl.dataset_hash"] == dataset["hash"]
        assert tags["sspctl.pretrain_run_id"] == ("pre123" if outcome.cell.method == "simclr" else "")
        assert not {"method", "budget", "seed", "dataset_hash", "init_weights_sha256", "sspctl_kind"} & set(tags)
        assert run.data.params["method"] == outcome.cell.method and run.data.params["epochs"] == "1"
        assert client.get_metric_history(outcome.run_id, "train_loss")  # training curve from the worker
        # the logged test Dice equals the mean of the logged per-subject table (recomputed here)
        local = client.download_artifacts(outcome.run_id, PER_SUBJECT_ARTIFACT, str(dataset["ws"].root / "dl" / outcome.cell.name))
        table = pd.read_csv(local)
        assert set(table.subject_id.astype(str)) == set(dataset["test_subjects"])
        assert len(table) == len(dataset["test_subjects"]) * 2 * 3
        assert metrics["test_dice_mean"] == pytest.approx(table.dice.mean())
        lv_ed = table[(table["class"] == "LV") & (table.phase == "ED")].dice.mean()
        assert metrics["test_dice_LV_ED"] == pytest.approx(lv_ed)
        artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "model")}
        artifacts |= {a.path for a in client.list_artifacts(outcome.run_id, "evaluation")}
        assert {"model/model.json", "evaluation/test_overlay.png"} <= artifacts
        assert [o.model_id for o in run.outputs.model_outputs], "the fine-tuned model is a logged MLflow model"
    assert np.isfinite([c.metrics["test_dice_mean"] for c in first_run.cells]).all()


@pytest.mark.slow
def test_rerun_skips_complete_cells_and_reruns_one_without_marker(first_run, dataset: dict) -> None:
    def must_not_run(job: object) -> None:
        raise AssertionError("a finished cell was run again")

    again = run_grid(_request(dataset), worker_fn=must_not_run, num_cpus=4, progress=False)
    assert [c.status for c in again.cells] == ["skipped"] * 4
    assert again.parent_run_id == first_run.parent_run_id
    assert [c.run_id for c in again.cells] == [c.run_id for c in first_run.cells]

    victim = first_run.cells[2]
    marker = dataset["ws"].root / "finetune" / "grid-test" / victim.cell.name / MARKER_NAME
    marker.unlink()
    plan = plan_grid(_request(dataset))
    assert [t.name for t in plan.pending] == [victim.cell.name]
    study = open_study(dataset["ws"].tracking_uri, "grid-test", create=False)
    curve_before = len(study.client.get_metric_history(victim.run_id, "train_loss"))
    first_info = study.client.get_run(victim.run_id).info
    rerun = execute_plan(plan, num_cpus=4, progress=False)
    assert [c.status for c in rerun.cells] == ["skipped", "skipped", "done", "skipped"]
    assert marker.is_file()
    # resumed from the cell's final checkpoint (same Train run name and storage): no epoch retrained
    assert len(study.client.get_metric_history(victim.run_id, "train_loss")) == curve_before
    assert rerun.cells[2].metrics["test_dice_mean"] == pytest.approx(first_run.cells[2].metrics["test_dice_mean"])
    resumed = study.client.get_run(victim.run_id).info
    assert resumed.status == "FINISHED"
    # the resumed run keeps its first start time; its end time is the rerun's
    assert resumed.start_time == first_info.start_time and resumed.end_time > first_info.end_time
    assert len(study.client.search_runs([study.experiment_id])) == 5  # 4 cells + 1 parent, no duplicates


def test_a_grid_that_fails_to_run_leaves_no_run_running(dataset: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    import orchestrator.grid as grid
    import orchestrator.ray_session
    from orchestrator.study_tracking import client_for

    def broken_tuner(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tune could not start")

    monkeypatch.setattr(grid, "_fit_tuner", broken_tuner)
    monkeypatch.setattr(orchestrator.ray_session, "ray_session", lambda **kw: contextlib.nullcontext())
    plan = grid.plan_grid(_request(dataset, study="grid-broken"))
    assert plan.pending and not any(t.run_id for t in plan.pending)  # no cell has started: no cell run yet
    # one cell whose run an earlier, killed attempt left RUNNING
    from orchestrator.study_tracking import cell_run, cell_runs

    stale = cell_run(plan.tracking, plan.pending[0].name, plan.parent_run_id, {"method": "scratch"})
    with pytest.raises(RuntimeError, match="tune could not start"):
        grid.execute_plan(plan, progress=False)
    client = client_for(dataset["ws"].tracking_uri)
    assert [r.info.run_id for r in cell_runs(plan.tracking)] == [stale]
    assert client.get_run(stale).info.status == "FAILED"
    assert client.get_run(plan.parent_run_id).info.status == "FAILED"


@pytest.mark.slow
def test_a_one_worker_cell_trains_in_its_trial_and_is_restarted_from_its_checkpoint(dataset: dict) -> None:
    """A cell of one fixed worker runs the worker function in its Tune trial's process (no TorchTrainer),
    keeps its checkpoints in ``<cell>/checkpoints/`` and, after its trial fails, Tune restarts it
    (``max_failures`` 1), resuming from the last checkpoint: no epoch is trained again."""
    from orchestrator.grid import DRIVER_RESOURCES, runs_in_trial, trial_resources
    from orchestrator.worker_range import WorkerRange

    assert runs_in_trial(WorkerRange(min=1, max=1))
    assert not runs_in_trial(WorkerRange(min=2, max=2)) and not runs_in_trial(WorkerRange(min=1, max=2))
    assert trial_resources(GridSpec(methods=("scratch",), gpus_per_trial=0.5)) == {"CPU": 1.0, "GPU": 0.5}
    assert trial_resources(GridSpec(methods=("scratch",), workers_per_trial=2)) == DRIVER_RESOURCES

    attempts = dataset["ws"].root / "attempts"
    attempts.mkdir()

    def crashes_once_after_training(job):
        import json as json_
        import os

        from trainers.finetune import finetune_worker

        result = finetune_worker(job)
        done = len(list(attempts.iterdir()))
        (attempts / f"{done}.json").write_text(json_.dumps({"pid": os.getpid(), "resumed_from": result["resumed_from"],
                                                            "checkpoint_dir": job.runtime.checkpoint_dir}))
        if done == 0:
            raise RuntimeError("trial lost after its last epoch")
        return result

    outcome = run_grid(_request(dataset, study="grid-in-trial", budgets=[2], pretrained={}, config={**CONFIG, "epochs": 2}),
                       worker_fn=crashes_once_after_training, num_cpus=2, progress=False)
    assert [c.status for c in outcome.cells] == ["done"], [c.error for c in outcome.cells]
    runs = [json.loads((attempts / f"{i}.json").read_text()) for i in range(2)]
    cell_dir = dataset["ws"].root / "finetune" / "grid-in-trial" / outcome.cells[0].cell.name
    assert [r["resumed_from"] for r in runs] == [None, 1]  # the restart trained no epoch again
    assert {r["checkpoint_dir"] for r in runs} == {str(cell_dir / "checkpoints")}
    assert sorted(p.name for p in (cell_dir / "checkpoints").iterdir()) == ["epoch_0000", "epoch_0001"]
    assert not (Path(dataset["ws"].storage_path) / outcome.cells[0].cell.name).exists()  # no Train run
    study = open_study(dataset["ws"].tracking_uri, "grid-in-trial", create=False)
    run = study.client.get_run(outcome.cells[0].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sspctl.world_size"] == "1"
    assert run.data.tags["sspctl.torch_threads"] == "1"  # the trial's 1 CPU, as a Train worker's
    assert len(study.client.get_metric_history(run.info.run_id, "train_loss")) == 2


# -- training seeds and control arms ---------------------------------------------------------------


def test_plan_has_training_replicates_and_the_negative_control(dataset: dict) -> None:
    """Subset seed x training seed cells; scratch-b differs from scratch only in its training seeds."""
    plan = plan_grid(_request(dataset, study="grid-replicates", methods=["scratch", "scratch-b", "simclr"],
                              train_seeds=[0, 1], runs_per_budget={"all": 1}))
    cells = [(c.method, c.budget, c.seed, c.train_seed) for c in plan.cells]
    assert cells == [
        ("scratch", 2, 0, 0), ("scratch", 2, 0, 1), ("scratch", "all", 0, 0),
        ("simclr", 2, 0, 0), ("simclr", 2, 0, 1), ("simclr", "all", 0, 0),
        ("scratch-b", 2, 0, 1000), ("scratch-b", 2, 0, 1001), ("scratch-b", "all", 0, 1000),
    ]
    by_key = {(c.method, c.budget, c.train_seed): c for c in plan.cells}
    scratch, control = by_key[("scratch", 2, 0)], by_key[("scratch-b", 2, 1000)]
    assert control.config["method"] == "scratch" and control.config["weights"] is None
    differing = {k for k in scratch.config if scratch.config[k] != control.config[k]}
    assert differing == {"train_seed"}
    assert scratch.name.startswith("ft-scratch-b2-s0-t0-") and control.name.startswith("ft-scratch-b-b2-s0-t1000-")
    assert len({c.name for c in plan.cells}) == len(plan.cells)
    client = plan.tracking.client
    # a cell's run is created when it starts, with the tags its trial carries
    from orchestrator.study_tracking import namespaced

    tags = namespaced(plan.pending[7].tags)
    assert (tags["sspctl.method"], tags["sspctl.subset_seed"], tags["sspctl.train_seed"], tags["sspctl.arm_role"]) == (
        "scratch-b", "0", "1001", "negative control")
    params = client.get_run(plan.parent_run_id).data.params
    assert params["train_seeds"] == "0,1" and params["runs_per_budget"] == "2=2,all=1"
    with pytest.raises(GridError, match="'mim-encdec' needs --pretrained mim=RUN"):
        plan_grid(_request(dataset, study="grid-replicates", methods=["mim-encdec"]))


@pytest.mark.slow
def test_positive_control_is_trained_on_the_training_pool_and_loaded(dataset: dict) -> None:
    """The supervised arm: a model trained on the split's train part, exported like a pretraining run.
    The A/A arm's finished run keeps its arm as ``sspctl.method`` (its worker initialises from scratch).
    The three one-worker cells, one at a time on 2 CPUs, run in the one trial process the first cell
    started (Tune's ``reuse_actors``; bit-identity with fresh processes: ``benchmarks/grid_cells.py``)."""
    import hashlib

    from datastore.splits import load_split
    from orchestrator.grid import reuses_trial_processes
    from trainers.weights import read_manifest

    assert reuses_trial_processes(GridSpec(methods=("scratch",)))
    assert not reuses_trial_processes(GridSpec(methods=("scratch",), workers_per_trial=2))
    pids = dataset["ws"].root / "pids"
    pids.mkdir()

    def records_its_process(job):
        import os

        from trainers.finetune import finetune_worker

        result = finetune_worker(job)
        (pids / f"{Path(job.output).name}.txt").write_text(str(os.getpid()))
        return result

    outcome = run_grid(_request(dataset, study="grid-controls", budgets=[2], pretrained={},
                                methods=["scratch", "scratch-b", "supervised"]),
                       worker_fn=records_its_process, num_cpus=2, progress=False)
    assert [c.status for c in outcome.cells] == ["done"] * 3, [c.error for c in outcome.cells]
    ran_in = {p.stem: p.read_text() for p in pids.iterdir()}
    assert sorted(ran_in) == sorted(c.cell.name for c in outcome.cells) and len(set(ran_in.values())) == 1, ran_in
    by_arm = {c.cell.method: c for c in outcome.cells}
    runs = list((dataset["ws"].root / "pretrain").glob("supervised-*"))
    assert len(runs) == 1
    manifest = read_manifest(runs[0])
    assert manifest.method == "supervised" and set(manifest.files) == {"encoder", "encoder_decoder"}
    assert manifest.config["budget"] == "all" and manifest.config["train_seed"] == 2000
    split = load_split(dataset["split"])
    model_meta = json.loads((runs[0] / "train" / "model.json").read_text())
    assert model_meta["split"] == str(dataset["split"].resolve())  # trained on this split's train part only
    assert not set(split.subjects("test")) & set(split.budget("all", 0))
    sha = hashlib.sha256((runs[0] / "encoder.pt").read_bytes()).hexdigest()
    study = open_study(dataset["ws"].tracking_uri, "grid-controls", create=False)
    control = study.client.get_run(by_arm["scratch-b"].run_id).data.tags
    assert (control["sspctl.method"], control["sspctl.init"], control["sspctl.arm_role"]) == (
        "scratch-b", "scratch", "negative control")
    tags = study.client.get_run(by_arm["supervised"].run_id).data.tags
    assert tags["sspctl.method"] == "supervised" and tags["sspctl.arm_role"] == "positive control"
    assert tags["sspctl.init_weights_sha256"] == sha and tags["sspctl.init_part"] == "encoder"
