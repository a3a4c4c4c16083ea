"""Dice per test dataset and vendor (the report's breakdown) from a per-subject Dice table."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.breakdown import breakdown_table, pivot_by_group, split_name


def test_breakdown_per_dataset_and_vendor() -> None:
    dice = pd.DataFrame([
        {"method": "scratch", "budget": "all", "seed": 0, "subject_id": s, "phase": "ED", "class": "mean", "dice": d}
        for s, d in (("A1", 0.9), ("A2", 0.7), ("C1", 0.4), ("p1", 0.6), ("dup", 0.1))
    ])
    groups = pd.DataFrame({"subject_id": ["A1", "A2", "C1", "p1", "dup", "dup"],
                           "dataset": ["mnms", "mnms", "mnms", "acdc", "mnms", "acdc"],
                           "vendor": ["A", "A", "C", "unknown", "B", "unknown"]})
    summary = breakdown_table(dice, groups, "vendor-A_B")
    by_group = summary.set_index(["dataset", "vendor"])
    assert by_group.loc[("mnms", "A"), "dice_mean"] == pytest.approx(0.8)
    assert by_group.loc[("mnms", "A"), "n"] == 2
    assert by_group.loc[("mnms", "C"), "dice_mean"] == pytest.approx(0.4)
    assert by_group.loc[("acdc", "unknown"), "dice_mean"] == pytest.approx(0.6)
    assert by_group.loc[("?", "?"), "n"] == 1  # an id in two datasets is not guessed
    assert set(summary["split"]) == {"vendor-A_B"}
    pivot = pivot_by_group(summary)
    assert list(pivot.columns) == ["method", "budget", "?/?", "acdc/unknown", "mnms/A", "mnms/C"]


def test_split_name_from_the_file_name() -> None:
    assert split_name("/x/split.vendor-A_B.yaml") == "vendor-A_B"
    assert split_name("/x/store-split-seed0.yaml") == "default"
