"""Splits on mostly-unlabelled stores, the pretraining pool, and the published unseen-vendor splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from datastore.splits import Split, SplitError, load_split, make_splits, named_split_path, pretrain_pool
from orchestrator.cli import app


def _table(n_labelled: int, n_unlabelled: int) -> pd.DataFrame:
    rows = [{"subject_id": f"L{i:02d}", "dataset": "mnms", "vendor": "AB"[i % 2], "labelled": True} for i in range(n_labelled)]
    rows += [{"subject_id": f"U{i:03d}", "dataset": "biobank", "vendor": "unknown", "labelled": False} for i in range(n_unlabelled)]
    rows.append({"subject_id": "L00", "dataset": "acdc", "vendor": "unknown", "labelled": True})  # same id, other dataset
    return pd.DataFrame(rows)


def test_splits_draw_from_labelled_subjects_and_pretrain_on_every_non_test_subject() -> None:
    table = _table(10, 40)
    split = make_splits(table, test_per_vendor=1, seed=0, budgets=(2, 4), seeds=(0,))
    every = split.subjects("train") + split.subjects("valid") + split.subjects("test")
    assert not any(s.startswith("U") for s in every)
    assert len(every) == 11 and split.meta["unlabelled"] == 40
    assert all(not s.startswith("U") for s in split.budget(4, 0))
    pool = pretrain_pool(table, split)
    test = {(k, s) for k, ids in split.parts["test"].items() for s in ids}
    assert len(pool) == len(table) - len(test)
    assert sum(p.startswith("U") for p in pool) == 40
    assert {"mnms/L00", "acdc/L00"} & set(pool)  # a shared id is qualified by its dataset
    assert "L00" not in pool
    imported = load_split_from(split.to_dict() | {"train": {"mm1": split.parts["train"]["mm1"] + ["U001"]}})
    with pytest.raises(SplitError, match="1 subject\\(s\\) without labels in store: train.mm1: U001"):
        imported.check_against(table.assign(dataset=table["dataset"].replace({"biobank": "mnms"})))
    with pytest.raises(SplitError, match="no labelled subject"):
        make_splits(_table(0, 5).iloc[:-1], test_per_vendor=1, seed=0)


def load_split_from(data: dict) -> Split:
    return Split(parts={k: data[k] for k in ("train", "valid", "test")}, source="imported")


def _published(folder: Path, ids: dict[str, list[str]]) -> None:
    """The published file names and structure: split part -> dataset (mm1/mm2) -> subject ids."""
    folder.mkdir()
    mm1 = ids["mm1"]
    base = {"train": {"mm1": mm1[:4]}, "valid": {"mm1": mm1[4:5]}, "test": {"mm1": mm1[5:]}}
    (folder / "default-cine-split.yaml").write_text(yaml.safe_dump(base))
    (folder / "default-cine-split-nr2-seed0.yaml").write_text(yaml.safe_dump({**base, "train": {"mm1": mm1[:2]}}))
    for name, (train, test) in {"A_B": (mm1[:3], mm1[3:]), "C_D": (mm1[3:], mm1[:3])}.items():
        content = {"train": {"mm1": train[:-1]}, "valid": {"mm1": train[-1:]}, "test": {"mm1": test}}
        (folder / f"default-cine-split-Vendor-{name}.yaml").write_text(yaml.safe_dump(content))


def test_import_turns_the_vendor_files_into_named_splits(tmp_path: Path) -> None:
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.synth import write_dataset

    ids = write_dataset(tmp_path / "raw", "mnms", n_subjects=6, seed=0, size=32, frames=(3, 3), slices=(3, 3), trivial=True)
    store = tmp_path / "store.zarr"
    execute_ingest(plan_ingest({"mnms": tmp_path / "raw"}, store, IngestConfig(size=32, chunk_slices=16)),
                   executor="serial", progress=False)
    _published(tmp_path / "published", {"mm1": ids})
    out = tmp_path / "split.yaml"
    result = CliRunner().invoke(app, ["splits", "import", str(tmp_path / "published"), "--store", str(store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    default = load_split(out)
    assert default.budget(2, 0) == ids[:2]
    for name, test in (("vendor-A_B", ids[3:]), ("vendor-C_D", ids[:3])):
        path = named_split_path(out, name)
        assert path == tmp_path / f"split.{name}.yaml"
        named = load_split(path)
        assert named.subjects("test") == test and named.meta["name"] == name
    assert named_split_path(out, None) == out == named_split_path(out, "default")
    with pytest.raises(SplitError, match="no split named 'vendor-X' next to split.yaml \\(found: vendor-A_B, vendor-C_D\\)"):
        named_split_path(out, "vendor-X")
    bad = CliRunner().invoke(app, ["finetune", "--store", str(store), "--split", str(out), "--split-name", "../x"])
    assert bad.exit_code != 0 and "--split-name '../x'" in bad.output
    # Ids that the store does not hold are named.
    (tmp_path / "published" / "default-cine-split-Vendor-A_B.yaml").write_text(
        yaml.safe_dump({"train": {"mm1": ["NOPE01"]}, "valid": {"mm1": []}, "test": {"mm1": []}}))
    result = CliRunner().invoke(app, ["splits", "import", str(tmp_path / "published"), "--store", str(store), "--out", str(out)])
    assert result.exit_code == 1 and "train.mm1: NOPE01" in result.output
