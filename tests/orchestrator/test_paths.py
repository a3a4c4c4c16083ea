"""User paths resolved at the command line, names checked as names, writes kept under their root."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.paths import PathCheckError, check_name, inside, removed_if_left_empty, user_path


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_user_path_is_absolute_checked_and_leaves_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "split.yaml").write_text("x: 1\n")
    monkeypatch.chdir(tmp_path)
    assert user_path("store.zarr", "--store") == str(tmp_path / "store.zarr")
    assert user_path("./sub/../store.zarr", "--store") == str(tmp_path / "store.zarr")
    assert user_path("s3://bucket/x.zarr", "--store") == "s3://bucket/x.zarr"
    assert user_path("new", "--output", must_exist=False) == str(tmp_path / "new")
    with pytest.raises(PathCheckError, match=rf"^--store nope.zarr \({tmp_path}/nope.zarr\): not found$"):
        user_path("nope.zarr", "--store")
    with pytest.raises(PathCheckError, match=rf"^--store {tmp_path}/nope.zarr: not found$"):
        user_path(tmp_path / "nope.zarr", "--store")
    with pytest.raises(PathCheckError, match=r"--split store.zarr \(.*\): not a file"):
        user_path("store.zarr", "--split", kind="file")
    with pytest.raises(PathCheckError, match=r"--store split.yaml \(.*\): not a directory"):
        user_path("split.yaml", "--store", kind="dir")


@pytest.mark.parametrize("name", ["../../esc", "..", "a/b", "a\\b", ".hidden", "-x", "", "x" * 65, "a b", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(PathCheckError, match="--study"):
        check_name(name, "--study")


def test_good_names_and_inside() -> None:
    for name in ("sspctl-demo", "study_1.v2", "A" * 64, "grid-0a1b"):
        assert check_name(name, "--study") == name
    root = Path("/tmp/ws")
    assert inside(root, "finetune", "s", "cell") == root / "finetune" / "s" / "cell"
    for bad in ("..", "../x", "/abs", ""):
        with pytest.raises(PathCheckError):
            inside(root, "finetune", bad)


def test_inside_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "link").symlink_to(tmp_path)
    with pytest.raises(PathCheckError, match="resolves outside"):
        inside(tmp_path / "ws", "link")


def test_removed_if_left_empty_keeps_what_existed_or_holds_files(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), removed_if_left_empty(target):
        (target / "a" / "b").mkdir(parents=True)
        raise RuntimeError
    assert not target.exists()
    with pytest.raises(RuntimeError), removed_if_left_empty(target):
        (target / "a").mkdir(parents=True)
        (target / "a" / "mlflow.db").write_text("x")
        raise RuntimeError
    assert (target / "a" / "mlflow.db").is_file()


def test_study_name_that_escapes_output_is_refused_by_every_command(tmp_path: Path) -> None:
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "split.yaml").write_text("train: {}\n")
    ws = tmp_path / "deep" / "ws"
    commands = [
        ["finetune", "--store", str(tmp_path / "store.zarr"), "--split", str(tmp_path / "split.yaml"),
         "--study", "../../esc", "--output", str(ws)],
        ["pretrain", "--method", "mim", "--store", str(tmp_path / "store.zarr"), "--study", "../../esc",
         "--output", str(ws)],
        ["report", "--study", "../../esc", "--output", str(ws)],
        ["report", "--study", "ok", "--grid", "../x", "--output", str(ws)],
    ]
    for command in commands:
        code, out = _invoke(*command)
        assert code == 2, (command, out)
        assert len(out.strip().splitlines()) == 1 and "no path separators, no '..'" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.yaml", "store.zarr"]  # nothing written anywhere


def test_a_relative_missing_store_fails_fast_naming_the_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix the relative path reached the Ray workers and failed there after ~100 s."""
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    code, out = _invoke("pretrain", "--method", "mim", "--store", "clean.zarr", "--epochs", "2", "--output", "ws")
    assert code == 2 and out.strip() == f"error: --store clean.zarr ({tmp_path / 'clean.zarr'}): not found"
    assert time.monotonic() - started < 10
    assert not (tmp_path / "ws").exists(), "a failed pretraining left an empty --output folder"


def test_failed_pretraining_leaves_no_empty_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.synth import write_dataset

    write_dataset(tmp_path / "raw", "mnms", n_subjects=2, seed=0, size=32, frames=(3, 3), slices=(3, 3), trivial=True)
    execute_ingest(plan_ingest({"mnms": tmp_path / "raw"}, str(tmp_path / "s.zarr"), IngestConfig(size=32)),
                   executor="serial", progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    monkeypatch.chdir(tmp_path)
    code, out = _invoke("pretrain", "--method", "mim", "--store", "s.zarr", "--config", "bad.yaml", "--output", "ws")
    assert code == 1 and "epochz: unknown key" in out
    assert not (tmp_path / "ws").exists()


def test_predict_with_a_missing_model_leaves_no_runs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSPCTL_HOME", raising=False)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    code, out = _invoke("predict", "--model", "nope", "--input", "scan.nii.gz", "--out", "seg.nii.gz")
    assert code == 1 and "--model nope" in out
    assert sorted(os.listdir(tmp_path)) == ["scan.nii.gz"]


def test_library_paths_cannot_leave_the_workspace_either(tmp_path: Path) -> None:
    """Callers that bypass the CLI (a study config, the Python API) meet the same checks by construction."""
    from orchestrator.grid import cell_output_dir
    from orchestrator.study_tracking import open_study
    from orchestrator.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(PathCheckError):
        cell_output_dir(ws, "../../esc", "ft-scratch-b10-s0-abcd")
    with pytest.raises(PathCheckError):
        open_study(ws.tracking_uri, "../../esc", ws.artifact_root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_study_file_name_is_checked_and_its_paths_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.commands.study import absolute_paths
    from orchestrator.study import StudyConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft.yaml").write_text("epochs: 1\n")
    (tmp_path / "bad.yaml").write_text("name: ../../esc\nstore: s.zarr\n")
    code, out = _invoke("study", "--config", "bad.yaml", "--output", "ws")
    assert code == 2 and out.strip().startswith("error: study config: name '../../esc': use letters"), out
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml", "ft.yaml"]
    settings = absolute_paths(StudyConfig(name="s", store="s.zarr", split={"file": "split.yaml"},
                                          finetune={"config": "ft.yaml"}))
    assert settings.store == str(tmp_path / "s.zarr") and settings.split.file == tmp_path / "split.yaml"
    assert settings.finetune.config == tmp_path / "ft.yaml"
