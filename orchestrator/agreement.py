"""Does a study's conclusion hold when it is run again? Four checks on two reports of the same grid.

A study run twice with different training seeds (or thread counts) should tell the same story.
Given the ``summary.csv`` and ``comparisons.csv`` of two reports (``sspctl report``), this module
checks the four criteria of a study whose conclusions hold (docs/finetuning.md):

1. **Reproduced cells**: for at least ``MIN_REPRODUCED`` (90 %) of the cells that have an interval
   in the first report (mean Dice over classes, 3 or more runs), the second report's mean lies
   inside the first report's 95 % CI.
2. **Negative control**: the A/A arm (``scratch-b``) is called different from scratch in neither
   report (Holm-adjusted p >= alpha at every budget).
3. **Positive control**: the ``supervised`` arm is called *better* than scratch at the smallest
   budget in both reports.
4. **Budget curve**: scratch's mean Dice does not fall as the budget grows, in both reports.

A criterion that cannot be checked (an arm or a budget missing, no interval) is reported as
``None`` with the reason, never as passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from orchestrator.arms import SCRATCH, SUPERVISED
from orchestrator.stats import ALPHA

NEGATIVE_CONTROL = "scratch-b"
MIN_REPRODUCED = 0.9
PRIMARY_CLASS = "mean"


class AgreementError(ValueError):
    """A report directory lacks a file or a column the checks need."""


@dataclass(frozen=True)
class ReportTables:
    """The two tables of one report that the checks read."""

    name: str
    summary: pd.DataFrame
    comparisons: pd.DataFrame


@dataclass(frozen=True)
class Criterion:
    """One criterion's outcome: ``passed`` is None when it could not be checked."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class Agreement:
    """All four criteria, and the per-cell comparison behind the first one."""

    cells: pd.DataFrame
    criteria: list[Criterion] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True only when every criterion was checked and passed."""
        return all(c.passed is True for c in self.criteria)


def _budget_key(budget: object) -> float:
    """Sort key of a budget: numbers ascending, ``all`` last."""
    return math.inf if str(budget) == "all" else float(str(budget))


def read_report(folder: Path) -> ReportTables:
    """Read ``summary.csv`` and ``comparisons.csv`` of a report directory."""
    folder = Path(folder)
    tables = {}
    for stem, needed in (("summary", {"method", "budget", "class", "dice_mean", "n_runs", "ci_low", "ci_high"}),
                         ("comparisons", {"method", "budget", "class", "effect", "p_holm", "role"})):
        path = folder / f"{stem}.csv"
        if not path.is_file():
            raise AgreementError(f"{path}: not found (is {folder} a directory written by `sspctl report`?)")
        table = pd.read_csv(path, dtype={"budget": str})
        missing = sorted(needed - set(table.columns))
        if missing:
            raise AgreementError(f"{path}: missing column(s) {', '.join(missing)}")
        tables[stem] = table
    return ReportTables(folder.name if folder.name not in ("", ".") else str(folder), **tables)


def reproduced_cells(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, budget) of the primary class: first run's mean and CI, second run's mean.

    ``inside`` is True/False where the first report has an interval (3+ runs), NA otherwise.
    """
    keys = ["method", "budget"]
    a = first[first["class"] == PRIMARY_CLASS].set_index(keys)
    b = second[second["class"] == PRIMARY_CLASS].set_index(keys)
    rows = []
    for key in a.index:
        row = a.loc[key]
        second_mean = float(b.loc[key, "dice_mean"]) if key in b.index else math.nan
        has_ci = not (pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]))
        inside = (pd.NA if not has_ci or math.isnan(second_mean)
                  else bool(row["ci_low"] <= second_mean <= row["ci_high"]))
        rows.append({"method": key[0], "budget": key[1], "first_mean": float(row["dice_mean"]),
                     "first_ci_low": row["ci_low"], "first_ci_high": row["ci_high"],
                     "first_runs": int(row["n_runs"]), "second_mean": second_mean, "inside": inside})
    return pd.DataFrame(rows)


def _reproduced(cells: pd.DataFrame) -> Criterion:
    name = "cells reproduced (second mean inside first 95% CI)"
    checked = cells[cells["inside"].notna()]
    if checked.empty:
        return Criterion(name, None, "no cell of the first report has an interval (3 or more runs)")
    share = float(checked["inside"].astype(bool).mean())
    misses = [f"{r.method}@{r.budget}" for r in checked.itertuples() if not bool(r.inside)]
    detail = f"{int(checked['inside'].astype(bool).sum())} of {len(checked)} cells ({share:.0%}; need {MIN_REPRODUCED:.0%})"
    return Criterion(name, share >= MIN_REPRODUCED, detail + (f"; outside: {', '.join(misses)}" if misses else ""))


def _primary_rows(report: ReportTables, method: str) -> pd.DataFrame:
    table = report.comparisons
    return table[(table["method"] == method) & (table["class"] == PRIMARY_CLASS)]


def _negative_control(reports: list[ReportTables]) -> Criterion:
    name = f"negative control ({NEGATIVE_CONTROL} vs scratch) not significant"
    parts, verdicts = [], []
    for report in reports:
        rows = _primary_rows(report, NEGATIVE_CONTROL).dropna(subset=["p_holm"])
        if rows.empty:
            parts.append(f"{report.name}: no tested {NEGATIVE_CONTROL} row")
            verdicts.append(None)
            continue
        significant = rows[rows["p_holm"] < ALPHA]
        verdicts.append(significant.empty)
        parts.append(f"{report.name}: " + ", ".join(f"budget {r.budget} effect {r.effect:+.3f}, Holm p {r.p_holm:.3g}"
                                                     for r in rows.itertuples()))
    return Criterion(name, None if None in verdicts else all(verdicts), "; ".join(parts))


def _positive_control(reports: list[ReportTables]) -> Criterion:
    name = f"positive control ({SUPERVISED}) better than scratch at the smallest budget"
    parts, verdicts = [], []
    for report in reports:
        rows = _primary_rows(report, SUPERVISED)
        budgets = sorted(rows["budget"].unique(), key=_budget_key)
        tested = rows[rows["budget"] == budgets[0]].dropna(subset=["p_holm"]) if budgets else rows.iloc[:0]
        if tested.empty:
            parts.append(f"{report.name}: no tested {SUPERVISED} row at the smallest budget")
            verdicts.append(None)
            continue
        r = tested.iloc[0]
        verdicts.append(bool(r["p_holm"] < ALPHA and r["effect"] > 0))
        parts.append(f"{report.name}: budget {r['budget']} effect {r['effect']:+.3f}, Holm p {r['p_holm']:.3g}")
    return Criterion(name, None if None in verdicts else all(verdicts), "; ".join(parts))


def _budget_curve(reports: list[ReportTables]) -> Criterion:
    name = "scratch's Dice does not fall as the budget grows"
    parts, verdicts = [], []
    for report in reports:
        rows = report.summary[(report.summary["method"] == SCRATCH) & (report.summary["class"] == PRIMARY_CLASS)]
        curve = sorted(((b, float(m)) for b, m in zip(rows["budget"], rows["dice_mean"])), key=lambda x: _budget_key(x[0]))
        if len(curve) < 2:
            parts.append(f"{report.name}: fewer than two budgets")
            verdicts.append(None)
            continue
        verdicts.append(all(later >= earlier for (_, earlier), (_, later) in zip(curve, curve[1:])))
        parts.append(f"{report.name}: " + " -> ".join(f"{b}: {m:.3f}" for b, m in curve))
    return Criterion(name, None if None in verdicts else all(verdicts), "; ".join(parts))


def check_agreement(first: ReportTables, second: ReportTables) -> Agreement:
    """The four criteria of a study whose conclusions hold, for two reports of the same grid."""
    cells = reproduced_cells(first.summary, second.summary)
    reports = [first, second]
    return Agreement(cells, [_reproduced(cells), _negative_control(reports), _positive_control(reports),
                             _budget_curve(reports)])


def agreement_markdown(agreement: Agreement, first: str, second: str) -> str:
    """The per-cell table and the four criteria as Markdown (what `sspctl agreement` writes)."""
    verdict = {True: "holds", False: "**fails**", None: "not checked"}
    lines = [f"# Rerun agreement: {first} vs {second}", "",
             "| arm | budget | first: mean (95% CI, runs) | second: mean | inside |", "|---|---|---|---|---|"]
    for r in agreement.cells.itertuples():
        ci = "-" if pd.isna(r.first_ci_low) else f"{r.first_ci_low:.3f} to {r.first_ci_high:.3f}"
        inside = "-" if pd.isna(r.inside) else ("yes" if r.inside else "**no**")
        lines.append(f"| {r.method} | {r.budget} | {r.first_mean:.3f} ({ci}, {r.first_runs}) | {r.second_mean:.3f} | {inside} |")
    lines += ["", "| criterion | outcome | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {verdict[c.passed]} | {c.detail} |" for c in agreement.criteria]
    return "\n".join(lines) + "\n"
