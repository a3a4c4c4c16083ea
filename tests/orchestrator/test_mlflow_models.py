"""Logging a model through MLflow's fluent API leaves the process's MLflow settings as they were (real sqlite)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from orchestrator.mlflow_models import log_cell_model
from orchestrator.study_tracking import open_study
from orchestrator.workspace import Workspace


@pytest.mark.parametrize("preset", [None, "sqlite:////elsewhere/user-chosen.db"])
def test_logging_a_model_does_not_redirect_later_workspaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              preset: str | None) -> None:
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI: a second workspace in the same process
    used to read it and log into the first workspace's mlflow.db ("Run not found" in its own)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    if preset:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", preset)
    first = f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}"
    (tmp_path / "first").mkdir()
    study = open_study(first, "s", artifact_root=(tmp_path / "first" / "mlartifacts").as_uri())
    run_id = study.client.create_run(study.experiment_id, run_name="cell").info.run_id
    model_dir = tmp_path / "cell"
    model_dir.mkdir()
    torch.save({"w": torch.zeros(2)}, model_dir / "model.pt")
    digest = hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
    (model_dir / "model.json").write_text(json.dumps({"file": "model.pt", "sha256": digest}))

    assert log_cell_model(first, run_id, model_dir) is not None
    assert study.client.get_run(run_id).outputs.model_outputs  # it was logged, on the first backend
    assert study.client.get_run(run_id).info.status == "RUNNING"  # and the run left as it was
    assert os.environ.get("MLFLOW_TRACKING_URI") == preset
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    second = Workspace.resolve(tmp_path / "second")
    assert second.tracking_uri == (preset or f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}")
