"""The per-subject Dice tables of fine-tuning cells, shared by the grid (which records them) and the
report (which reads them back).

A table has one row per test subject, phase and class: ``subject_id, phase, class, dice`` (phase
``ED``/``ES``, class ``LV``/``MYO``/``RV``). Torch-free.
"""

from __future__ import annotations

from typing import Any

from orchestrator.study_tracking import COMPLETION_METRIC


class DiceTableError(ValueError):
    """A per-subject Dice table is unusable; the message names what is missing."""


def dice_metrics(rows: Any) -> dict[str, float]:
    """Test Dice metrics of one cell from its per-subject table.

    ``rows``: a DataFrame or list of dicts with ``subject_id, phase, class, dice`` (phase ``ED``/``ES``,
    class ``LV``/``MYO``/``RV``; integer codes are mapped with ``datastore.conventions``).
    Returns ``test_dice_{class}_{phase}``, ``test_dice_{class}``, ``test_dice_{phase}`` and
    ``test_dice_mean`` (means over subject-phase rows; the overall mean is over all rows).
    """
    frame = normalise_dice_table(rows)
    metrics: dict[str, float] = {}
    for (cls, phase), group in frame.groupby(["class", "phase"]):
        metrics[f"test_dice_{cls}_{phase}"] = float(group["dice"].mean())
    for cls, group in frame.groupby("class"):
        metrics[f"test_dice_{cls}"] = float(group["dice"].mean())
    for phase, group in frame.groupby("phase"):
        metrics[f"test_dice_{phase}"] = float(group["dice"].mean())
    metrics[COMPLETION_METRIC] = float(frame["dice"].mean())
    return metrics


def normalise_dice_table(rows: Any) -> Any:
    """The per-subject table as a DataFrame with string ``phase``/``class`` and float ``dice``.

    Raises:
        DiceTableError: columns are missing or the table is empty.
    """
    import pandas as pd

    from datastore.conventions import LABEL_NAMES, PHASE_NAMES

    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows or []))
    missing = {"subject_id", "phase", "class", "dice"} - set(frame.columns)
    if frame.empty or missing:
        raise DiceTableError(f"per-subject Dice table is empty or lacks columns {sorted(missing)}")
    frame["subject_id"] = frame["subject_id"].astype(str)
    frame["phase"] = frame["phase"].map(lambda p: PHASE_NAMES.get(p, p) if not isinstance(p, str) else p)
    frame["class"] = frame["class"].map(lambda c: LABEL_NAMES.get(c, c) if not isinstance(c, str) else c)
    frame["dice"] = frame["dice"].astype(float)
    return frame


# -- the Tune trial ------------------------------------------------------------------------------


__all__ = ["DiceTableError", "dice_metrics", "normalise_dice_table"]
