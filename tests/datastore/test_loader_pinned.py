"""The loader's public order is pinned: the same batches in the same order as before the options were grouped.

``data/loader_orders.json`` was recorded with the keyword signature of merge-14 (``SliceLoader(...,
rank=, world_size=, seed=, cache=, buffer_slices=, cache_gb=, ...)``, commit cfb63c6): for each case,
every rank's indices of epochs 0 and 1, its batch count, mode, window and memory plan. The cases
cover the cache and streaming modes, a subject filter, ``drop_last=False``, ``shuffle=False``,
labelled loaders and both outcomes of a memory budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datastore.loader import ArraySource, ReadOptions, Shard, SliceLoader
from test_loader import _memory_source

RECORDED = json.loads((Path(__file__).parent / "data" / "loader_orders.json").read_text())
IDS = ["P0", "P2", "P3", "P5", "P7", "P8", "P9"]

#: case -> (subject ids, world size, loader keywords, Shard keywords, ReadOptions keywords)
CASES: dict[str, tuple[list[str] | None, int, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "cache_subset": (IDS, 3, {"batch_size": 4}, {"seed": 3}, {"prefetch": 1}),
    "stream_subset": (IDS, 3, {"batch_size": 4}, {"seed": 3}, {"cache": False, "buffer_slices": 40, "prefetch": 1}),
    "cache_keep_last": (None, 4, {"batch_size": 5}, {"seed": 2, "drop_last": False}, {}),
    "stream_keep_last": (None, 4, {"batch_size": 5}, {"seed": 2, "drop_last": False}, {"cache": False, "buffer_slices": 24}),
    "labelled_in_order": (None, 2, {"labelled_only": True, "batch_size": 3}, {"seed": 7, "shuffle": False, "drop_last": False}, {}),
    "labelled_stream": (None, 2, {"labelled_only": True, "batch_size": 3}, {"seed": 7}, {"cache": False, "buffer_slices": 16, "prefetch": 0}),
    "budget_streams": (None, 2, {"batch_size": 8}, {"seed": 5}, {"cache_gb": 5e-6, "progress": False}),
    "budget_caches": (IDS, 2, {"batch_size": 8}, {"seed": 5}, {"cache_gb": 1.0, "cache": False, "progress": False}),
}


def _source() -> ArraySource:
    """10 subjects x 50 slices of 4x4, every 5th slice labelled, chunks of 16 (as recorded; the values do not
    enter the order)."""
    return _memory_source(n_subjects=10, per_subject=50, chunk=16)


def test_recording_covers_every_case() -> None:
    assert sorted(RECORDED) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_match_the_recorded_order(case: str) -> None:
    ids, world_size, keywords, shard, read = CASES[case]
    source = _source()
    for rank, recorded in enumerate(RECORDED[case]):
        loader = SliceLoader(source, ids, shard=Shard(rank=rank, world_size=world_size, **shard),
                             read=ReadOptions(**read), **keywords)
        assert (len(loader), loader.cache, loader.buffer_slices) == (
            recorded["batches"], recorded["cache"], recorded["buffer_slices"]
        )
        assert loader.memory_plan == recorded["memory_plan"]
        for epoch, expected in enumerate(recorded["epochs"]):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert torch.cat([b["index"] for b in batches]).tolist() == expected
            for batch in batches:  # and the rows are the source's rows of those indices
                rows = source.images[batch["index"].numpy()].astype(np.float32)
                assert np.array_equal(batch["image"][:, 0].numpy(), rows)


def test_options_are_frozen_typed_groups() -> None:
    from pydantic import ValidationError

    read = ReadOptions(cache_gb=2.5, prefetch=0)
    assert ReadOptions.model_validate(read.model_dump(mode="json")) == read  # crosses into a worker as JSON
    with pytest.raises(ValidationError):
        read.cache_gb = 1.0  # type: ignore[misc]
    for bad in ({"cache_gb": 0}, {"cache_gb": -1}, {"cache_gb": float("inf")}, {"read_threads": 0}, {"cache_dtype": "int8"}, {"rank": 0}):
        with pytest.raises(ValidationError):
            ReadOptions(**bad)
    with pytest.raises(ValidationError):
        Shard(world_size=0)
