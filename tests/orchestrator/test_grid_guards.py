"""What a grid checks before any cell starts: every split id against the store, and its run lock."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.grid import plan_grid
from orchestrator.grid_spec import grid_request
from orchestrator.run_lock import RunLock, grid_lock_path
from orchestrator.workspace import Workspace

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An 8-subject 32-px phantom store and a split with budget 2 of seed 0."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.splits import make_splits
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    root = tmp_path_factory.mktemp("guards")
    write_dataset(root / "raw", "mnms", n_subjects=8, seed=0, size=SIZE, frames=(3, 3), slices=(3, 3), trivial=True)
    store = root / "store.zarr"
    execute_ingest(plan_ingest({"mnms": root / "raw"}, store, IngestConfig(size=SIZE)), executor="serial", progress=False)
    split = make_splits(SliceStore.open(store).subjects, test_per_vendor=1, seed=0, budgets=(2,), seeds=(0,))
    split.save(root / "split.yaml")
    return {"store": store, "split": root / "split.yaml", "root": root}


def _finetune(data: dict, split: Path, ws: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["finetune", "--store", str(data["store"]), "--split", str(split),
                                      "--budgets", "2,all", "--seeds", "0", "--epochs", "1", "--output", str(ws),
                                      "--study", "guards", *extra])
    return result.exit_code, result.output


def test_unknown_split_subject_stops_the_grid_before_any_cell(data: dict, tmp_path: Path) -> None:
    content = yaml.safe_load(data["split"].read_text())
    content["train"]["mm1"].append("NOPE99")
    budget = content["budgets"][0][2] if 0 in content["budgets"] else content["budgets"]["0"]["2"]
    budget["mm1"][-1] = "NOPE99"  # a budget cell that would fail only when it runs
    bad = tmp_path / "bad-split.yaml"
    bad.write_text(yaml.safe_dump(content))
    ws = tmp_path / "ws"
    code, out = _finetune(data, bad, ws)
    assert code == 1, out
    assert out.strip().splitlines() == [f"error: {bad}: 1 subject id(s) not in store {data['store']}: train.mm1: NOPE99"]
    assert not ws.exists(), "no cell folder, no MLflow run: nothing started"


def test_overlapping_split_error_names_the_file_once(data: dict, tmp_path: Path) -> None:
    content = yaml.safe_load(data["split"].read_text())
    content["test"]["mm1"].append(content["train"]["mm1"][0])
    bad = tmp_path / "overlap.yaml"
    bad.write_text(yaml.safe_dump(content))
    code, out = _finetune(data, bad, tmp_path / "ws")
    assert code == 1 and "is in both" in out, out
    assert out.count(str(bad)) == 1, out


def test_the_same_grid_twice_exits_2_naming_the_holder(data: dict, tmp_path: Path) -> None:
    ws = Workspace.resolve(tmp_path / "ws")
    plan = plan_grid(grid_request(data["store"], data["split"], budgets=[2, "all"], seeds=[0], config={"epochs": 1},
                                  study="guards", workspace=ws))
    holder = RunLock(grid_lock_path(ws.root, plan.study, plan.grid_id), "held by the test")
    holder.acquire()  # a second lock object is refused like another process
    try:
        code, out = _finetune(data, data["split"], ws.root)
    finally:
        holder.release()
    assert code == 2, out
    assert out.strip().splitlines()[-1].startswith(
        f"error: grid {plan.grid_id} of study guards is already running as pid {__import__('os').getpid()} "
        f"on {socket.gethostname()}"
    ), out
    assert not list((ws.root / "finetune" / "guards").glob("ft-*")), "no cell started"


def test_a_cell_running_elsewhere_is_refused_and_its_run_left_alone(tmp_path: Path) -> None:
    """Two grids sharing a cell: the second trial fails naming the holder, without marking the run FAILED."""
    from mlflow.tracking import MlflowClient

    from orchestrator.grid import _cell_trainable
    from orchestrator.grid_spec import CellJob, CellTrial
    from orchestrator.run_lock import RUN_LOCK_NAME, RunLockedError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("cells")).info.run_id
    output = tmp_path / "ft-scratch-b2-s0-abcd"
    cell = CellTrial(name=output.name, method="scratch", budget=2, seed=0, train_seed=0, run_id=run_id,
                     tracking_uri=uri, study="cells", experiment_id="1", parent_run_id="p",
                     storage_path=str(tmp_path / "ray"), workers=1, max_failures=0,
                     job=CellJob(store="s.zarr", split="s.yaml", output=str(output), config={"epochs": 1}))
    holder = RunLock(output / RUN_LOCK_NAME, "the other grid")
    holder.acquire()
    try:
        with pytest.raises(RunLockedError, match=f"grid cell {output.name} is already running as pid "):
            _cell_trainable({"cell": cell.model_dump(mode="json")}, worker_fn=lambda job: None)
    finally:
        holder.release()
    assert client.get_run(run_id).info.status == "RUNNING"


def test_runs_per_budget_takes_the_first_training_seeds_and_is_checked() -> None:
    from orchestrator.grid_spec import GridAxes

    axes = GridAxes.model_validate(yaml.safe_load("budgets: [1, 4, all]\ntrain_seeds: [6, 7, 8, 9, 10, 11]\n"
                                                  "runs_per_budget: {1: 6, 4: 3, all: 1}\n"))
    assert [axes.train_seeds_for(b) for b in (1, 4, "all")] == [(6, 7, 8, 9, 10, 11), (6, 7, 8), (6,)]
    assert GridAxes.model_validate(axes.model_dump(mode="json")) == axes  # JSON's string keys come back as budgets
    assert GridAxes(budgets=(2,), train_seeds=(0, 1)).train_seeds_for(2) == (0, 1)  # not named: every seed
    for bad, message in (({7: 1}, "budget 7 is not one of the budgets"), ({4: 7}, "7 run(s) at budget 4; expected 1 to 6"),
                         ({4: 0}, "0 run(s) at budget 4")):
        with pytest.raises(ValueError, match=re.escape(message)):
            GridAxes(budgets=(1, 4, "all"), train_seeds=(6, 7, 8, 9, 10, 11), runs_per_budget=bad)
