"""``sspctl study`` end to end on a small store: pretraining, the positive control beside it, the grid,
the report; then the same command again, which finds every stage finished.

Real components: a synthetic store, a private local Ray (3 CPUs), a SimCLR pretraining of 2 steps
under Ray Train, the supervised model in a Ray task while SimCLR pretrains, 3 grid cells (scratch,
SimCLR, supervised) of 2 steps in their Tune trials, sqlite MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SIZE = 32
WIDTH = 8
PRETRAIN = {"method": {"name": "simclr"}, "model_width": WIDTH, "epochs": 1, "batch_size": 8, "steps_per_epoch": 2}
FINETUNE = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "valid_batch_size": 8, "model_width": WIDTH}


def _study_file(root: Path) -> Path:
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.synth import write_dataset

    write_dataset(root / "raw", "mnms", n_subjects=8, seed=0, size=SIZE, frames=(3, 3), slices=(3, 4), trivial=True)
    execute_ingest(plan_ingest({"mnms": root / "raw"}, root / "store.zarr", IngestConfig(size=SIZE, chunk_slices=16)),
                   executor="serial", progress=False)
    (root / "configs").mkdir()
    (root / "configs" / "simclr.yaml").write_text(yaml.safe_dump(PRETRAIN))
    (root / "finetune.yaml").write_text(yaml.safe_dump(FINETUNE))
    study = {
        "name": "study-e2e", "store": str(root / "store.zarr"),
        "split": {"test_per_vendor": 1, "budgets_seeds": [0]},
        "pretrain": {"methods": ["simclr"], "config_dir": str(root / "configs")},
        "finetune": {"budgets": [2], "seeds": [0], "train_seeds": [0], "extra_arms": ["supervised"],
                     "config": str(root / "finetune.yaml")},
        "ray_cpus": 3,
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _index(lines: list[str], start: str) -> int:
    found = [i for i, line in enumerate(lines) if line.startswith(start)]
    assert found, f"no line starts with {start!r} in:\n" + "\n".join(lines)
    return found[0]


def test_a_study_trains_its_positive_control_beside_the_pretraining_and_a_rerun_finds_it_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.grid import MARKER_NAME
    from trainers.weights import read_manifest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path, ws = _study_file(tmp_path), tmp_path / "ws"
    result = CliRunner().invoke(app, ["study", "--config", str(path), "--output", str(ws), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # the supervised model starts before SimCLR and is waited for only after it: the two overlap
    assert (_index(lines, "positive control: training the supervised model beside the pretraining (a Ray task of 1 CPU)")
            < _index(lines, "pretrain-simclr-") < _index(lines, "positive control: waiting for the supervised model")
            < _index(lines, "positive control: supervised model in ") < _index(lines, "fine-tuning grid: "))
    (supervised,) = (ws / "pretrain").glob("supervised-*")
    assert read_manifest(supervised).method == "supervised"
    assert f"positive control: supervised model in {supervised}" in lines
    markers = {p.parent.name.split("-")[1]: p for p in (ws / "finetune").glob(f"*/*/{MARKER_NAME}")}
    assert set(markers) == {"scratch", "simclr", "supervised"}, markers
    written = {arm: p.stat().st_mtime_ns for arm, p in markers.items()}

    again = CliRunner().invoke(app, ["study", "--config", str(path), "--output", str(ws), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert not [line for line in again.output.splitlines() if line.startswith("positive control:")], again.output
    assert "is already finished" in again.output
    assert {arm: p.stat().st_mtime_ns for arm, p in markers.items()} == written  # no cell ran again


def test_a_failed_positive_control_stops_the_study_with_its_own_error() -> None:
    """The supervised model's task raising (a bad weights file, say) surfaces as that error, in one line,
    not as Ray's wrapper with a remote traceback."""
    import ray

    from orchestrator.ray_session import ray_session
    from orchestrator.study import wait_for_supervised_control

    def fails() -> Path:
        raise ValueError("/ws/pretrain/supervised-1/train/model.pt: not a weights file")

    lines: list[str] = []
    with ray_session(num_cpus=1):
        with pytest.raises(ValueError, match=r"^/ws/pretrain/supervised-1/train/model.pt: not a weights file$") as raised:
            wait_for_supervised_control(ray.remote(num_cpus=1, max_retries=0)(fails).remote(), lines.append)
    assert not isinstance(raised.value, ray.exceptions.RayTaskError)
    assert lines == ["positive control: waiting for the supervised model"]
