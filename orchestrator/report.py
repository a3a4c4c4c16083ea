"""The study report: the paper's table, comparisons with scratch that count training runs, plots, files.

Input: the finished cell runs of **one** fine-tuning grid of an MLflow study (experiment) and their
per-subject Dice tables (artifact ``per_subject_dice.csv``, rows ``subject_id, phase, class, dice``).

- Grid: by default the study's most recent grid parent run (the one that started or ended last, so
  a resumed older grid counts as recent); ``grid=`` picks another by run name (``grid-{id}``), grid
  id or run id. Only that grid's child cells are read, so grids on another dataset or split never
  mix into the table. Within the grid, an arm x budget x subset seed x training seed counted twice
  (a rerun) counts once, from the FINISHED run that ended last.

- Table: for each arm x budget and each class (LV, MYO, RV, and ``mean`` = mean of the three
  classes per subject-phase), the mean over runs and test subject-phases, the sd of the per-run
  means, and a 95% interval from the two-level (run, subject) model of ``orchestrator/stats.py``;
  also the pooled sd over all values (``dice_sd``) as before.
- Comparisons with scratch (``comparisons.csv``): the training run is the unit (``stats.compare_arms``),
  paired by subset seed and test subjects; a test only with 3+ runs per arm, else "descriptive
  only". Holm's correction over the whole table's primary family (class ``mean``, every arm and
  budget) and separately over the per-class family. One sentence per arm and budget says what can
  be concluded.
- The published per-subject Wilcoxon (``wilcoxon.csv``) is kept as a labelled secondary column: it
  pairs test subject-phases of seed-averaged Dice and ignores training-run variance, so it calls
  identical recipes different; it is there to compare with the paper, not to conclude from.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.arms import ARMS, SCRATCH, arm_order
from orchestrator.stats import (
    ALPHA, MIN_RUNS, arm_estimate, compare_arms, conclusion, control_verdict, detectable_effect, holm,
)
from orchestrator.study_tracking import (
    COMPLETION_METRIC,
    KEY_TAG,
    KIND_CELL,
    KIND_TAG,
    PARENT_TAG,
    PER_SUBJECT_ARTIFACT,
    StudyTracking,
    find_runs,
    grid_runs,
    open_study,
    run_tag,
)

log = logging.getLogger("sspctl.report")

CLASSES = ("LV", "MYO", "RV")
MEAN = "mean"
#: Below this many pairs a two-sided Wilcoxon test cannot reach p < 0.05.
MIN_PAIRS_FOR_SIGNIFICANCE = 6
RUN_KEYS = ["method", "budget", "seed", "train_seed"]


class ReportError(ValueError):
    """The study cannot be reported (missing, unknown grid, or no finished cells); one line."""


@dataclass(frozen=True)
class GridInfo:
    """One grid parent run of a study, as the report names and selects it."""

    run_id: str
    name: str
    grid_id: str
    dataset_hash: str
    split: str
    status: str
    #: Latest of the run's start and end time (ms since the epoch): "most recent" means largest.
    last_activity_ms: int

    @property
    def dataset_label(self) -> str:
        """Short form of the dataset hash for messages (``?`` when the run has no such tag)."""
        return self.dataset_hash[:8] or "?"

    def describe(self) -> str:
        """``grid-… (run <id>, dataset <hash8>, split <path>)`` for terminal output and notes."""
        split = f", split {self.split}" if self.split else ""
        return f"{self.name} (run {self.run_id}, dataset {self.dataset_label}{split})"


@dataclass
class Report:
    """Everything ``build_report`` produced: tables, notes, the files written and the grid reported."""

    study: str
    summary: pd.DataFrame
    #: The published per-subject Wilcoxon (secondary; ignores training-run variance).
    tests: pd.DataFrame
    #: Run-level comparisons with scratch (``comparison_table``), the primary result.
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: One row per training run: its mean Dice per class.
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The reported grid's parent run (the report is logged there).
    parent_run_id: str | None = None
    grid: GridInfo | None = None
    #: Every grid of the study, least recent first (the reported one included).
    grids: list[GridInfo] = field(default_factory=list)

    @property
    def dataset_hashes(self) -> list[str]:
        """Distinct dataset hashes of the study's grids, in order of first appearance."""
        return list(dict.fromkeys(g.dataset_hash for g in self.grids))

    def grid_line(self) -> str:
        """One line naming the grid (and dataset) the table is for, with a hint when others exist."""
        if self.grid is None:
            return "grid: unknown"
        line = f"grid {self.grid.describe()}"
        others = len(self.grids) - 1
        if len(self.dataset_hashes) > 1:
            labels = ", ".join(h[:8] or "?" for h in self.dataset_hashes)
            line += (f"; the study has grids on {len(self.dataset_hashes)} datasets ({labels}): this table covers "
                     f"dataset {self.grid.dataset_label} only, choose another grid with --grid")
        elif others > 0:
            line += f"; {others} other grid{'s' if others > 1 else ''} in the study (--grid to choose)"
        return line

    def rows(self) -> list[dict[str, Any]]:
        """Summary rows as JSON-ready dicts (``method, budget, class, dice_mean, dice_sd, n, ...``)."""
        return [_json_row(r) for r in self.summary.to_dict(orient="records")]

    def test_rows(self) -> list[dict[str, Any]]:
        return [_json_row(r) for r in self.tests.to_dict(orient="records")]

    def comparison_rows(self) -> list[dict[str, Any]]:
        return [_json_row(r) for r in self.comparisons.to_dict(orient="records")]

    def conclusions(self) -> list[str]:
        """One sentence per arm and budget (class ``mean``): what the grid lets one conclude; then,
        per control arm and budget, what the control says about the comparison itself."""
        if self.comparisons.empty:
            return []
        primary = self.comparisons[self.comparisons["class"] == MEAN]
        lines = [f"{r.method}, budget {r.budget}: {r.conclusion}" for r in primary.itertuples(index=False)]
        return lines + [f"budget {r.budget}: {r.control}" for r in primary.itertuples(index=False) if r.control]


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, float) and math.isnan(value):
            value = None
        elif hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


# -- ordering helpers ----------------------------------------------------------------------------


def budget_key(budget: Any) -> tuple[int, float]:
    """Sort key: numeric budgets ascending, then ``all``."""
    text = str(budget)
    return (1, math.inf) if text == "all" else (0, float(text))


def method_key(method: str) -> tuple[int, str]:
    return (arm_order(method), method)


def _sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    keys = frame.apply(
        lambda r: (method_key(r["method"]), budget_key(r["budget"]),
                   (CLASSES + (MEAN,)).index(r["class"]) if r["class"] in CLASSES + (MEAN,) else 9),
        axis=1,
    )
    return frame.assign(_k=keys).sort_values("_k").drop(columns="_k").reset_index(drop=True)


# -- loading ------------------------------------------------------------------------------------


def _grid_info(run: Any) -> GridInfo:
    tags = run.data.tags
    return GridInfo(
        run_id=run.info.run_id,
        name=run.info.run_name or f"grid-{tags.get(KEY_TAG, '?')}",
        grid_id=tags.get(KEY_TAG, ""),
        dataset_hash=run_tag(run, "dataset_hash"),
        split=run_tag(run, "split"),
        status=run.info.status,
        last_activity_ms=max(run.info.start_time or 0, run.info.end_time or 0),
    )


def study_grids(study: StudyTracking) -> list[GridInfo]:
    """The study's grid parent runs, least recent first (by the latest of start and end time)."""
    infos = [_grid_info(run) for run in grid_runs(study)]  # oldest start first: ties keep that order
    return sorted(infos, key=lambda g: g.last_activity_ms)


def select_grid(grids: Sequence[GridInfo], study: str, grid: str | None = None) -> GridInfo:
    """The grid to report: ``grid`` (run name ``grid-{id}``, grid id or run id), else the most recent.

    Args:
        grids: the study's grids, least recent first (``study_grids``).
        study: the study name, for messages.
        grid: the grid asked for, or None for the most recent one.

    Raises:
        ReportError: the study has no grid, or none matches ``grid``.
    """
    if not grids:
        raise ReportError(f"study {study!r} has no fine-tuning grid yet")
    if grid is None:
        return grids[-1]
    wanted = grid.strip()
    matches = [g for g in grids if wanted in (g.run_id, g.name, g.grid_id, f"grid-{g.grid_id}")]
    if not matches:
        known = ", ".join(f"{g.name} (dataset {g.dataset_label})" for g in grids)
        raise ReportError(f"grid {grid!r} not found in study {study!r}; its grids: {known}")
    return matches[-1]


def grid_cell_runs(study: StudyTracking, grid: GridInfo) -> list[Any]:
    """The cell runs whose parent is ``grid`` (oldest first)."""
    return find_runs(study, {KIND_TAG: KIND_CELL, PARENT_TAG: grid.run_id})


def load_grid_table(study: StudyTracking, grid: GridInfo, cache_dir: Path) -> tuple[pd.DataFrame, list[Any], list[str]]:
    """Per-subject Dice of every finished cell of one grid of ``study``.

    Returns ``(table, runs, notes)``: table columns ``method, budget, seed, run_id, cell, subject_id,
    phase, class, dice`` (budget as string); the finished cell runs; notes on skipped runs.

    Raises:
        ReportError: the grid has no finished cell with a readable per-subject table.
    """
    from orchestrator.results import normalise_dice_table

    notes: list[str] = []
    frames = []
    finished = []
    latest: dict[tuple[str, str, str], Any] = {}
    for run in grid_cell_runs(study, grid):
        name = run.info.run_name
        cell_hash = run_tag(run, "dataset_hash")
        if cell_hash and grid.dataset_hash and cell_hash != grid.dataset_hash:
            notes.append(f"cell {name} skipped: dataset {cell_hash[:8]} differs from its grid's {grid.dataset_label}")
            continue
        if run.info.status != "FINISHED" or COMPLETION_METRIC not in run.data.metrics:
            notes.append(f"cell {name} skipped: not finished ({run.info.status})")
            continue
        # A cell rerun inside the grid (the same arm, budget and seeds twice) counts once, from the
        # run that finished last.
        seed = run_tag(run, "seed", "0")
        key = (run_tag(run, "method", "?"), run_tag(run, "budget", "?"), seed, run_tag(run, "train_seed", seed))
        previous = latest.get(key)
        if previous is not None and (previous.info.end_time or 0) > (run.info.end_time or 0):
            notes.append(f"cell {name} skipped: superseded by {previous.info.run_name}")
            continue
        if previous is not None:
            notes.append(f"cell {previous.info.run_name} skipped: superseded by {name}")
        latest[key] = run
    for run in latest.values():
        name = run.info.run_name
        try:
            local = study.client.download_artifacts(run.info.run_id, PER_SUBJECT_ARTIFACT, str(cache_dir / name))
            table = normalise_dice_table(pd.read_csv(local))
        except Exception as exc:  # noqa: BLE001 - one broken cell must not sink the report
            notes.append(f"cell {name} skipped: no readable {PER_SUBJECT_ARTIFACT} ({str(exc).splitlines()[0][:120]})")
            continue
        table = table.assign(
            method=run_tag(run, "method", "?"), budget=run_tag(run, "budget", "?"), seed=int(run_tag(run, "seed", "0")),
            train_seed=int(run_tag(run, "train_seed", run_tag(run, "seed", "0"))), run_id=run.info.run_id, cell=name,
        )
        frames.append(table)
        finished.append(run)
    if not frames:
        raise ReportError(f"grid {grid.name} of study {study.study!r} has no finished fine-tuning cells yet")
    columns = ["method", "budget", "seed", "train_seed", "run_id", "cell", "subject_id", "phase", "class", "dice"]
    return pd.concat(frames, ignore_index=True)[columns], finished, notes


def with_mean_class(table: pd.DataFrame) -> pd.DataFrame:
    """Add rows of class ``mean``: per (cell, subject, phase), the mean Dice of LV, MYO and RV."""
    keys = ["method", "budget", "seed", "train_seed", "run_id", "cell", "subject_id", "phase"]
    keys = [k for k in keys if k in table.columns]
    per_class = table[table["class"].isin(CLASSES)]
    mean = per_class.groupby(keys, as_index=False)["dice"].mean().assign(**{"class": MEAN})
    return pd.concat([per_class, mean[per_class.columns]], ignore_index=True)


# -- statistics ---------------------------------------------------------------------------------


def _with_train_seed(table: pd.DataFrame) -> pd.DataFrame:
    """Tables from older grids have no ``train_seed``: their training seed was the subset seed."""
    return table if "train_seed" in table.columns else table.assign(train_seed=table["seed"])


def run_matrices(full: pd.DataFrame) -> dict[tuple[str, str, str], dict[int, pd.DataFrame]]:
    """``(arm, budget, class) -> {subset seed: (runs x subject-phases) Dice}`` from a table with ``mean`` rows.

    Rows are the training seeds of one subset seed, columns ``(subject_id, phase)`` sorted.
    """
    matrices: dict[tuple[str, str, str], dict[int, pd.DataFrame]] = {}
    for (method, budget, cls, seed), group in full.groupby(["method", "budget", "class", "seed"]):
        wide = group.pivot_table(index="train_seed", columns=["subject_id", "phase"], values="dice", aggfunc="mean")
        matrices.setdefault((method, budget, cls), {})[int(seed)] = wide.sort_index(axis=1)
    return matrices


def runs_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per training run: ``method, budget, seed, train_seed, cell`` and its mean Dice per class."""
    full = with_mean_class(_with_train_seed(table))
    per_run = full.groupby([*RUN_KEYS, "cell", "class"], as_index=False)["dice"].mean()
    wide = per_run.pivot_table(index=[*RUN_KEYS, "cell"], columns="class", values="dice").reset_index()
    wide.columns.name = None
    order = wide.apply(lambda r: (method_key(r["method"]), budget_key(r["budget"]), r["seed"], r["train_seed"]), axis=1)
    return wide.assign(_k=order).sort_values("_k").drop(columns="_k").reset_index(drop=True)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Dice per arm x budget x class (incl. ``mean``), with runs as the unit of replication.

    Columns: ``method, budget, class, dice_mean`` (over runs and subject-phases), ``dice_sd``
    (pooled over all values, ddof 1), ``n`` (values), ``n_seeds`` (subset seeds), ``n_runs``,
    ``run_sd`` (sd of the per-run means), ``ci_low``/``ci_high`` (95%, ``stats.arm_estimate`` on
    all runs; NaN below 2 runs).
    """
    full = with_mean_class(_with_train_seed(table))
    grouped = full.groupby(["method", "budget", "class"])
    summary = grouped["dice"].agg(dice_mean="mean", dice_sd=lambda s: s.std(ddof=1), n="count").reset_index()
    summary["n_seeds"] = grouped["seed"].nunique().values
    estimates = {}
    for key, blocks in run_matrices(full).items():
        matrix = pd.concat(blocks.values(), axis=0, ignore_index=True).dropna(axis=1)
        estimates[key] = arm_estimate(matrix.to_numpy()) if matrix.shape[1] else None
    for column in ("n_runs", "run_sd", "ci_low", "ci_high"):
        summary[column] = [
            getattr(estimates.get((m, b, c)), column, math.nan)  # getattr(None, ...) gives the NaN default
            for m, b, c in zip(summary["method"], summary["budget"], summary["class"])
        ]
    summary["dice_mean"] = [
        estimates[(m, b, c)].mean if estimates.get((m, b, c)) else v
        for m, b, c, v in zip(summary["method"], summary["budget"], summary["class"], summary["dice_mean"])
    ]
    return _sorted_frame(summary)


def comparison_table(table: pd.DataFrame, alpha: float = ALPHA, tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every arm against scratch per budget and class, runs as the unit (``stats.compare_arms``).

    Columns: ``method, budget, class, role, n_runs, n_runs_scratch, effect, ci_low, ci_high, df,
    p_value, p_holm, detectable, family, conclusion, control, wilcoxon_p``: ``detectable`` is the
    effect the comparison finds with 80% power at its family's Bonferroni level (Holm's first
    step; ``stats.detectable_effect``), ``control`` says what a control
    arm's result means for the comparison itself (empty for methods), ``wilcoxon_p`` is the
    published per-subject test (secondary).
    ``family`` is ``primary`` for class ``mean`` (Holm over every arm and budget of the table) and
    ``per-class`` for LV/MYO/RV (Holm over those). Arms without a scratch cell at the budget are
    left out; subject-phases missing from any run of either arm are dropped from that comparison.
    """
    full = with_mean_class(_with_train_seed(table))
    matrices = run_matrices(full)
    rows = []
    for (method, budget, cls), blocks in matrices.items():
        reference = matrices.get((SCRATCH, budget, cls))
        if method == SCRATCH or reference is None:
            continue
        arm, ref = {}, {}
        for seed in set(blocks) & set(reference):
            joined = pd.concat([blocks[seed], reference[seed]], axis=0, keys=["arm", "ref"]).dropna(axis=1)
            arm[seed] = joined.loc["arm"].to_numpy()
            ref[seed] = joined.loc["ref"].to_numpy()
        if not arm:
            continue
        result = compare_arms(arm, ref, alpha)
        rows.append({
            "method": method, "budget": budget, "class": cls,
            "role": ARMS[method].role if method in ARMS else "method",
            "n_runs": result.n_runs, "n_runs_scratch": result.n_runs_ref, "effect": result.effect,
            "ci_low": result.ci_low, "ci_high": result.ci_high, "df": result.df, "p_value": result.p_value,
            "note": result.note, "_result": result,
        })
    columns = ["method", "budget", "class", "role", "n_runs", "n_runs_scratch", "effect", "ci_low", "ci_high",
               "df", "p_value", "p_holm", "detectable", "family", "conclusion", "control", "wilcoxon_p"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    frame["family"] = ["primary" if c == MEAN else "per-class" for c in frame["class"]]
    frame["p_holm"] = math.nan
    frame["detectable"] = math.nan
    for family, part in frame.groupby("family"):
        frame.loc[part.index, "p_holm"] = holm(part["p_value"].tolist())
        level = alpha / max(1, int(part["p_value"].notna().sum()))  # Holm's first step: Bonferroni
        frame.loc[part.index, "detectable"] = [detectable_effect(r.se, r.df, level) for r in part["_result"]]
    frame["conclusion"] = [conclusion(r, p, SCRATCH, alpha, d)
                           for r, p, d in zip(frame["_result"], frame["p_holm"], frame["detectable"])]
    frame["control"] = [control_verdict(role, r, p, alpha, d) or ""
                        for role, r, p, d in zip(frame["role"], frame["_result"], frame["p_holm"], frame["detectable"])]
    tests = wilcoxon_table(table) if tests is None else tests  # the report passes the one it already has
    wilcoxon = tests.set_index(["method", "budget", "class"])["p_value"]
    frame["wilcoxon_p"] = [wilcoxon.get((m, b, c), math.nan) for m, b, c in zip(frame["method"], frame["budget"], frame["class"])]
    return _sorted_frame(frame[columns])


def wilcoxon_table(table: pd.DataFrame) -> pd.DataFrame:
    """The published per-subject test: paired two-sided Wilcoxon signed-rank of each arm vs scratch.

    Pairs are (subject_id, phase) values averaged over runs. Columns: ``method, budget, class,
    n_pairs, median_diff, statistic, p_value, note`` (``p_value`` NaN with a note when the test is
    undefined: no pairs, all differences zero; or withheld: either arm has fewer than
    ``stats.MIN_RUNS`` training runs, where the test would only measure one model against another).
    """
    from scipy.stats import wilcoxon

    full = with_mean_class(_with_train_seed(table))
    runs = full.groupby(["method", "budget"])[["seed", "train_seed"]].apply(lambda g: len(g.drop_duplicates()))
    per_pair = full.groupby(["method", "budget", "class", "subject_id", "phase"], as_index=False)["dice"].mean()
    rows = []
    for (method, budget, cls), group in per_pair.groupby(["method", "budget", "class"]):
        if method == SCRATCH:
            continue
        base = per_pair[(per_pair["method"] == SCRATCH) & (per_pair["budget"] == budget) & (per_pair["class"] == cls)]
        paired = group.merge(base, on=["subject_id", "phase"], suffixes=("", "_scratch"))
        diffs = paired["dice"] - paired["dice_scratch"]
        row = {"method": method, "budget": budget, "class": cls, "n_pairs": len(paired),
               "median_diff": float(diffs.median()) if len(paired) else math.nan,
               "statistic": math.nan, "p_value": math.nan, "note": ""}
        n_runs = (int(runs.get((method, budget), 0)), int(runs.get((SCRATCH, budget), 0)))
        if len(paired) == 0:
            row["note"] = "no scratch cell with the same subjects at this budget"
        elif min(n_runs) < MIN_RUNS:
            row["note"] = f"withheld: {n_runs[0]} vs {n_runs[1]} run(s); {MIN_RUNS} or more per arm needed"
        elif (diffs == 0).all():
            row["note"] = "all paired differences are zero"
        else:
            try:
                result = wilcoxon(paired["dice"].to_numpy(), paired["dice_scratch"].to_numpy())
                row["statistic"], row["p_value"] = float(result.statistic), float(result.pvalue)
            except ValueError as exc:
                row["note"] = str(exc).splitlines()[0]
            if len(paired) < MIN_PAIRS_FOR_SIGNIFICANCE and not row["note"]:
                row["note"] = f"only {len(paired)} pairs: p cannot reach 0.05"
        rows.append(row)
    columns = ["method", "budget", "class", "n_pairs", "median_diff", "statistic", "p_value", "note"]
    if not rows:
        return pd.DataFrame(columns=columns)
    return _sorted_frame(pd.DataFrame(rows, columns=columns))


def pivot_table(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The paper's layout: one row per arm x budget, one ``mean (95% CI)`` column per class, the run count.

    With one run there is no interval: the cell shows the mean alone and ``runs`` says 1.
    """
    rows = []
    for (method, budget), group in summary.groupby(["method", "budget"], sort=False):
        row: dict[str, Any] = {"method": method, "budget": budget}
        for _, item in group.iterrows():
            interval = ""
            if not pd.isna(item.get("ci_low", math.nan)):
                interval = f" ({item['ci_low']:.{digits}f}-{item['ci_high']:.{digits}f})"
            row[item["class"]] = f"{item['dice_mean']:.{digits}f}{interval}"
        runs = group["n_runs"].max() if "n_runs" in group else math.nan
        row["runs"] = int(runs) if not pd.isna(runs) else int(group["n_seeds"].max())
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame[["method", "budget", *[c for c in (*CLASSES, MEAN) if c in frame.columns], "runs"]]


# -- figures -------------------------------------------------------------------------------------


def plot_dice_vs_budget(summary: pd.DataFrame, output: Path) -> dict[str, Path]:
    """One PNG per class (and ``mean``): Dice (mean ± sd) against label budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(summary["budget"].unique(), key=budget_key)
    positions = {b: i for i, b in enumerate(budgets)}
    paths = {}
    for cls in (*CLASSES, MEAN):
        part = summary[summary["class"] == cls]
        if part.empty:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        methods = sorted(part["method"].unique(), key=method_key)
        for i, method in enumerate(methods):
            rows = part[part["method"] == method].sort_values("budget", key=lambda s: s.map(budget_key))
            dodge = (i - (len(methods) - 1) / 2) * 0.06  # keep overlapping error bars apart
            x = [positions[b] + dodge for b in rows["budget"]]
            ax.errorbar(x, rows["dice_mean"], yerr=rows["dice_sd"].fillna(0), marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.set_xlabel("labelled training subjects")
        ax.set_ylabel("3D Dice")
        ax.set_title(f"Dice vs label budget: {cls}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output / f"dice_vs_budget_{cls}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[cls] = path
    return paths


def collect_overlays(study: StudyTracking, runs: Sequence[Any], output: Path) -> list[tuple[str, Path]]:
    """Download one overlay figure per method x budget (lowest seed), if the cells logged any.

    An overlay is any logged ``.png`` artifact whose name contains ``overlay``.
    """
    chosen: dict[tuple[str, str], Any] = {}
    for run in sorted(runs, key=lambda r: int(run_tag(r, "seed", "0"))):
        key = (run_tag(run, "method", "?"), run_tag(run, "budget", "?"))
        chosen.setdefault(key, run)
    found = []
    for (method, budget), run in sorted(chosen.items(), key=lambda kv: (method_key(kv[0][0]), budget_key(kv[0][1]))):
        try:
            path = _find_artifact(study, run.info.run_id, "", lambda p: p.endswith(".png") and "overlay" in p.lower())
            if path is None:
                continue
            target = output / run.info.run_name
            target.mkdir(parents=True, exist_ok=True)
            local = study.client.download_artifacts(run.info.run_id, path, str(target))
            found.append((f"{method}, budget {budget} ({run.info.run_name})", Path(local)))
        except Exception as exc:  # noqa: BLE001 - a missing figure is not worth failing the report
            log.warning("overlay of %s not available (%s)", run.info.run_name, exc)
    return found


def _find_artifact(study: StudyTracking, run_id: str, path: str, match: Any, depth: int = 3) -> str | None:
    for item in study.client.list_artifacts(run_id, path or None):
        if item.is_dir and depth > 0:
            hit = _find_artifact(study, run_id, item.path, match, depth - 1)
            if hit:
                return hit
        elif match(item.path):
            return item.path
    return None


# -- writing -------------------------------------------------------------------------------------


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (NaN shown as ``-``)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_report(
    report: Report, output: Path, plots: dict[str, Path], overlays: list[tuple[str, Path]]
) -> dict[str, Path]:
    """Write ``summary.csv``, ``comparisons.csv``, ``runs.csv``, ``wilcoxon.csv``, ``report.md``, ``report.html``."""
    pivot = pivot_table(report.summary)
    files = {"summary_csv": output / "summary.csv", "comparisons_csv": output / "comparisons.csv",
             "runs_csv": output / "runs.csv", "wilcoxon_csv": output / "wilcoxon.csv",
             "markdown": output / "report.md", "html": output / "report.html"}
    report.summary.to_csv(files["summary_csv"], index=False)
    report.comparisons.to_csv(files["comparisons_csv"], index=False)
    report.runs.to_csv(files["runs_csv"], index=False)
    report.tests.to_csv(files["wilcoxon_csv"], index=False)
    conclusions = report.conclusions()
    title = f"Fine-tuning study {report.study}"
    if report.grid is not None:
        title += f", {report.grid.name} (dataset {report.grid.dataset_label})"
    intro = ("3D Dice on the test subjects (ED and ES): mean over training runs and subject-phases, with a 95% "
             "interval that counts training runs and test subjects (runs = subset seeds x training seeds); "
             "`mean` is the mean of LV, MYO and RV per subject-phase. Comparisons with scratch treat the "
             "training run as the unit, pair runs by subset seed and test subjects, need 3 or more runs per arm, "
             "and are Holm-corrected over the whole table. The per-subject Wilcoxon p (the published analysis) "
             "ignores training-run variance and is shown for comparison only.")
    comparison_view = report.comparisons[[c for c in report.comparisons.columns if c not in ("conclusion", "control")]]
    grid_line = f"Reported {report.grid_line()}." if report.grid is not None else ""
    md = [f"# {title}", "", intro, "", grid_line, "", "## Conclusions", ""]
    md += [f"- {line}" for line in conclusions] or ["- no arm besides scratch"]
    md += ["", "## Dice", "", markdown_table(pivot), "",
           "## Comparisons with scratch (training runs as the unit)", "", markdown_table(comparison_view), "",
           "## Runs", "", markdown_table(report.runs), "",
           "## Per-subject Wilcoxon signed-rank tests (published analysis, secondary)", "",
           markdown_table(report.tests), ""]
    md += ["## Dice vs label budget", ""] + [f"![{cls}]({p.name})" for cls, p in plots.items()] + [""]
    if overlays:
        md += ["## Overlays", ""] + [f"![{label}]({p.relative_to(output)})" for label, p in overlays] + [""]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    files["markdown"].write_text("\n".join(md))

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:540px;margin:4px}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
             f"<p>{html.escape(grid_line)}</p>",
             "<h2>Conclusions</h2><ul>", "".join(f"<li>{html.escape(line)}</li>" for line in conclusions), "</ul>",
             "<h2>Dice</h2>", pivot.to_html(index=False, na_rep="-"),
             "<h2>Comparisons with scratch (training runs as the unit)</h2>",
             comparison_view.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"),
             "<h2>Runs</h2>", report.runs.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"),
             "<h2>Per-subject Wilcoxon signed-rank tests (published analysis, secondary)</h2>",
             report.tests.to_html(index=False, na_rep="-"),
             "<h2>Dice vs label budget</h2>", "".join(_embed(p) for p in plots.values())]
    if overlays:
        parts += ["<h2>Overlays</h2>"] + [f"<figure>{_embed(p)}<figcaption>{html.escape(label)}</figcaption></figure>"
                                          for label, p in overlays]
    if report.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in report.notes] + ["</ul>"]
    parts.append("</body></html>")
    files["html"].write_text("".join(parts))
    return files


def build_report(
    study: str,
    tracking_uri: str,
    output: Path,
    log_to_mlflow: bool = True,
    grid: str | None = None,
) -> Report:
    """Read one grid of ``study`` from MLflow, compute the table and tests, write the files, log them.

    Args:
        study: MLflow experiment name of the study.
        tracking_uri: MLflow backend (``Workspace.tracking_uri``).
        output: directory for ``report.md``, ``report.html``, ``summary.csv``, ``wilcoxon.csv``,
            ``dice_vs_budget_<class>.png`` and ``overlays/``.
        log_to_mlflow: log the output directory under ``report/`` of the reported grid's parent run.
        grid: the grid to report (run name ``grid-{id}``, grid id or parent run id); default the
            study's most recent grid.

    Raises:
        ReportError: the study does not exist, has no grid, ``grid`` is unknown, or the grid has no
            finished cells.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        tracking = open_study(tracking_uri, study, create=False)
    except LookupError as exc:
        raise ReportError(str(exc)) from None
    grids = study_grids(tracking)
    chosen = select_grid(grids, study, grid)
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    table, runs, notes = load_grid_table(tracking, chosen, output / ".cache")
    tests = wilcoxon_table(table)
    report = Report(study=study, summary=summary_table(table), tests=tests,
                    comparisons=comparison_table(table, tests=tests), runs=runs_table(table), notes=notes,
                    parent_run_id=chosen.run_id, grid=chosen, grids=list(grids))
    for row in report.test_rows():
        if row["note"] and not row["note"].startswith("withheld"):  # the comparisons table says why
            report.notes.append(f"{row['method']} vs scratch, budget {row['budget']}, {row['class']}: {row['note']}")
    plots = plot_dice_vs_budget(report.summary, output)
    overlays = collect_overlays(tracking, runs, output / "overlays")
    report.files = write_report(report, output, plots, overlays)
    from orchestrator.breakdown import write_breakdown  # per dataset and test vendor (issue 12)

    store_path = run_tag(tracking.client.get_run(chosen.run_id), "store")
    report.files.update(write_breakdown(table, store_path, chosen.split, output))
    report.files.update({f"plot_{cls}": p for cls, p in plots.items()})
    (output / "summary.json").write_text(json.dumps(report.rows(), indent=1))
    report.files["json"] = output / "summary.json"
    if log_to_mlflow:
        from orchestrator.tracking import MlflowTracker

        tracker = MlflowTracker(tracking_uri, chosen.run_id)
        for path in [*report.files.values(), *(p for _, p in overlays)]:
            rel = path.parent.relative_to(output)
            tracker.log_artifact(path, "report" if str(rel) == "." else f"report/{rel}")
    return report
