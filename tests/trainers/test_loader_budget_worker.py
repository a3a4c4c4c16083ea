"""The loader memory budget through the real workers: a rank caches or streams, says which once, and records it
(events.jsonl or model.json, MLflow tags ``sspctl.loader.*``; the job's ``read`` options as params).

Outside Ray a worker is rank 0 of 1 on this node (``trainers.runtime``); MLflow is a real sqlite backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datastore.loader_options import ReadOptions, default_cache_gb
from trainers.pretrain_outputs import read_events

#: 8 subjects x 12 slices of 16 x 16 float16 (``cell_data``): 96 slices, 49,152 bytes for one rank.
SHARE_GB = 96 * 16 * 16 * 2 / 1e9


def _mlflow(tmp_path: Path) -> tuple[object, str, object]:
    import mlflow

    from orchestrator.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("budget", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    return client, run_id, MlflowTracker(uri, run_id)


def _pretrain(store: Path, output: Path, read: ReadOptions, tracker: object) -> dict:
    from trainers.methods.config import PretrainConfig
    from trainers.pretrain import pretrain_worker

    config = PretrainConfig.model_validate({"method": "mim", "epochs": 1, "steps_per_epoch": 1, "batch_size": 4,
                                            "image_size": 16, "model_width": 4, "valid_batch_size": None})
    return pretrain_worker({"store": str(store), "config": config.model_dump(mode="json"), "run_name": output.name,
                            "output": str(output), "read": read.model_dump(mode="json"), "tracker": tracker})


def _start_event(output: Path) -> dict:
    (start,) = [e for e in read_events(output) if e["event"] == "start"]
    return start


def test_a_budget_below_the_share_streams_and_says_so(cell_data: dict[str, Path], tmp_path: Path, capsys) -> None:
    client, run_id, tracker = _mlflow(tmp_path)
    budget = 4e-5  # 40 kB < the 49 kB share, room for windows of 5 slices
    assert budget < SHARE_GB
    _pretrain(cell_data["store"], tmp_path / "run", ReadOptions(cache_gb=budget), tracker)
    loader = _start_event(tmp_path / "run")["loader"]
    assert (loader["mode"], loader["budget_gb"], loader["slices"], loader["window_slices"]) == ("stream", budget, 96, 5)
    assert loader["line"] == ("loader: stream: this rank's 96 slices take 0.00 GB > budget 4e-05 GB; "
                              "shuffle windows of 5 slices (cache_gb given)")
    assert capsys.readouterr().out.count("loader: stream: ") == 1  # rank 0 says it once
    run = client.get_run(run_id).data
    assert run.tags["sspctl.loader.mode"] == "stream" and float(run.tags["sspctl.loader.budget_gb"]) == budget
    assert run.tags["sspctl.loader.window_slices"] == "5" and run.tags["sspctl.loader.budget_from"] == "cache_gb given"
    assert run.tags["sspctl.loader.plan"] == loader["line"]
    assert float(run.params["read.cache_gb"]) == budget  # what the job asked for, as a param


def test_without_a_budget_the_node_default_caches_and_says_why(cell_data: dict[str, Path], tmp_path: Path, capsys) -> None:
    from trainers.finetune import finetune_worker

    client, run_id, tracker = _mlflow(tmp_path)
    _pretrain(cell_data["store"], tmp_path / "run", ReadOptions(), tracker)
    loader = _start_event(tmp_path / "run")["loader"]
    assert loader["mode"] == "cache" and loader["budget_gb"] == default_cache_gb(1) > SHARE_GB
    assert loader["line"].startswith("loader: cache: this rank's 96 slices take 0.00 GB <= budget ")
    assert "default budget: 50% of this node's" in loader["line"] and "over 1 rank(s)" in loader["line"]
    run = client.get_run(run_id).data
    assert run.tags["sspctl.loader.mode"] == "cache" and run.params["read.cache_gb"] == "null"
    # A fine-tuning cell records its plan in model.json (and says it on rank 0).
    config = {"method": "scratch", "budget": 2, "seed": 0, "epochs": 1, "iterations_per_epoch": 1, "batch_size": 2,
              "valid_batch_size": 8, "model_width": 4}
    finetune_worker({"store": str(cell_data["store"]), "split": str(cell_data["split"]), "output": str(tmp_path / "cell"),
                     "config": config, "evaluate": False, "read": {"cache_gb": 1.0}})
    cell = json.loads((tmp_path / "cell" / "model.json").read_text())["loader"]
    assert (cell["mode"], cell["budget_gb"], cell["budget_from"]) == ("cache", 1.0, "cache_gb given")
    assert "loader: cache: " in capsys.readouterr().out


def test_a_job_with_a_bad_budget_fails_before_reading_data(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="read.cache_gb"):
        _pretrain(tmp_path / "missing.zarr", tmp_path / "run", ReadOptions.model_construct(cache_gb=0.0), None)
