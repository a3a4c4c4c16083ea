"""SliceLoader memory budget (``cache_gb``): cache when the share fits, else stream within the budget."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from datastore.loader import LoaderError, ReadOptions, Shard, SliceLoader, default_cache_gb
from datastore.store import StoreWriter
from test_loader import _record

SIZE = 64  # 64 x 64 float16 = 8 kB per slice


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real store of 30 subjects x 60 slices of 64 x 64 (1,800 slices, 14.7 MB of float16 images)."""
    import test_loader

    path = tmp_path_factory.mktemp("budget") / "store.zarr"
    rng = np.random.default_rng(0)
    writer = StoreWriter.open(path, {"test": True}, image_size=SIZE, spacing=1.25, chunk_slices=8, native_chunk=4096)
    small = test_loader.SIZE
    test_loader.SIZE = SIZE  # _record draws its slices at test_loader.SIZE
    try:
        for i in range(30):
            writer.append(_record("mnms", f"S{i:02d}", frames=6, slices=10, rng=rng))
    finally:
        test_loader.SIZE = small
    writer.finalize()
    return str(path)


def test_a_budget_smaller_than_the_share_streams_and_peak_memory_stays_within_it(big_store: str) -> None:
    budget_gb = 0.004  # 4 MB: about a quarter of the 14.7 MB share
    loader = SliceLoader(big_store, None, batch_size=16, shard=Shard(seed=0),
                         read=ReadOptions(cache_gb=budget_gb, prefetch=0, progress=False))
    assert not loader.cache and loader.memory_plan.startswith("stream: ") and "> budget" in loader.memory_plan
    assert loader.buffer_slices < len(loader.indices)
    tracemalloc.start()  # numpy's buffers (zarr's decoded chunks, windows, batches) are traced
    try:
        tracemalloc.reset_peak()
        seen = np.concatenate([batch["index"].numpy() for batch in loader])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak} bytes, budget {budget_gb * 1e9:.0f}: {loader.memory_plan}")
    assert peak <= budget_gb * 1e9, f"peak {peak} bytes > budget {budget_gb * 1e9:.0f}"
    assert len(seen) == len(loader) * 16 and len(np.unique(seen)) == len(seen)  # each slice at most once
    assert set(seen) <= set(loader.indices.tolist())


def test_a_budget_that_holds_the_share_caches(big_store: str) -> None:
    loader = SliceLoader(big_store, None, batch_size=16, shard=Shard(seed=0),
                         read=ReadOptions(cache=False, cache_gb=0.02, progress=False))
    assert loader.cache and loader.memory_plan.startswith("cache: ")
    assert len(list(loader)) == len(loader) and 0 < loader.cache_bytes <= 0.02 * 1e9


def test_a_budget_too_small_for_one_batch_is_one_line(big_store: str) -> None:
    with pytest.raises(LoaderError, match=r"cache_gb=1e-06 is too small to stream batches of 16"):
        SliceLoader(big_store, None, batch_size=16, read=ReadOptions(cache_gb=1e-6, progress=False))


def test_default_budget_splits_the_node_memory_over_its_ranks() -> None:
    one, eight = default_cache_gb(1), default_cache_gb(8)
    assert one > 0 and abs(one / 8 - eight) < 0.02
    assert Path("/proc/meminfo").exists()
