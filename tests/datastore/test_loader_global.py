"""SliceLoader with ``Shard(global_batches=True)``: the global batches do not depend on the world size."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import datastore.loader as loader_module
from datastore.loader import LoaderError, ReadOptions, Shard, SliceLoader
from test_loader import _epoch, _indices, _memory_source, store_path  # noqa: F401 (the same real store: 124 slices, 62 labelled)

GLOBAL = 12  # the global batch: split by 2 and 4 ranks, and not a multiple of the 8-slice chunks


def _loaders(store: Any, world_size: int, read: ReadOptions, **keywords: Any) -> list[SliceLoader]:
    """One ``global_batches`` loader per rank, each with its share of the global batch ``GLOBAL``."""
    return [
        SliceLoader(store, batch_size=GLOBAL // world_size, read=read,
                    shard=Shard(rank=rank, world_size=world_size, seed=3, global_batches=True), **keywords)
        for rank in range(world_size)
    ]  # fmt: skip


def _assert_same_batches(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), k
        for key in a:
            assert torch.equal(a[key], b[key]), (k, key)


def _concatenated(per_rank: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Global batch ``k``: batch ``k`` of ranks ``0 .. W-1``, concatenated in rank order."""
    return [{key: torch.cat([b[key] for b in batches]) for key in batches[0]} for batches in zip(*per_rank)]


@pytest.mark.parametrize("labelled_only", [True, False])
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_the_world_size(
    store_path: str, world_size: int, cache: bool, labelled_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []  # rows of each streaming window
    windows = loader_module._windows

    def recording(parts: Any, size: int) -> Any:
        for window in windows(parts, size):
            sizes.append(len(window))
            yield window

    monkeypatch.setattr(loader_module, "_windows", recording)
    read = ReadOptions(cache=cache, buffer_slices=10, prefetch=1)
    one = SliceLoader(store_path, batch_size=GLOBAL, read=read, shard=Shard(seed=3), labelled_only=labelled_only)
    ranks = _loaders(store_path, world_size, read, labelled_only=labelled_only)
    assert {len(loader) for loader in ranks} == {len(one)} == {one.n_selected // GLOBAL}
    for loader in ranks:
        assert np.array_equal(loader.indices, one.indices)  # every rank owns the whole selection
    for epoch in range(2):
        sizes.clear()
        want = _epoch(one, epoch)
        if not cache:  # several windows, and a global batch that spans two of them (the carry path)
            assert len(sizes) > 3 and any(np.cumsum(sizes[:-1]) % GLOBAL), sizes
        per_rank = [_epoch(loader, epoch) for loader in ranks]
        for loader, batches in zip(ranks, per_rank):
            assert all(len(b["index"]) == GLOBAL // world_size for b in batches)
            if cache:  # the published order is the cache's (streaming draws its own, as in the default mode)
                assert np.array_equal(_indices(batches), loader.epoch_indices(epoch))
        _assert_same_batches(_concatenated(per_rank), want)
        assert ("label" in want[0]) == labelled_only


@pytest.mark.parametrize("cache", [True, False])
def test_one_rank_global_batches_are_the_default_batches(store_path: str, cache: bool) -> None:
    read = ReadOptions(cache=cache, buffer_slices=10, prefetch=0)
    for labelled_only in (True, False):
        default = SliceLoader(store_path, batch_size=5, read=read, shard=Shard(seed=7), labelled_only=labelled_only)
        both = SliceLoader(store_path, batch_size=5, read=read, labelled_only=labelled_only,
                           shard=Shard(seed=7, global_batches=True))  # fmt: skip
        assert len(both) == len(default)
        for epoch in range(2):
            _assert_same_batches(_epoch(both, epoch), _epoch(default, epoch))
            assert np.array_equal(both.epoch_indices(epoch), default.epoch_indices(epoch))


def test_memory_plan_and_window_are_those_of_one_rank() -> None:
    source = _memory_source()  # 500 slices of 4x4 float16: 32 bytes each
    read = ReadOptions(cache_gb=8e-6, read_slices=128, prefetch=0)  # 250 slices: streams
    one = SliceLoader(source, batch_size=GLOBAL, read=read, shard=Shard(seed=3))
    ranks = _loaders(source, 4, read)
    assert one.plan.mode == "stream" and one.plan.slices == 500
    for loader in ranks:
        assert (loader.plan, loader.buffer_slices, loader.chunks_per_read) == (one.plan, one.buffer_slices, one.chunks_per_read)
    _assert_same_batches(_concatenated([_epoch(loader, 1) for loader in ranks]), _epoch(one, 1))


def test_global_batches_refuse_drop_last_false_and_too_few_slices(store_path: str) -> None:
    with pytest.raises(LoaderError, match="global_batches needs drop_last=True"):
        SliceLoader(store_path, batch_size=2, shard=Shard(world_size=2, drop_last=False, global_batches=True))
    with pytest.raises(LoaderError, match="global_batches needs drop_last=True"):
        SliceLoader(store_path, batch_size=2, shard=Shard(drop_last=False, global_batches=True))
    # 62 labelled slices: one global batch of 4 x 15 fits, 4 x 16 does not.
    assert len(SliceLoader(store_path, labelled_only=True, batch_size=15, shard=Shard(world_size=4, global_batches=True))) == 1
    with pytest.raises(LoaderError, match="lower batch_size or world_size"):
        SliceLoader(store_path, labelled_only=True, batch_size=16, shard=Shard(world_size=4, rank=3, global_batches=True))
