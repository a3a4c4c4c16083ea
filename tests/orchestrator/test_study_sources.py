"""Study configs with the new sources (ACDC, manifests) and named splits (the unseen-vendor ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from datastore.splits import SplitError
from orchestrator.cli import app
from orchestrator.study import StudyConfig, named_split_files


def _config(tmp_path: Path, named: list[str]) -> StudyConfig:
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({"train": {"mm1": ["a"]}, "valid": {"mm1": []}, "test": {"mm1": ["b"]}}))
    return StudyConfig.model_validate({
        "name": "s", "store": str(tmp_path / "store.zarr"),
        "ingest": {"acdc": str(tmp_path / "acdc"), "manifests": [str(tmp_path / "site.csv")]},
        "split": {"file": str(split), "named": named},
    })


def test_named_splits_resolve_next_to_the_split_file(tmp_path: Path) -> None:
    config = _config(tmp_path, ["vendor-A_B"])
    assert config.ingest is not None and config.ingest.manifests == (tmp_path / "site.csv",)
    (tmp_path / "split.vendor-A_B.yaml").write_text("{}")
    assert named_split_files(config, tmp_path / "split.yaml") == {"vendor-A_B": tmp_path / "split.vendor-A_B.yaml"}
    with pytest.raises(SplitError, match="no split named 'vendor-C_D'"):
        named_split_files(_config(tmp_path, ["vendor-C_D"]), tmp_path / "split.yaml")


def test_study_with_a_missing_named_split_stops_before_pretraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _config(tmp_path, ["vendor-C_D"]).model_dump(mode="json")
    config.update({"ingest": None, "ray_cpus": 1})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["study", "--config", str(path), "--output", str(tmp_path / "ws"), "--no-progress"])
    assert result.exit_code == 1 and "no split named 'vendor-C_D' next to split.yaml" in result.output
    assert not (tmp_path / "ws" / "pretrain").exists()


def test_study_train_seeds_override_is_checked_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    config = _config(tmp_path, []).model_dump(mode="json")
    config.update({"ingest": None, "ray_cpus": 1})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    for bad, why in (("3,x", "is not a comma-separated list of integers"), ("3,3", "has duplicates")):
        result = runner.invoke(app, ["study", "--config", str(path), "--output", str(tmp_path / "ws"), "--train-seeds", bad])
        assert result.exit_code == 2 and f"--train-seeds: '{bad}' {why}" in result.output
    assert not (tmp_path / "ws" / "reports").exists()


def test_study_train_seeds_override_must_leave_room_for_the_runs_per_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    config = _config(tmp_path, []).model_dump(mode="json")
    config.update({"ingest": None, "ray_cpus": 1})
    config["finetune"].update({"budgets": [1, "all"], "train_seeds": [0, 1, 2, 3, 4, 5], "runs_per_budget": {1: 6, "all": 3}})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["study", "--config", str(path), "--output", str(tmp_path / "ws"), "--train-seeds", "6,7,8"])
    assert result.exit_code == 2 and "--train-seeds 6,7,8: " in result.output
    assert "runs_per_budget: 6 run(s) at budget 1; expected 1 to 3" in result.output
    assert not (tmp_path / "ws" / "reports").exists()
