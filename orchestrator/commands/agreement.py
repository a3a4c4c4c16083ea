"""``sspctl agreement``: do two runs of the same study reach the same conclusions?"""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.commands._common import fail, path_arg


def agreement(
    first: Path = typer.Argument(..., help="Report directory of the first run (written by `sspctl report`)."),
    second: Path = typer.Argument(..., help="Report directory of the rerun (same grid, other training seeds)."),
    out: Path | None = typer.Option(None, "--out", help="Write agreement.md here. Default: <SECOND>/agreement.md."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 unless all four criteria were checked and hold."),
) -> None:
    """Check the four rerun criteria on two reports of the same study: >= 90% of cells' second means
    inside the first run's 95% CI; the A/A control (scratch-b) not significant in either; the positive
    control (supervised) better than scratch at the smallest budget in both; scratch's Dice not falling
    with the budget."""
    from rich.console import Console
    from rich.markup import escape

    from orchestrator.agreement import AgreementError, agreement_markdown, check_agreement, read_report

    first_dir = Path(path_arg(first, "FIRST", kind="dir"))
    second_dir = Path(path_arg(second, "SECOND", kind="dir"))
    target = Path(path_arg(out, "--out", must_exist=False)) if out else second_dir / "agreement.md"
    try:
        a, b = read_report(first_dir), read_report(second_dir)
    except AgreementError as exc:
        fail(str(exc), code=2)
    result = check_agreement(a, b)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(agreement_markdown(result, str(first_dir), str(second_dir)))
    console = Console()
    style = {True: "[green]holds[/green]", False: "[red]FAILS[/red]", None: "[yellow]not checked[/yellow]"}
    for criterion in result.criteria:
        console.print(f"{style[criterion.passed]}  {escape(criterion.name)}: {escape(criterion.detail)}",
                      highlight=False, soft_wrap=True)
    console.print(f"written: {target}")
    if strict and not result.passed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``agreement`` to the root app."""
    app.command("agreement")(agreement)
