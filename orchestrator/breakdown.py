"""Dice broken down by the test subjects' dataset and vendor, for one grid (one split) of a study.

The report's main table pools every test subject. With several source datasets in one store, or
the unseen-vendor splits (train on two vendors, test on all), the question is per group: how does
each method do on each dataset and each test vendor? This module joins a grid's per-subject Dice
table with the store's subject table (``dataset``, ``vendor``) and summarises per group.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

GROUP_COLUMNS = ("dataset", "vendor")


def split_name(split_path: str) -> str:
    """``split.vendor-A_B.yaml`` -> ``vendor-A_B`` (a named split), anything else -> ``default``."""
    name = Path(split_path).name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    stem, dot, rest = name.partition(".")
    return rest if dot and rest else "default"


def subject_groups(store_path: str) -> pd.DataFrame:
    """``subject_id, dataset, vendor`` of every subject of the store (vendor ``unknown`` if missing)."""
    from datastore.store import SliceStore

    subjects = SliceStore.open(store_path).subjects
    frame = subjects[["subject_id", "dataset"]].astype(str)
    frame["vendor"] = subjects["vendor"].fillna("unknown").astype(str) if "vendor" in subjects else "unknown"
    return frame


def breakdown_table(dice: pd.DataFrame, groups: pd.DataFrame, split: str) -> pd.DataFrame:
    """Mean, sd and n of 3D Dice per ``method, budget, dataset, vendor, class``.

    Args:
        dice: per-subject Dice rows ``method, budget, seed, subject_id, phase, class, dice`` (the
            report's table, with the ``mean`` class already added).
        groups: ``subject_id, dataset, vendor`` (:func:`subject_groups`). An id present in two
            datasets is attributed to ``?`` (the Dice file does not say which).
        split: the split's name, copied into a ``split`` column.
    """
    ambiguous = groups["subject_id"].duplicated(keep=False)
    groups = groups.copy()
    groups.loc[ambiguous, ["dataset", "vendor"]] = "?"
    groups = groups.drop_duplicates("subject_id")
    joined = dice.assign(subject_id=dice["subject_id"].astype(str)).merge(groups, on="subject_id", how="left")
    joined[list(GROUP_COLUMNS)] = joined[list(GROUP_COLUMNS)].fillna("?")
    keys = ["method", "budget", *GROUP_COLUMNS, "class"]
    summary = joined.groupby(keys, as_index=False)["dice"].agg(dice_mean="mean", dice_sd="std", n="count")
    summary.insert(0, "split", split)
    return summary


def pivot_by_group(summary: pd.DataFrame, class_name: str = "mean", digits: int = 3) -> pd.DataFrame:
    """Rows ``method, budget``; one column per ``dataset/vendor`` with the mean Dice of ``class_name``."""
    part = summary[summary["class"] == class_name].copy()
    part["group"] = part["dataset"] + "/" + part["vendor"]
    table = part.pivot_table(index=["method", "budget"], columns="group", values="dice_mean", aggfunc="first")
    return table.round(digits).reset_index()


def write_breakdown(dice: pd.DataFrame, store_path: str, split_path: str, output: Path) -> dict[str, Path]:
    """Write ``breakdown.csv`` and append a "Dice by dataset and vendor" section to the report files.

    Returns the files written (``{"breakdown_csv": path}``); nothing when the store cannot be read
    (the section then says so).
    """
    from orchestrator.report import markdown_table, with_mean_class

    name = split_name(split_path)
    title = f"Dice by test dataset and vendor (split {name})"
    try:
        groups = subject_groups(store_path)
    except Exception as exc:  # noqa: BLE001 - a moved store must not sink the report
        _append_section(output, title, f"store {store_path} unreadable ({str(exc).splitlines()[0][:120]})", None)
        return {}
    summary = breakdown_table(with_mean_class(dice), groups, name)
    path = output / "breakdown.csv"
    summary.to_csv(path, index=False)
    pivot = pivot_by_group(summary)
    intro = ("Mean 3D Dice (mean of LV, MYO, RV per subject-phase) over seeds and test subject-phases of each "
             "dataset/vendor group; per class, sd and n in breakdown.csv.")
    _append_section(output, title, intro, pivot, markdown_table)
    return {"breakdown_csv": path}


def _append_section(output: Path, title: str, intro: str, table: pd.DataFrame | None, to_markdown: Any = None) -> None:
    markdown, page = output / "report.md", output / "report.html"
    body = "" if table is None else to_markdown(table)
    if markdown.is_file():
        markdown.write_text(markdown.read_text() + "\n".join(["", f"## {title}", "", intro, "", body, ""]))
    if page.is_file():
        section = f"<h2>{html.escape(title)}</h2><p>{html.escape(intro)}</p>"
        if table is not None:
            section += table.to_html(index=False, na_rep="-")
        text = page.read_text()
        page.write_text(text.replace("</body></html>", section + "</body></html>"))
