"""Bring your own data, end to end, on a store that is mostly unlabelled.

M&Ms + M&Ms-2 + ACDC phantoms (7 of 8 ACDC subjects without labels) + a manifest of unlabelled
scans -> ``sspctl ingest`` (all four sources into one store) -> ``store validate`` -> ``splits make``
(labelled subjects only) -> ``pretrain`` (every subject outside test and valid, unlabelled included)
-> ``finetune`` -> ``report`` with Dice by dataset and vendor. Everything through the CLI, real Ray and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
SMALL = dict(seed=0, size=48, frames=(3, 3), slices=(3, 3), trivial=True)


def _ok(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_mostly_unlabelled_store_from_four_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datastore.splits import load_split, pretrain_pool
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    for name in ("MLFLOW_TRACKING_URI", "SSPCTL_HOME", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    raw = tmp_path / "raw"
    write_dataset(raw / "mnms", "mnms", n_subjects=4, vendors=("A",), **SMALL)
    write_dataset(raw / "mnms2", "mnms2", n_subjects=3, vendors=("B",), **SMALL)
    write_dataset(raw / "acdc", "acdc", n_subjects=8, unlabelled=7, **SMALL)
    cines = sorted((raw / "acdc").rglob("*_4d.nii.gz"))[:4]
    (raw / "pool.csv").write_text("subject_id,cine\n" + "".join(f"u{i},{p.relative_to(raw)}\n" for i, p in enumerate(cines)))

    store, ws = tmp_path / "store.zarr", tmp_path / "ws"
    _ok("ingest", "--store", store, "--mnms", raw / "mnms", "--mnms2", raw / "mnms2", "--acdc", raw / "acdc",
        "--manifest", raw / "pool.csv", "--size", "32", "--spacing", "4.0", "--workers", "1", "--no-progress")
    _ok("store", "validate", store, "--no-progress")
    table = SliceStore.open(store).subjects
    assert table.groupby("dataset")["labelled"].sum().to_dict() == {"acdc": 1, "mnms": 4, "mnms2": 3, "pool": 0}
    assert (~table["labelled"].astype(bool)).sum() > len(table) / 2 - 2  # 11 of 19 without labels

    split_path = tmp_path / "split.yaml"
    _ok("splits", "make", "--store", store, "--test-per-vendor", "1", "--budgets", "2", "--budget-seeds", "0",
        "--out", split_path)
    split = load_split(split_path)
    labelled_ids = set(table.loc[table["labelled"].astype(bool), "subject_id"])
    assert set(split.subjects("train") + split.subjects("valid") + split.subjects("test")) <= labelled_ids
    pool = pretrain_pool(table, split)
    assert len(pool) == len(table) - len(split.subjects("test")) and {"u0", "u1"} <= set(pool)
    from orchestrator.pretrain_launch import pretrain_subjects

    chosen = pretrain_subjects(SliceStore.open(store), split_path)  # what `pretrain --split` trains and validates on
    assert chosen.valid is not None and sorted(chosen.valid) == sorted(split.subjects("valid"))
    assert chosen.train == [s for s in pool if s not in chosen.valid]  # valid subjects are held out

    config = tmp_path / "simclr.yaml"
    config.write_text(yaml.safe_dump({"model_width": 8, "method": {"name": "simclr"}}))
    _ok("pretrain", "--method", "simclr", "--store", store, "--split", split_path, "--config", config, "--epochs", "1",
        "--batch-size", "8", "--steps-per-epoch", "2", "--output", ws, "--no-progress")
    (run,) = [p for p in (ws / "pretrain").iterdir() if p.is_dir()]

    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "valid_batch_size": 8,
                                        "model_width": 8}))
    _ok("finetune", "--store", store, "--split", split_path, "--pretrained", f"simclr={run}", "--budgets", "2",
        "--seeds", "0", "--config", finetune, "--study", "byod", "--output", ws, "--num-cpus", "2")
    report_dir = tmp_path / "report"
    _ok("report", "--study", "byod", "--output", ws, "--report-dir", report_dir, "--no-log")
    breakdown = pd.read_csv(report_dir / "breakdown.csv", dtype={"vendor": str})
    tested = table.set_index("subject_id").loc[split.subjects("test")]
    expected = {(d, str(v)) for d, v in zip(tested["dataset"], tested["vendor"])}
    assert set(zip(breakdown["dataset"], breakdown["vendor"])) == expected
    assert ("acdc", "unknown") in expected and set(breakdown["method"]) == {"scratch", "simclr"}
    assert "Dice by test dataset and vendor (split default)" in (report_dir / "report.md").read_text()
