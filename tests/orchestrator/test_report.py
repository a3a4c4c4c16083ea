"""``sspctl report`` on a fabricated MLflow study (real sqlite MLflow, no training).

The per-subject Dice tables are generated here from a seeded RNG, logged as artifacts of real
child runs, and the report's statistics are checked against numpy / scipy computed directly on
the generated arrays (not through the report's pandas code).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.report import ReportError, build_report
from orchestrator.study_tracking import (
    PER_SUBJECT_ARTIFACT,
    cell_run,
    grid_parent_run,
    open_study,
    set_status,
)
from orchestrator.workspace import Workspace

CLASSES = ("LV", "MYO", "RV")
PHASES = ("ED", "ES")
SUBJECTS = [f"S{i:02d}" for i in range(8)]
SEEDS = (0, 1)
BUDGETS = ("10", "all")
METHODS = ("scratch", "simclr")


def _dice(method: str, budget: str, seed: int) -> np.ndarray:
    """Dice array (subject, phase, class) of one cell; simclr at 'all' equals scratch exactly."""
    if method == "simclr" and budget == "all":
        method = "scratch"
    rng = np.random.default_rng(zlib.crc32(f"{method}/{budget}/{seed}".encode()))
    shift = 0.05 if method == "simclr" else 0.0
    return np.clip(rng.normal(0.8 + shift, 0.05, size=(len(SUBJECTS), len(PHASES), len(CLASSES))), 0, 1)


def _log_results(tracking, run_id: str, values: np.ndarray, folder: Path) -> Path:
    """Log ``values`` (subject, phase, class) as the cell's per-subject CSV and its mean Dice."""
    rows = [
        {"subject_id": s, "phase": p, "class": c, "dice": values[i, j, k]}
        for i, s in enumerate(SUBJECTS) for j, p in enumerate(PHASES) for k, c in enumerate(CLASSES)
    ]
    csv = folder / PER_SUBJECT_ARTIFACT
    csv.parent.mkdir()
    pd.DataFrame(rows).to_csv(csv, index=False)
    tracking.client.log_artifact(run_id, str(csv))
    tracking.client.log_metric(run_id, "test_dice_mean", float(values.mean()))
    return csv


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    """A study with 2 methods x 2 budgets x 2 seeds finished cells, one unfinished cell, one overlay."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    tracking = open_study(ws.tracking_uri, "s1", ws.artifact_root)
    parent = grid_parent_run(tracking, "g1", tags={"dataset_hash": "abc"})
    data = {}
    tmp = tmp_path_factory.mktemp("csv")
    # a rerun of the same method/budget/seed inside the grid: superseded by the later one below
    stale = cell_run(tracking, "ft-scratch-b10-s0-11111111", parent, tags={"method": "scratch", "budget": "10", "seed": "0"})
    (tmp / "stale").mkdir()
    pd.DataFrame([{"subject_id": s, "phase": "ED", "class": "LV", "dice": 0.0} for s in SUBJECTS]).to_csv(
        tmp / "stale" / PER_SUBJECT_ARTIFACT, index=False)
    tracking.client.log_artifact(stale, str(tmp / "stale" / PER_SUBJECT_ARTIFACT))
    tracking.client.log_metric(stale, "test_dice_mean", 0.0)
    set_status(tracking, stale, "FINISHED")
    for method in METHODS:
        for budget in BUDGETS:
            for seed in SEEDS:
                name = f"ft-{method}-b{budget}-s{seed}-00000000"
                run_id = cell_run(tracking, name, parent, tags={"method": method, "budget": budget, "seed": str(seed)})
                values = _dice(method, budget, seed)
                data[(method, budget, seed)] = values
                csv = _log_results(tracking, run_id, values, tmp / name)
                if (method, budget, seed) == ("simclr", "10", 0):
                    import matplotlib

                    matplotlib.use("Agg")
                    import matplotlib.pyplot as plt

                    fig = plt.figure(figsize=(1, 1))
                    fig.savefig(csv.parent / "overlay.png")
                    plt.close(fig)
                    tracking.client.log_artifact(run_id, str(csv.parent / "overlay.png"), "outputs")
                set_status(tracking, run_id, "FINISHED")
    cell_run(tracking, "ft-scratch-b15-s0-00000000", parent, tags={"method": "scratch", "budget": "15", "seed": "0"})
    return ws, data


@pytest.fixture(scope="module")
def report(study: tuple[Workspace, dict], tmp_path_factory: pytest.TempPathFactory):
    ws, _ = study
    return build_report("s1", ws.tracking_uri, tmp_path_factory.mktemp("report"))


def test_summary_matches_numpy(report, study) -> None:
    _, data = study
    summary = report.summary
    assert list(summary.columns[:6]) == ["method", "budget", "class", "dice_mean", "dice_sd", "n"]
    assert len(summary) == len(METHODS) * len(BUDGETS) * 4
    for method in METHODS:
        for budget in BUDGETS:
            stacked = np.stack([data[(method, budget, s)] for s in SEEDS])  # (seed, subject, phase, class)
            for k, cls in enumerate((*CLASSES, "mean")):
                values = stacked.mean(axis=-1) if cls == "mean" else stacked[..., k]
                row = summary[(summary.method == method) & (summary.budget == budget) & (summary["class"] == cls)]
                assert len(row) == 1
                assert row.dice_mean.item() == pytest.approx(values.mean(), abs=1e-9)
                assert row.dice_sd.item() == pytest.approx(values.std(ddof=1), abs=1e-9)
                assert row.n.item() == len(SEEDS) * len(SUBJECTS) * len(PHASES)
    # the unfinished cell is left out, with a note
    assert "15" not in set(summary.budget)
    assert any("ft-scratch-b15-s0" in n for n in report.notes)
    assert "cell ft-scratch-b10-s0-11111111 skipped: superseded by ft-scratch-b10-s0-00000000" in report.notes


def test_wilcoxon_is_withheld_below_three_runs(report, study) -> None:
    """Two runs per arm: the published per-subject test would compare one model with another; no p."""
    tests = report.tests
    assert set(tests.method) == {"simclr"}
    assert tests.p_value.isna().all()
    assert (tests[tests.budget == "10"].note == "withheld: 2 vs 2 run(s); 3 or more per arm needed").all()


def test_files_and_mlflow_artifacts(report, study) -> None:
    ws, _ = study
    files = report.files
    for key in ("markdown", "html", "summary_csv", "wilcoxon_csv", "plot_LV", "plot_mean"):
        assert files[key].is_file() and files[key].stat().st_size > 0, key
    page = files["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 + 1  # 4 budget plots + 1 overlay
    assert "Overlays" in page and "src=\"dice_vs_budget" not in page
    md = files["markdown"].read_text()
    assert "| method | budget | LV | MYO | RV | mean | runs |" in md
    assert "## Conclusions" in md and "not enough runs" in md  # 2 runs per arm: descriptive only
    assert pd.read_csv(files["summary_csv"]).shape[0] == len(report.summary)
    tracking = open_study(ws.tracking_uri, "s1", create=False)
    logged = {a.path for a in tracking.client.list_artifacts(report.parent_run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/summary.csv"} <= logged


def test_cli_json_and_errors(study, tmp_path: Path) -> None:
    ws, _ = study
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--study", "s1", "--output", str(ws.root), "--json", "--no-log",
                                 "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 16
    assert {"method", "budget", "class", "dice_mean", "dice_sd", "n"} <= set(rows[0])
    assert all(isinstance(r["dice_mean"], float) and not math.isnan(r["dice_mean"]) for r in rows)
    table = runner.invoke(app, ["report", "--study", "s1", "--output", str(ws.root), "--no-log",
                                "--report-dir", str(tmp_path / "r2")])
    assert table.exit_code == 0 and "simclr" in table.stdout
    assert "simclr, budget 10: not enough runs: descriptive only: 2 vs 2 run(s)" in table.stdout
    assert "p =" not in table.stdout  # two runs per arm: no p-value anywhere in the terminal summary
    missing = runner.invoke(app, ["report", "--study", "nope", "--output", str(ws.root)])
    assert missing.exit_code == 1
    assert "study 'nope' not found" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


# -- two grids on different datasets in one study ---------------------------------------------------

HASH_A, HASH_B = "a" * 64, "b" * 64


def _log_grid(tracking, grid_id: str, dataset_hash: str, offset: float, tmp: Path) -> tuple[str, dict]:
    """A finished 2 methods x budget 10 x 2 seeds grid on ``dataset_hash``; Dice shifted by ``offset``."""
    parent = grid_parent_run(tracking, grid_id, tags={"dataset_hash": dataset_hash, "split": f"/splits/{grid_id}.yaml"})
    data = {}
    for method in METHODS:
        for seed in SEEDS:
            # the same method/budget/seed as the other grid, but another cell (its hash covers the dataset)
            name = f"ft-{method}-b10-s{seed}-{dataset_hash[:8]}"
            run_id = cell_run(tracking, name, parent,
                              tags={"method": method, "budget": "10", "seed": str(seed), "dataset_hash": dataset_hash})
            values = np.clip(_dice(method, "10", seed) + offset, 0, 1)
            data[(method, seed)] = values
            _log_results(tracking, run_id, values, tmp / name)
            set_status(tracking, run_id, "FINISHED")
    return parent, data


@pytest.fixture(scope="module")
def two_grids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    """Study ``s2``: grid ``ga`` on dataset A, then (more recent) grid ``gb`` on dataset B, lower Dice."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("ws2"))
    tracking = open_study(ws.tracking_uri, "s2", ws.artifact_root)
    tmp = tmp_path_factory.mktemp("csv2")
    parent_a, data_a = _log_grid(tracking, "ga", HASH_A, 0.0, tmp)
    set_status(tracking, parent_a, "FINISHED")
    parent_b, data_b = _log_grid(tracking, "gb", HASH_B, -0.3, tmp)
    set_status(tracking, parent_b, "FINISHED")
    return ws, {"a": (parent_a, data_a), "b": (parent_b, data_b)}


def _assert_only_grid(summary: pd.DataFrame, data: dict) -> None:
    """The summary is exactly the grid's cells: values, and n not doubled by the other grid."""
    assert set(summary.budget) == {"10"} and len(summary) == len(METHODS) * 4
    for method in METHODS:
        stacked = np.stack([data[(method, s)] for s in SEEDS])
        for k, cls in enumerate((*CLASSES, "mean")):
            values = stacked.mean(axis=-1) if cls == "mean" else stacked[..., k]
            row = summary[(summary.method == method) & (summary["class"] == cls)]
            assert row.dice_mean.item() == pytest.approx(values.mean(), abs=1e-9)
            assert row.dice_sd.item() == pytest.approx(values.std(ddof=1), abs=1e-9)
            assert row.n.item() == len(SEEDS) * len(SUBJECTS) * len(PHASES)


def test_report_is_one_grid(two_grids, tmp_path: Path) -> None:
    ws, grids = two_grids
    parent_a, data_a = grids["a"]
    parent_b, data_b = grids["b"]
    latest = build_report("s2", ws.tracking_uri, tmp_path / "latest")
    assert latest.grid.name == "grid-gb" and latest.parent_run_id == parent_b
    assert latest.grid.dataset_hash == HASH_B and latest.dataset_hashes == [HASH_A, HASH_B]
    _assert_only_grid(latest.summary, data_b)
    assert not any("superseded" in n for n in latest.notes)
    assert "bbbbbbbb" in (tmp_path / "latest" / "report.md").read_text()
    # the report is logged to the reported grid only
    client = open_study(ws.tracking_uri, "s2", create=False).client
    assert client.list_artifacts(parent_b, "report") and not client.list_artifacts(parent_a, "report")
    # --grid by name, by grid id and by run id all give grid A's table
    for key in ("grid-ga", "ga", parent_a):
        chosen = build_report("s2", ws.tracking_uri, tmp_path / f"a-{key[:8]}", log_to_mlflow=False, grid=key)
        assert chosen.grid.run_id == parent_a and chosen.grid.dataset_hash == HASH_A
        _assert_only_grid(chosen.summary, data_a)
    with pytest.raises(ReportError, match=r"grid 'nope' not found in study 's2'; its grids: grid-ga \(dataset aaaaaaaa\)"):
        build_report("s2", ws.tracking_uri, tmp_path / "x", grid="nope")


def test_cli_grid_option(two_grids, tmp_path: Path) -> None:
    ws, grids = two_grids
    _, data_a = grids["a"]
    runner = CliRunner()
    base = ["report", "--study", "s2", "--output", str(ws.root), "--no-log"]
    table = runner.invoke(app, [*base, "--report-dir", str(tmp_path / "t")])
    assert table.exit_code == 0, table.output
    assert "grid grid-gb (run " in table.stdout and "dataset bbbbbbbb" in table.stdout
    assert "grids on 2 datasets (aaaaaaaa, bbbbbbbb)" in table.stdout
    result = runner.invoke(app, [*base, "--grid", "grid-ga", "--json", "--report-dir", str(tmp_path / "j")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # stdout is only the JSON rows
    assert len(rows) == len(METHODS) * 4
    assert {"method", "budget", "class", "dice_mean", "dice_sd", "n"} <= set(rows[0])
    lv = next(r for r in rows if r["method"] == "scratch" and r["class"] == "LV")
    assert lv["dice_mean"] == pytest.approx(np.stack([data_a[("scratch", s)] for s in SEEDS])[..., 0].mean())
    assert "grid grid-ga" in result.stderr and "dataset aaaaaaaa" in result.stderr
    # without --report-dir: the latest grid's report in reports/<study>/, a chosen grid's in a folder of its own
    latest = runner.invoke(app, base)
    chosen = runner.invoke(app, [*base, "--grid", "grid-ga"])
    assert latest.exit_code == 0 and chosen.exit_code == 0, latest.output + chosen.output
    reports = ws.root / "reports" / "s2"
    assert "grid-gb" in (reports / "report.md").read_text()
    assert "grid-ga" in (reports / "grid-ga" / "report.md").read_text()
    unknown = runner.invoke(app, [*base, "--grid", "nope"])
    assert unknown.exit_code == 1
    assert "grid 'nope' not found" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1


def test_resumed_grid_counts_as_most_recent(tmp_path: Path) -> None:
    """A grid that ended after a newer one started (a resumed older grid) is the default."""
    ws = Workspace.resolve(tmp_path / "ws")
    tracking = open_study(ws.tracking_uri, "s3", ws.artifact_root)
    parent_a, data_a = _log_grid(tracking, "ga", HASH_A, 0.0, tmp_path)
    parent_b, _ = _log_grid(tracking, "gb", HASH_B, -0.3, tmp_path)
    set_status(tracking, parent_b, "FINISHED")
    time.sleep(0.01)  # distinct end times in ms
    set_status(tracking, parent_a, "FINISHED")  # grid A resumed and finished last
    report = build_report("s3", ws.tracking_uri, tmp_path / "r", log_to_mlflow=False)
    assert report.parent_run_id == parent_a
    _assert_only_grid(report.summary, data_a)
    empty = open_study(ws.tracking_uri, "s4", ws.artifact_root)
    assert empty.study == "s4"
    with pytest.raises(ReportError, match="^study 's4' has no fine-tuning grid yet$"):
        build_report("s4", ws.tracking_uri, tmp_path / "r4")


# -- replicated grid: training runs as the unit, controls ---------------------------------------------

REP_SUBJECTS = [f"R{i:02d}" for i in range(10)]


def _replicate(arm: str, train_seed: int) -> np.ndarray:
    """(subject, phase, class) Dice of one run: a run-level shift shared by all its subjects.

    ``scratch-b`` is drawn exactly like ``scratch`` (A/A); ``supervised`` is 0.2 better (5 run sds).
    """
    rng = np.random.default_rng(zlib.crc32(f"{arm}/{train_seed}".encode()))
    shift = {"supervised": 0.2}.get(arm, 0.0)
    subject = np.random.default_rng(99).normal(0, 0.05, size=(len(REP_SUBJECTS), 1, 1))
    run = rng.normal(0, 0.04)
    noise = rng.normal(0, 0.01, size=(len(REP_SUBJECTS), len(PHASES), len(CLASSES)))
    return np.clip(0.7 + shift + run + subject + noise, 0, 1)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory):
    """scratch, scratch-b, supervised x 3 training seeds, simclr x 1, at budget 4 (one subset seed)."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    tracking = open_study(ws.tracking_uri, "rep", ws.artifact_root)
    parent = grid_parent_run(tracking, "g-rep", tags={"dataset_hash": "abc"})
    tmp = tmp_path_factory.mktemp("csv")
    data = {}
    for arm, seeds in (("scratch", (0, 1, 2)), ("scratch-b", (1000, 1001, 1002)), ("supervised", (0, 1, 2)),
                       ("simclr", (0,))):
        for train_seed in seeds:
            name = f"ft-{arm}-b4-s0-t{train_seed}-00000000"
            run_id = cell_run(tracking, name, parent, tags={"method": arm, "budget": "4", "seed": "0",
                                                           "train_seed": str(train_seed)})
            values = _replicate(arm, train_seed)
            data[(arm, train_seed)] = values
            folder = tmp / name
            rows = [{"subject_id": s, "phase": p, "class": c, "dice": values[i, j, k]}
                    for i, s in enumerate(REP_SUBJECTS) for j, p in enumerate(PHASES) for k, c in enumerate(CLASSES)]
            folder.mkdir()
            pd.DataFrame(rows).to_csv(folder / PER_SUBJECT_ARTIFACT, index=False)
            tracking.client.log_artifact(run_id, str(folder / PER_SUBJECT_ARTIFACT))
            tracking.client.log_metric(run_id, "test_dice_mean", float(values.mean()))
            set_status(tracking, run_id, "FINISHED")
    report = build_report("rep", ws.tracking_uri, tmp_path_factory.mktemp("rep-report"), log_to_mlflow=False)
    return report, data


def test_runs_are_the_unit(replicated) -> None:
    report, data = replicated
    runs = report.runs
    assert len(runs) == 10
    row = runs[(runs.method == "scratch-b") & (runs.train_seed == 1001)]
    assert row["mean"].item() == pytest.approx(data[("scratch-b", 1001)].mean())
    summary = report.summary.set_index(["method", "budget", "class"])
    assert summary.loc[("scratch", "4", "mean"), "n_runs"] == 3
    run_means = [data[("scratch", t)].mean() for t in (0, 1, 2)]
    assert summary.loc[("scratch", "4", "mean"), "run_sd"] == pytest.approx(np.std(run_means, ddof=1))
    assert math.isnan(summary.loc[("simclr", "4", "mean"), "ci_low"])


def test_controls_and_conclusions(replicated) -> None:
    report, data = replicated
    comp = report.comparisons.set_index(["method", "budget", "class"])
    primary = report.comparisons[report.comparisons["class"] == "mean"]
    assert set(primary.method) == {"scratch-b", "supervised", "simclr"}
    # Holm over the primary family: the two tested comparisons
    tested = primary.dropna(subset=["p_value"])
    assert len(tested) == 2
    assert sorted(tested.p_holm) == pytest.approx(sorted(
        [min(1.0, max(2 * tested.p_value.min(), v)) if v == tested.p_value.max() else 2 * v for v in tested.p_value]))
    aa = comp.loc[("scratch-b", "4", "mean")]
    assert aa.p_holm > 0.05 and aa.ci_low < 0 < aa.ci_high
    assert aa.wilcoxon_p < 0.05  # the per-subject test calls the identical recipes different

    def run_mean(arm: str, seeds: tuple[int, ...]) -> np.ndarray:
        return np.stack([data[(arm, t)] for t in seeds]).mean(axis=0).mean(axis=-1).ravel()

    expected = wilcoxon(run_mean("scratch-b", (1000, 1001, 1002)), run_mean("scratch", (0, 1, 2)))
    assert aa.wilcoxon_p == pytest.approx(expected.pvalue)
    positive = comp.loc[("supervised", "4", "mean")]
    assert positive.p_holm < 0.05 and positive.ci_low > 0
    expected = np.mean([data[("supervised", t)].mean() for t in (0, 1, 2)]) - np.mean(
        [data[("scratch", t)].mean() for t in (0, 1, 2)])
    assert positive.effect == pytest.approx(expected)
    lines = report.conclusions()
    assert any(line.startswith("supervised, budget 4: better than scratch") for line in lines)
    assert any(line.startswith("scratch-b, budget 4: no detectable difference from scratch") for line in lines)
    assert any(line.startswith("simclr, budget 4: not enough runs") for line in lines)
    assert math.isnan(comp.loc[("simclr", "4", "mean")].p_value)
    # the effect each tested comparison would find with 80% power at its family's first Holm step
    from scipy.stats import t as student_t

    from orchestrator.stats import detectable_effect

    se = (aa.ci_high - aa.effect) / student_t.ppf(0.975, aa.df)
    assert aa.detectable == pytest.approx(detectable_effect(se, aa.df, 0.05 / 2))
    assert aa.detectable > abs(aa.effect) and math.isnan(comp.loc[("simclr", "4", "mean")].detectable)
    # what the controls say about the comparison itself, after the per-arm lines
    assert lines[-2:] == [
        f"budget 4: A/A control held: two sets of scratch runs were not called different "
        f"({aa.effect:+.3f} Dice, 95% CI {aa.ci_low:+.3f} to {aa.ci_high:+.3f})",
        f"budget 4: positive control detected: better than scratch "
        f"({positive.effect:+.3f} Dice, 95% CI {positive.ci_low:+.3f} to {positive.ci_high:+.3f})",
    ]
