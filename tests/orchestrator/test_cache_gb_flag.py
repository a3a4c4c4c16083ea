"""``--cache-gb`` (pretrain, finetune) and the study's ``read`` sections: checked at the door, carried intact.

The budget's effect in the workers is tested in ``tests/trainers/test_loader_budget_worker.py``; a
whole ``sspctl pretrain --cache-gb`` run in ``tests/orchestrator/test_pretrain_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from datastore.loader_options import ReadOptions
from orchestrator.cli import app


@pytest.mark.parametrize("command", [["pretrain", "--method", "simclr"], ["finetune", "--split", "split.yaml"]])
@pytest.mark.parametrize("value", ["0", "-1.5", "inf"])
def test_a_budget_that_is_not_positive_exits_2_with_one_line(command: list[str], value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [*command, "--store", str(tmp_path / "store.zarr"), "--cache-gb", value,
                                      "--output", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: --cache-gb: the loader memory budget must be a positive number of GB, got {float(value):g}"]
    assert not (tmp_path / "ws").exists()


def test_the_help_explains_the_budget() -> None:
    for command in ("pretrain", "finetune"):
        out = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert "--cache-gb" in out and "half of the node's memory" in " ".join(out.replace("│", " ").split())


def test_the_grid_carries_the_read_options_into_every_cell_job(cell_data: dict[str, Path], tmp_path: Path) -> None:
    from orchestrator.grid import plan_grid
    from orchestrator.grid_spec import grid_request
    from orchestrator.workspace import Workspace
    from trainers.jobs import FinetuneJob

    read = ReadOptions(cache_gb=2.5)
    workspace = Workspace.resolve(tmp_path / "ws", create=True)
    plan = plan_grid(grid_request(cell_data["store"], cell_data["split"], budgets=[2], seeds=[0], config={"epochs": 1},
                                  study="budget", workspace=workspace, read=read))
    assert plan.pending and all(trial.job.read == read for trial in plan.pending)
    trial = plan.pending[0]
    assert FinetuneJob.model_validate(type(trial).model_validate_json(trial.model_dump_json()).job.model_dump()).read == read


def test_the_study_config_takes_read_sections_and_names_a_bad_key(tmp_path: Path) -> None:
    from orchestrator.configio import ConfigError, load_config
    from orchestrator.study import StudyConfig

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "store": "s.zarr", "pretrain": {"read": {"cache_gb": 8}},
                                    "finetune": {"read": {"cache_gb": 2}}}))
    study = load_config(StudyConfig, path)
    assert study.pretrain.read == ReadOptions(cache_gb=8) and study.finetune.read == ReadOptions(cache_gb=2)
    path.write_text(yaml.safe_dump({"name": "s", "store": "s.zarr", "finetune": {"read": {"cache_gb": 0}}}))
    with pytest.raises(ConfigError, match=r"finetune\.read\.cache_gb") as error:
        load_config(StudyConfig, path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
