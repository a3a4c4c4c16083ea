"""The study's MLflow layout on a real sqlite backend: experiment kind, one tag namespace, legacy migration."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.study_tracking import (
    COMPLETION_METRIC,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    KIND_CELL,
    KIND_TAG,
    cell_run,
    existing_cell_run,
    find_runs,
    grid_parent_run,
    namespaced,
    open_study,
    repair_arm_tags,
    run_is_complete,
    run_tag,
    study_pages,
)


def test_namespaced_prefixes_plain_names_only() -> None:
    assert namespaced({"method": "simclr", "sspctl.kind": "cell", "mlflow.parentRunId": "p", "seed": 0}) == {
        "sspctl.method": "simclr", "sspctl.kind": "cell", "mlflow.parentRunId": "p", "sspctl.seed": "0"}


def test_new_study_is_a_model_training_experiment_with_sspctl_tags_only(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = open_study(uri, "s1", artifact_root=str(tmp_path / "art"))
    assert study.client.get_experiment(study.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parent = grid_parent_run(study, "g1", tags={"dataset_hash": "abc", "split": "/s.yaml"})
    run_id = cell_run(study, "ft-scratch-b2-s0-00000000", parent, tags={"method": "scratch", "budget": "2", "seed": "0"})
    run = study.client.get_run(run_id)
    user_tags = {k for k in run.data.tags if not k.startswith("mlflow.")}
    assert user_tags == {"sspctl.kind", "sspctl.key", "sspctl.method", "sspctl.budget", "sspctl.seed"}
    assert run.data.tags["mlflow.parentRunId"] == parent and run_tag(run, "method") == "scratch"
    assert existing_cell_run(study, "ft-scratch-b2-s0-00000000") == run_id
    assert existing_cell_run(study, "ft-scratch-b2-s0-ffffffff") is None
    assert study_pages(uri, "http://127.0.0.1:5000/") == [
        ("s1", f"http://127.0.0.1:5000/#/experiments/{study.experiment_id}?workflowType=machine_learning")]


def test_a_study_written_before_the_namespace_is_migrated_and_still_resumes(tmp_path: Path) -> None:
    """Runs tagged ``sspctl_kind``/``method``/... by an older sspctl are found, complete, after migration."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("old")
    parent = client.create_run(experiment_id, run_name="grid-g1", tags={"sspctl_kind": "grid", "sspctl_key": "g1",
                                                                       "dataset_hash": "abc"}).info.run_id
    legacy = {"sspctl_kind": "cell", "sspctl_key": "ft-scratch-b2-s0-12345678", "mlflow.parentRunId": parent,
              "method": "scratch", "budget": "2", "seed": "0", "dataset_hash": "abc", "pretrain_run_id": ""}
    cell = client.create_run(experiment_id, run_name="ft-scratch-b2-s0-12345678", tags=legacy).info.run_id
    client.log_metric(cell, COMPLETION_METRIC, 0.8)
    client.set_terminated(cell, "FINISHED")

    study = open_study(uri, "old")
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    run = client.get_run(cell)
    assert not {"sspctl_kind", "sspctl_key", "method", "budget", "seed", "dataset_hash"} & set(run.data.tags)
    assert run.data.tags["sspctl.method"] == "scratch" and run.data.tags["sspctl.key"] == "ft-scratch-b2-s0-12345678"
    assert run.data.tags["mlflow.parentRunId"] == parent  # MLflow's own tags are left alone
    # resume: the cell is found by its key and is still complete; re-attaching creates no duplicate
    assert existing_cell_run(study, "ft-scratch-b2-s0-12345678") == cell and run_is_complete(study, cell)
    assert cell_run(study, "ft-scratch-b2-s0-12345678", parent, tags={"method": "scratch"}) == cell
    assert grid_parent_run(study, "g1", tags={}) == parent
    assert [r.info.run_id for r in find_runs(study, {KIND_TAG: KIND_CELL})] == [cell]
    assert open_study(uri, "old").experiment_id == experiment_id  # a second open has nothing left to do


def test_cells_whose_worker_overwrote_the_arm_get_it_back_when_the_study_opens(tmp_path: Path) -> None:
    """A ``scratch-b`` (``mim-encdec``) cell tagged ``sspctl.method=scratch`` (``mim``) by its worker is an
    A/A run the report would merge into scratch: opening the study restores the arm from the cell's name."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = open_study(uri, "s")
    parent = grid_parent_run(study, "g1", tags={})
    names = {"ft-scratch-b-b4-s0-t1000-0123abcd": "scratch", "ft-mim-encdec-ball-s0-t2-89abcdef": "mim",
             "ft-scratch-b4-s0-t0-00000000": "scratch", "ft-simclr-b10-s1-ffffffff": "simclr"}
    ids = {name: cell_run(study, name, parent, tags={"method": tagged}) for name, tagged in names.items()}

    study = open_study(uri, "s")
    arms = {name: run_tag(study.client.get_run(run_id), "method") for name, run_id in ids.items()}
    assert arms == {"ft-scratch-b-b4-s0-t1000-0123abcd": "scratch-b", "ft-mim-encdec-ball-s0-t2-89abcdef": "mim-encdec",
                    "ft-scratch-b4-s0-t0-00000000": "scratch", "ft-simclr-b10-s1-ffffffff": "simclr"}
    assert repair_arm_tags(study) == 0  # done once
