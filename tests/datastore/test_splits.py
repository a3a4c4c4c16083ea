"""Subject splits: determinism, stratification, disjointness, nested budgets, file format, CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from datastore.splits import SplitError, dataset_key, import_published, load_split, make_splits
from orchestrator.cli import app


def _table(per_group: dict[tuple[str, str], int], pathologies: tuple[str, ...] = ("DCM", "NOR")) -> pd.DataFrame:
    rows: list[dict[str, str]] = []
    for (dataset, vendor), n in per_group.items():
        for i in range(n):
            sid = f"{len(rows):03d}" if dataset == "mnms2" else f"{vendor}{i:02d}X{len(rows)}"
            rows.append({"subject_id": sid, "dataset": dataset, "vendor": vendor,
                         "pathology": pathologies[i % len(pathologies)]})  # fmt: skip
    return pd.DataFrame(rows)


GROUPS = {("mnms", "A"): 30, ("mnms", "B"): 25, ("mnms", "C"): 4, ("mnms2", "A"): 20, ("mnms2", "B"): 12}


def test_make_splits_is_deterministic_and_seeded(tmp_path: Path) -> None:
    table = _table(GROUPS)
    first = make_splits(table, test_per_vendor=5, seed=0)
    again = make_splits(table.sample(frac=1.0, random_state=3), test_per_vendor=5, seed=0)  # row order irrelevant
    assert first.save(tmp_path / "a.yaml").read_bytes() == again.save(tmp_path / "b.yaml").read_bytes()
    other = make_splits(table, test_per_vendor=5, seed=1)
    assert first.subjects("test") != other.subjects("test")
    assert first.budget(10, 0) != first.budget(10, 1)


def test_test_part_is_stratified_by_dataset_and_vendor() -> None:
    table = _table(GROUPS)
    split = make_splits(table, test_per_vendor=5, seed=7)
    test = set(split.subjects("test"))
    by_group = table[table["subject_id"].isin(test)].groupby(["dataset", "vendor"]).size().to_dict()
    assert by_group == {("mnms", "A"): 5, ("mnms", "B"): 5, ("mnms", "C"): 4, ("mnms2", "A"): 5, ("mnms2", "B"): 5}
    assert set(split.groups("test")) == {"mm1", "mm2"}
    assert dataset_key("mnms") == "mm1" and dataset_key("mnms2") == "mm2" and dataset_key("synth") == "synth"


def test_parts_disjoint_valid_fraction_and_mm2_overlap_rule() -> None:
    table = _table(GROUPS)
    kept = make_splits(table, test_per_vendor=5, seed=0)
    assert len(kept.subjects("train")) + len(kept.subjects("valid")) == len(table) - len(kept.subjects("test"))
    split = make_splits(table, test_per_vendor=5, seed=0, exclude_mm2_overlap=True)
    train, valid, test = (set(split.subjects(p)) for p in ("train", "valid", "test"))
    assert not (train & valid or train & test or valid & test)
    # With the published rule, M&Ms-2 NOR subjects outside test leave the pool (M&Ms is present).
    nor_mm2 = set(table[(table["dataset"] == "mnms2") & (table["pathology"] == "NOR")]["subject_id"])
    assert not (nor_mm2 - test) & (train | valid)
    assert sorted(split.meta["excluded_mm2_overlap"]) == sorted(nor_mm2 - test)
    pool = len(table) - len(test) - len(nor_mm2 - test)
    assert len(valid) == round(0.2 * pool) and len(train) == pool - len(valid)
    assert len(kept.subjects("valid")) == round(0.2 * (len(table) - len(test)))


def test_budgets_are_nested_per_seed_inside_train() -> None:
    split = make_splits(_table(GROUPS), test_per_vendor=5, seed=2)
    train = set(split.subjects("train"))
    assert split.budget_seeds == [0, 1, 2] and split.budget_sizes == [10, 15, 25, 50]
    for seed in (0, 1, 2):
        previous: set[str] = set()
        for n in (10, 15, 25, 50):
            members = set(split.budget(n, seed))
            assert len(members) == min(n, len(train)) and members <= train and previous <= members
            previous = members
        assert previous <= set(split.budget("all", seed)) == train


def test_budgets_beyond_the_pool_clip_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tiny = _table({("mnms", "A"): 6, ("mnms2", "A"): 4})
    with caplog.at_level(logging.WARNING, logger="datastore.splits"):
        split = make_splits(tiny, test_per_vendor=1, seed=0, budgets=(2, 5, 50), seeds=(0, 4))
    assert "clipped" in caplog.text
    n_train = len(split.subjects("train"))
    assert n_train < 50 and sorted(split.budget(50, 4)) == sorted(split.subjects("train"))
    assert len(split.budget(2, 4)) == 2 and split.budget_seeds == [0, 4]


def test_round_trip_keeps_zero_padded_ids(tmp_path: Path) -> None:
    split = make_splits(_table(GROUPS), test_per_vendor=3, seed=0, meta={"store_hash": "abc"})
    path = split.save(tmp_path / "split.yaml")
    text = path.read_text()
    assert text.startswith("train:") and "budgets:" in text and "meta:" in text
    loaded = load_split(path)
    assert loaded.to_dict() == split.to_dict()
    assert loaded.meta["store_hash"] == "abc"
    assert any(s.startswith("0") for s in loaded.subjects("train"))


PUBLISHED = """\
train:
  mm1: [A0S9V9, A1D0Q7, A1D9Z7, A1E9Q1]
  mm2: ['010', 011, "012"]
valid:
  mm1: [A1K2P5]
  mm2: ['020']
test:
  mm1: [A2C0I1]
  mm2: ['281', '282']
"""


def test_published_format_and_budget_files_import(tmp_path: Path) -> None:
    (tmp_path / "default-cine-split.yaml").write_text(PUBLISHED)
    base = load_split(tmp_path / "default-cine-split.yaml")
    assert base.groups("train")["mm2"] == ["010", "011", "012"]  # unquoted 011 is not octal 9
    assert base.subjects("test") == ["A2C0I1", "281", "282"]
    published = yaml.safe_load(PUBLISHED)
    for seed, picks in {0: (["A1D0Q7"], ["011"]), 1: (["A0S9V9"], ["010"])}.items():
        small = dict(published, train={"mm1": picks[0], "mm2": picks[1]})
        large = dict(published, train={"mm1": picks[0] + ["A1E9Q1"], "mm2": picks[1] + ["012"]})
        (tmp_path / f"default-cine-split-nr2-seed{seed}.yaml").write_text(yaml.safe_dump(small))
        (tmp_path / f"default-cine-split-nr4-seed{seed}.yaml").write_text(yaml.safe_dump(large))
    (tmp_path / "default-cine-split-Vendor-A_B.yaml").write_text(PUBLISHED)
    split = import_published([tmp_path])
    assert split.budget_seeds == [0, 1] and split.budget_sizes == [2, 4]
    assert split.budget(2, 0) == ["A1D0Q7", "011"]
    assert set(split.budget(2, 1)) <= set(split.budget(4, 1))
    out = split.save(tmp_path / "out" / "split.yaml")
    assert load_split(out).to_dict() == split.to_dict()


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,message",
    [
        ("train: {mm1: [a]}\nvalid: {mm1: [b]}\n", r"test: missing"),
        ("train: {mm1: [a]}\nvalid: {mm1: [a]}\ntest: {mm1: [c]}\n", r"mm1/a is in both train.mm1 and valid.mm1"),
        ("train: {mm1: [a, a]}\nvalid: {}\ntest: {mm1: [c]}\n", r"train.mm1: subject 'a' listed twice"),
        ("train: {mm1: a}\nvalid: {}\ntest: {}\n", r"train.mm1: expected a list of subject ids"),
        ("train: [a]\nvalid: {}\ntest: {}\n", r"train: expected a mapping of dataset"),
        ("train: {mm1: [a]}\nvalid: {}\ntest: {}\nextra: 1\n", r"extra: unknown key"),
        ("train: {mm1: [a, b, c]}\nvalid: {}\ntest: {}\nbudgets: {0: {1: {mm1: [a]}, 2: {mm1: [b, c]}}}\n",
         r"budgets.0.2: not nested: budget 1 subjects missing: mm1/a"),
        ("train: {mm1: [a, b]}\nvalid: {}\ntest: {}\nbudgets: {0: {1: {mm1: [z]}}}\n",
         r"budgets.0.1: subjects not in train: mm1/z"),
        ("train: {mm1: [a, b]}\nvalid: {}\ntest: {}\nbudgets: {x: {1: {mm1: [a]}}}\n", r"budgets.x: 'x' is not an integer"),
        ("train: {mm1: [a\n", r"not valid YAML"),
        ("- a\n- b\n", r"expected a mapping with train/valid/test"),
    ],
)  # fmt: skip
def test_bad_split_files_fail_with_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _bad(tmp_path, "bad.yaml", text)
    with pytest.raises(SplitError, match=message) as info:
        load_split(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_missing_file_and_unknown_budget(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="split file not found"):
        load_split(tmp_path / "nope.yaml")
    split = make_splits(_table(GROUPS), test_per_vendor=2, seed=0)
    with pytest.raises(SplitError, match="no budget 12"):
        split.budget(12, 0)
    with pytest.raises(SplitError, match="no seed 9"):
        split.budget(10, 9)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real store with 8 M&Ms (vendors A, B) and 4 M&Ms-2 subjects of one tiny slice each."""
    from datastore.store import StoreWriter, SubjectRecord

    path = tmp_path_factory.mktemp("splits") / "demo.zarr"
    writer = StoreWriter.open(path, {"test": True}, image_size=4, spacing=1.25, chunk_slices=4)
    zero = (np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.uint8))
    for i in range(12):
        dataset, sid, vendor = ("mnms", f"M{i}", "AB"[i % 2]) if i < 8 else ("mnms2", f"{i:03d}", "A")
        one = np.zeros(1)
        writer.append(
            SubjectRecord(dataset, sid, np.zeros((1, 4, 4), np.float16), one, one, one + 1, one + 1,
                          np.zeros((1, 4, 4), np.uint8), np.zeros(1), {"ED": zero, "ES": zero},
                          {"vendor": vendor, "pathology": "DCM"})  # fmt: skip
        )
    writer.finalize()
    return path


def test_cli_make_writes_next_to_the_store(store_path: Path) -> None:
    result = CliRunner().invoke(app, ["splits", "make", "--store", str(store_path), "--test-per-vendor", "1",
                                      "--seed", "3", "--budgets", "2,4,100"])  # fmt: skip
    assert result.exit_code == 0, result.output
    target = store_path.parent / "demo-split-seed3.yaml"
    assert f"wrote {target}" in result.output
    split = load_split(target)
    assert len(split.subjects("test")) == 3  # mm1/A, mm1/B, mm2/A
    assert split.meta["created_by"] == "sspctl splits make" and split.meta["seed"] == 3
    assert split.budget_sizes == [2, 4, 100] and len(split.budget(100, 0)) == len(split.subjects("train"))


def test_cli_import_validates_ids_against_the_store(store_path: Path, tmp_path: Path) -> None:
    good = _bad(tmp_path, "good.yaml", "train: {mm1: [M0, M1]}\nvalid: {mm2: ['008']}\ntest: {mm1: [M2]}\n")
    out = tmp_path / "imported.yaml"
    result = CliRunner().invoke(app, ["splits", "import", str(good), "--store", str(store_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_split(out).subjects("valid") == ["008"]
    bad = _bad(tmp_path, "bad.yaml", "train: {mm1: [M0, Q7]}\nvalid: {mm2: ['8']}\ntest: {mm1: [M2]}\n")
    result = CliRunner().invoke(app, ["splits", "import", str(bad), "--store", str(store_path), "--out", str(out)])
    assert result.exit_code == 1
    assert "2 subject id(s) not in" in result.output and "train.mm1: Q7" in result.output
    assert "valid.mm2: 8" in result.output
    result = CliRunner().invoke(app, ["splits", "make", "--store", str(tmp_path / "missing.zarr"),
                                      "--test-per-vendor", "1"])  # fmt: skip
    assert result.exit_code == 1 and "store not found" in result.output
