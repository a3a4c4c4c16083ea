"""Checks a grid makes once, before any cell starts (so no cell runs on inputs a later one rejects)."""

from __future__ import annotations

from datastore.splits import SplitError, load_split
from datastore.store import SliceStore, StoreError


class SplitMismatchError(LookupError):
    """The split names subjects the store does not hold; one line naming the file and the ids."""


def check_split_subjects(split_path: str, store_path: str) -> None:
    """Every subject id of the split (test, train, valid, hence every budget) must be in the store.

    Raises:
        SplitMismatchError: one line: the split file, the count and the unknown ids (up to 10).
    """
    try:
        split = load_split(split_path)
        split.check_against(SliceStore.open(store_path).subjects, store_name=f"store {store_path}")
    except (SplitError, StoreError) as exc:
        raise SplitMismatchError(str(exc).splitlines()[0]) from None
