"""Conventions named once for the whole project.

Label map (M&Ms order), axis order, the empty-mask Dice policy and the PCL slice position.
Every module that needs one of these imports it from here.
"""

from __future__ import annotations

#: Label values in every store, prediction and NIfTI we write (M&Ms / M&Ms-2 order).
BACKGROUND, LV, MYO, RV = 0, 1, 2, 3
LABEL_NAMES: dict[int, str] = {BACKGROUND: "background", LV: "LV", MYO: "MYO", RV: "RV"}
FOREGROUND_CLASSES: tuple[int, ...] = (LV, MYO, RV)
NUM_CLASSES = 4

#: Cardiac phase codes in the per-slice ``phase`` metadata array.
PHASE_OTHER, PHASE_ED, PHASE_ES = 0, 1, 2
PHASE_NAMES: dict[int, str] = {PHASE_OTHER: "other", PHASE_ED: "ED", PHASE_ES: "ES"}

#: Array axis order of 2D slices and volumes held in memory and in the store:
#: slices are (H, W) = (y, x); canonical volumes are (Z, Y, X) with Z = 0 at the base.
VOLUME_AXES = ("z", "y", "x")

#: Dice when both prediction and truth are empty for a class (the published code's rule),
#: and when exactly one of them is empty.
DICE_BOTH_EMPTY = 1.0
DICE_ONE_EMPTY = 0.0


def acdc_to_mnms(label_value: int) -> int:
    """Map an ACDC label value (1=RV, 2=MYO, 3=LV) to M&Ms order (1=LV, 2=MYO, 3=RV)."""
    return {0: BACKGROUND, 1: RV, 2: MYO, 3: LV}[label_value]


def slice_position(slice_index: int, slice_count: int) -> float:
    """Relative position of a slice for PCL: ``slice_index / slice_count`` in [0, 1).

    ``slice_index`` is 0-based from the base (the published code's definition, not ``/(S-1)``).
    """
    return slice_index / slice_count
