"""The store's MLflow dataset profile (``orchestrator/mlflow_data.store_profile``) on a padded store.

The fixture's subjects have 3 frames x 4 slices = 12 slices, of which ED and ES (8) are labelled; the
store pads each subject to its 8-slice chunks, so rows (16 per subject) are not slices.
"""

from __future__ import annotations

from pathlib import Path

from datastore.store import SliceStore
from orchestrator.mlflow_data import store_profile


def test_profile_counts_slices_not_padding(cell_data: dict[str, Path]) -> None:
    store = SliceStore.open(cell_data["store"])
    assert store.n_rows > store.n_slices  # the fixture is padded, or this test checks nothing
    whole = store_profile(store)
    assert (whole["subjects"], whole["slices"], whole["labelled_slices"]) == (8, 8 * 12, 8 * 8)
    ids = [str(s) for s in store.subjects["subject_id"]]
    part = store_profile(store, ids[-3:])  # the last subjects: their rows lie past n_slices
    assert (part["subjects"], part["slices"], part["labelled_slices"]) == (3, 3 * 12, 3 * 8)
    assert part["store_subjects"] == 8 and sum(part["datasets"].values()) == 3
