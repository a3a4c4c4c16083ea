"""The four rerun criteria (orchestrator/agreement.py) on constructed report tables, and the command."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from orchestrator.agreement import AgreementError, ReportTables, check_agreement, read_report
from orchestrator.cli import app

ARMS = ["scratch", "simclr", "pcl", "dino", "mim", "scratch-b", "supervised"]


def _summary(shift: dict[tuple[str, str], float] | None = None, scratch_all: float = 0.90) -> pd.DataFrame:
    """Mean-class rows for 7 arms x budgets 4/all; every cell 0.80 +- 0.05 except scratch@all."""
    rows = []
    for arm in ARMS:
        for budget in ("4", "all"):
            mean = scratch_all if (arm, budget) == ("scratch", "all") else 0.80
            mean += (shift or {}).get((arm, budget), 0.0)
            rows.append({"method": arm, "budget": budget, "class": "mean", "dice_mean": mean, "n_runs": 3,
                         "ci_low": mean - 0.05, "ci_high": mean + 0.05})
            rows.append({"method": arm, "budget": budget, "class": "LV", "dice_mean": 0.0, "n_runs": 3,
                         "ci_low": 0.0, "ci_high": 1.0})
    return pd.DataFrame(rows)


def _comparisons(p_aa: float = 0.9, p_pos: float = 0.01, effect_pos: float = 0.1) -> pd.DataFrame:
    rows = []
    for arm in ARMS[1:]:
        for budget in ("4", "all"):
            p, effect = 0.5, 0.0
            if arm == "scratch-b":
                p = p_aa
            if arm == "supervised" and budget == "4":
                p, effect = p_pos, effect_pos
            rows.append({"method": arm, "budget": budget, "class": "mean", "effect": effect, "p_holm": p,
                         "role": "method"})
    return pd.DataFrame(rows)


def _report(name: str, **kw: object) -> ReportTables:
    summary_kw = {k: kw.pop(k) for k in ("shift", "scratch_all") if k in kw}
    return ReportTables(name, _summary(**summary_kw), _comparisons(**kw))  # type: ignore[arg-type]


def _verdicts(first: ReportTables, second: ReportTables) -> list[bool | None]:
    return [c.passed for c in check_agreement(first, second).criteria]


def test_two_agreeing_runs_pass_all_four():
    result = check_agreement(_report("a"), _report("b", shift={("dino", "4"): 0.04}))
    assert [c.passed for c in result.criteria] == [True, True, True, True]
    assert result.passed
    assert len(result.cells) == 14  # the primary class only, one row per arm x budget


def test_cells_outside_the_first_interval_fail_below_90_percent():
    # 1 of 14 outside (93%) still holds; 2 of 14 (86%) fails, and the detail names them.
    one = _report("b", shift={("pcl", "4"): 0.06})
    assert _verdicts(_report("a"), one)[0] is True
    two = check_agreement(_report("a"), _report("b", shift={("pcl", "4"): 0.06, ("mim", "all"): -0.2}))
    assert two.criteria[0].passed is False
    assert "pcl@4" in two.criteria[0].detail and "mim@all" in two.criteria[0].detail


def test_a_significant_aa_control_in_either_run_fails():
    assert _verdicts(_report("a"), _report("b", p_aa=0.01))[1] is False
    assert _verdicts(_report("a", p_aa=0.049), _report("b"))[1] is False
    assert _verdicts(_report("a", p_aa=0.05), _report("b"))[1] is True


def test_the_positive_control_must_be_significant_and_better_in_both():
    assert _verdicts(_report("a"), _report("b", p_pos=0.2))[2] is False
    assert _verdicts(_report("a"), _report("b", effect_pos=-0.1))[2] is False  # significant but worse


def test_scratch_falling_with_budget_fails():
    assert _verdicts(_report("a", scratch_all=0.75), _report("b"))[3] is False


def test_a_missing_arm_is_not_checked_and_never_passes():
    a = _report("a")
    a = ReportTables("a", a.summary, a.comparisons[a.comparisons["method"] != "supervised"])
    result = check_agreement(a, _report("b"))
    assert result.criteria[2].passed is None and "no tested supervised" in result.criteria[2].detail
    assert not result.passed


def test_read_report_names_the_missing_file_and_column(tmp_path: Path):
    with pytest.raises(AgreementError, match="summary.csv: not found"):
        read_report(tmp_path)
    _summary().drop(columns=["ci_low"]).to_csv(tmp_path / "summary.csv", index=False)
    _comparisons().to_csv(tmp_path / "comparisons.csv", index=False)
    with pytest.raises(AgreementError, match=r"summary.csv: missing column\(s\) ci_low"):
        read_report(tmp_path)


def _write(folder: Path, report: ReportTables) -> Path:
    folder.mkdir()
    report.summary.to_csv(folder / "summary.csv", index=False)
    report.comparisons.to_csv(folder / "comparisons.csv", index=False)
    return folder


def test_the_command_writes_markdown_and_strict_exits_one_on_a_failure(tmp_path: Path):
    first = _write(tmp_path / "first", _report("a"))
    second = _write(tmp_path / "second", _report("b", p_aa=0.01))
    runner = CliRunner()
    result = runner.invoke(app, ["agreement", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert "FAILS" in result.output and "negative control" in result.output
    text = (second / "agreement.md").read_text()
    assert "| scratch | 4 | 0.800 (0.750 to 0.850, 3) | 0.800 | yes |" in text
    assert runner.invoke(app, ["agreement", str(first), str(second), "--strict"]).exit_code == 1
    missing = runner.invoke(app, ["agreement", str(first), str(tmp_path / "nope")])
    assert missing.exit_code == 2
