"""Worker counts and elastic ranges: parsing, validation, Ray's ScalingConfig, the grid and the study config.

No Ray cluster: the flags are refused (or accepted) before Ray starts; ``_scaling`` needs no cluster
when the GPUs per worker are given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.grid_spec import GridAxes, GridError, grid_request
from orchestrator.pretrain_launch import PretrainRequest, _scaling, local_cluster_cpus
from orchestrator.worker_range import (
    WorkerRange, WorkerRangeError, check_failures, check_global_batch, parse_workers,
)
from orchestrator.workspace import Workspace


@pytest.mark.parametrize(("value", "low", "high"), [(2, 2, 2), ("2", 2, 2), ("1-2", 1, 2), (" 2 - 8 ", 2, 8)])
def test_parse_accepts_counts_and_ranges(value, low, high):
    workers = parse_workers(value, "--workers")
    assert (workers.min, workers.max) == (low, high)
    assert workers.elastic == (low != high)
    assert workers.num_workers == ((low, high) if low != high else low)
    assert WorkerRange.model_validate(workers.model_dump()) == workers  # dumps to N or "MIN-MAX" and back


@pytest.mark.parametrize(("value", "message"), [
    ("0", "greater than or equal to 1"), ("2-1", "MIN <= MAX"), ("1-", "expected N or MIN-MAX"),
    ("two", "expected N or MIN-MAX"), ("1-2-3", "expected N or MIN-MAX"), (True, "expected N or MIN-MAX"),
])
def test_parse_refuses_bad_values_in_one_line(value, message):
    with pytest.raises(WorkerRangeError) as info:
        parse_workers(value, "--workers")
    text = str(info.value)
    assert text.startswith("--workers: ") and message in text and "\n" not in text


def test_every_count_must_divide_the_global_batch():
    check_global_batch(parse_workers("1-2", "--workers"), 8, "--workers")
    check_global_batch(parse_workers("2-4", "--workers"), 24, "--workers")
    with pytest.raises(WorkerRangeError, match=r"--workers 1-4: batch_size: the global batch 8 is not divisible by 3 workers"):
        check_global_batch(parse_workers("1-4", "--workers"), 8, "--workers")
    with pytest.raises(WorkerRangeError, match="max-failures"):
        check_failures(parse_workers("1-2", "--workers"), 0, "--workers")
    check_failures(parse_workers("2", "--workers"), 0, "--workers")  # a fixed count keeps today's rule


def test_scaling_config_is_elastic_only_for_a_range(tmp_path: Path, monkeypatch):
    workspace = Workspace.resolve(tmp_path, create=False)
    fixed = PretrainRequest(method="simclr", store="s", workspace=workspace, workers=2, gpus_per_worker=0.0)
    assert _scaling(fixed).num_workers == 2
    elastic = PretrainRequest(method="simclr", store="s", workspace=workspace, workers="1-2", gpus_per_worker=0.0)
    monkeypatch.setenv("SSPCTL_RESIZE_INTERVAL_S", "5")
    scaling = _scaling(elastic)
    assert scaling.num_workers == (1, 2) and scaling.elastic_resize_monitor_interval_s == 5
    assert local_cluster_cpus(elastic) >= 3  # room for the maximum plus the controller


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_refuses_a_bad_range_before_anything_runs(tmp_path: Path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    code, out = _run("pretrain", "--method", "simclr", "--store", str(store), "--workers", "2-1",
                     "--output", str(tmp_path / "ws"))
    assert code == 2 and "--workers: MIN-MAX workers needs MIN <= MAX, got 2-1" in out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "ws").exists()
    code, out = _run("finetune", "--store", str(store), "--split", str(tmp_path / "s.yaml"),
                     "--workers-per-trial", "x", "--output", str(tmp_path / "ws"))
    assert code == 2 and "--workers-per-trial: expected N or MIN-MAX" in out and len(out.strip().splitlines()) == 1


def test_grid_axes_take_a_range_and_need_restarts(tmp_path: Path):
    axes = GridAxes(workers_per_trial="1-2")
    assert axes.workers_per_trial == WorkerRange(min=1, max=2)
    assert axes.model_dump(mode="json")["workers_per_trial"] == "1-2"
    assert GridAxes(workers_per_trial=2).model_dump(mode="json")["workers_per_trial"] == 2
    with pytest.raises(GridError, match="workers_per_trial 1-2 .elastic. needs max_failures >= 1"):
        grid_request("s", "p", workspace=Workspace.resolve(tmp_path, create=False), workers_per_trial="1-2",
                     max_failures=0)


def test_study_config_reads_ranges(tmp_path: Path):
    from orchestrator.study import FinetuneSection, PretrainSection

    assert PretrainSection.model_validate({"workers": "1-2"}).workers == WorkerRange(min=1, max=2)
    assert FinetuneSection.model_validate({"workers_per_trial": "2-4"}).workers_per_trial.num_workers == (2, 4)


def test_grid_refuses_an_elastic_range_that_does_not_divide_a_cells_batch():
    from orchestrator.grid import build_cells
    from orchestrator.grid_spec import GridSpec

    spec = GridSpec(methods=("scratch",), budgets=(10,), seeds=(0,), workers_per_trial="1-3")
    with pytest.raises(GridError, match=r"cell scratch/b10/s0/t0: workers_per_trial 1-3: batch_size: the global batch 4 "
                                        r"is not divisible by 3 workers"):
        build_cells(spec, {"batch_size": 4}, {}, "hash", "split")
    cells = build_cells(spec.model_copy(update={"workers_per_trial": WorkerRange(min=1, max=2)}),
                        {"batch_size": 4}, {}, "hash", "split")
    assert len(cells) == 1
