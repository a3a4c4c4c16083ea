"""SliceLoader: rank sharding, determinism, filtering, values against the store, real gloo ranks."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datastore.loader import (
    ArraySource,
    LoaderError,
    ReadOptions,
    Shard,
    SliceLoader,
    batches_per_epoch,
    epoch_order,
    partition,
)
from datastore.store import SliceStore, StoreWriter, SubjectRecord

SIZE = 16


def _record(dataset: str, sid: str, frames: int, slices: int, rng: np.random.Generator) -> SubjectRecord:
    """A subject of ``frames x slices`` random slices; frames 0 (ED) and 1 (ES) are labelled."""
    n = frames * slices
    frame = np.repeat(np.arange(frames), slices)
    phase = np.where(frame == 0, 1, np.where(frame == 1, 2, 0))
    label_rows = np.flatnonzero(frame < 2)
    native = {
        p: (rng.standard_normal((slices, 8, 8)).astype(np.float32), rng.integers(0, 4, (slices, 8, 8), dtype=np.uint8))
        for p in ("ED", "ES")
    }
    return SubjectRecord(
        dataset=dataset,
        subject_id=sid,
        images=rng.standard_normal((n, SIZE, SIZE)).astype(np.float16),
        frame=frame,
        slice=np.tile(np.arange(slices), frames),
        slice_count=np.full(n, slices),
        phase=phase,
        labels=rng.integers(0, 4, (len(label_rows), SIZE, SIZE), dtype=np.uint8),
        label_rows=label_rows,
        native=native,
        info={"vendor": "A", "spacing_zyx": [10.0, 1.25, 1.25], "affine": np.eye(4).tolist(),
              "flip_z": False, "center_yx": [4.0, 4.0]},
    )  # fmt: skip


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real finished store: 6 subjects of 3-5 frames x 4-7 slices (chunks of 8 slices)."""
    path = tmp_path_factory.mktemp("loader") / "store.zarr"
    rng = np.random.default_rng(0)
    writer = StoreWriter.open(path, {"test": True}, image_size=SIZE, spacing=1.25, chunk_slices=8)
    for i in range(6):
        dataset, sid = ("mnms", f"S{i}") if i < 4 else ("mnms2", f"{i:03d}")
        writer.append(_record(dataset, sid, frames=3 + i % 3, slices=4 + i % 4, rng=rng))
    writer.finalize()
    return str(path)


def _memory_source(n_subjects: int = 10, per_subject: int = 50, chunk: int = 16) -> ArraySource:
    rng = np.random.default_rng(1)
    n = n_subjects * per_subject
    meta = {
        "subject": np.repeat(np.arange(n_subjects), per_subject),
        "slice": np.tile(np.arange(10), n // 10),
        "slice_count": np.full(n, 10),
        "labelled": np.arange(n) % 5 == 0,
    }
    subjects = pd.DataFrame({"subject_id": [f"P{i}" for i in range(n_subjects)], "dataset": "mnms"})
    return ArraySource(
        rng.standard_normal((n, 4, 4)).astype(np.float16), meta, subjects,
        labels=rng.integers(0, 4, (n, 4, 4), dtype=np.uint8), chunk_slices=chunk,
    )  # fmt: skip


def _epoch(loader: SliceLoader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _indices(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return np.concatenate([b["index"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("world_size,batch_size", [(2, 7), (3, 4)])
def test_ranks_are_disjoint_and_cover_the_epoch(cache: bool, world_size: int, batch_size: int) -> None:
    source = _memory_source()
    ids = [f"P{i}" for i in (0, 2, 3, 5, 7, 8, 9)]
    loaders = [
        SliceLoader(source, ids, batch_size=batch_size, shard=Shard(rank=r, world_size=world_size, seed=3),
                    read=ReadOptions(cache=cache, buffer_slices=40, prefetch=1))
        for r in range(world_size)
    ]  # fmt: skip
    selected = set(np.flatnonzero(np.isin(source.meta["subject"], [0, 2, 3, 5, 7, 8, 9])).tolist())
    assert len(selected) == 350
    lengths = {len(loader) for loader in loaders}
    assert lengths == {batches_per_epoch(350, batch_size, world_size, True)}
    for epoch in range(2):
        per_rank = [_indices(_epoch(loader, epoch)) for loader in loaders]
        for idx in per_rank:
            assert len(idx) == len(loaders[0]) * batch_size
            assert len(set(idx.tolist())) == len(idx)
        union = set(np.concatenate(per_rank).tolist())
        assert sum(len(i) for i in per_rank) == len(union)  # pairwise disjoint
        assert union <= selected
        assert len(selected) - len(union) < world_size * (batch_size + 1)
    if cache:  # the in-memory order is exactly the published epoch order
        assert np.array_equal(_indices(_epoch(loaders[0], 1)), loaders[0].epoch_indices(1))


def test_order_is_deterministic_per_seed_and_epoch() -> None:
    source = _memory_source()

    def order(seed: int, epoch: int, rank: int = 0) -> np.ndarray:
        loader = SliceLoader(source, None, batch_size=8, shard=Shard(rank=rank, world_size=2, seed=seed),
                             read=ReadOptions(prefetch=0))
        return _indices(_epoch(loader, epoch))

    assert np.array_equal(order(0, 0), order(0, 0))
    assert np.array_equal(order(5, 3), order(5, 3))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    # Ownership is fixed for a run: a rank draws from the same slices in every epoch.
    loader = SliceLoader(source, None, batch_size=8, shard=Shard(rank=1, world_size=2, seed=0))
    assert set(loader.epoch_indices(0).tolist()) | set(loader.epoch_indices(7).tolist()) <= set(loader.indices.tolist())


def test_abandoned_epoch_does_not_disturb_the_next() -> None:
    loader = SliceLoader(_memory_source(), None, batch_size=8, shard=Shard(seed=1), read=ReadOptions(prefetch=2))
    loader.set_epoch(4)
    for _ in zip(range(2), loader):  # a loop that stops early (steps_per_epoch < len(loader))
        pass
    assert np.array_equal(_indices(_epoch(loader, 4)), loader.epoch_indices(4))


def test_drop_last_false_yields_every_slice_once_with_equal_batch_counts() -> None:
    source = _memory_source(n_subjects=3, per_subject=50)
    loaders = [
        SliceLoader(source, None, batch_size=5, shard=Shard(rank=r, world_size=4, drop_last=False, seed=2))
        for r in range(4)
    ]
    assert {len(loader) for loader in loaders} == {8}  # shares 38/38/37/37 -> ceil(38 / 5)
    per_rank = [_indices(_epoch(loader, 0)) for loader in loaders]
    assert sorted(set(np.concatenate(per_rank).tolist())) == list(range(150))
    for loader, idx in zip(loaders, per_rank):
        assert len(set(idx.tolist())) == len(loader.indices)


def test_partition_balances_and_keeps_whole_chunks() -> None:
    selected = np.arange(1000, dtype=np.int64)
    parts = partition(selected, chunk_slices=50, world_size=4, seed=0)
    assert [len(p) for p in parts] == [250] * 4
    assert np.array_equal(np.sort(np.concatenate(parts)), selected)
    for part in parts:  # 250 = 5 whole chunks of 50
        assert len(np.unique(part // 50)) == 5
    order = epoch_order(10, 3, 3, seed=0, epoch=0, rank=0)
    assert len(order) == 9 and len(set(order.tolist())) == 9


def test_values_filters_and_fields_match_the_store(store_path: str) -> None:
    store = SliceStore.open(store_path)
    meta, subjects = store.meta, store.subjects
    budget = ["S1", "S3", "004"]
    rows = [int(np.flatnonzero(subjects["subject_id"] == s)[0]) for s in budget]
    loader = SliceLoader(store_path, budget, labelled_only=True, batch_size=4, shard=Shard(seed=1),
                         read=ReadOptions(prefetch=1))
    expected = np.flatnonzero(np.isin(meta["subject"], rows) & meta["labelled"])
    assert loader.n_selected == len(expected)
    batches = _epoch(loader, 0)
    assert len(batches) == len(expected) // 4
    idx = _indices(batches)
    assert set(idx.tolist()) <= set(expected.tolist())
    for batch in batches:
        i = batch["index"].numpy()
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 1, SIZE, SIZE)
        assert torch.equal(batch["image"][:, 0], torch.from_numpy(store.read_images(i)))
        assert batch["label"].dtype == torch.int64
        assert torch.equal(batch["label"], torch.from_numpy(store.read_labels(i).astype(np.int64)))
        assert torch.equal(batch["subject"], torch.from_numpy(meta["subject"][i].astype(np.int64)))
        position = torch.from_numpy((meta["slice"][i] / meta["slice_count"][i]).astype(np.float32))
        assert torch.equal(batch["position"], position)
    # Unlabelled loaders see every frame and carry no label.
    every = SliceLoader(SliceStore.open(store_path), ["S1"], batch_size=3, read=ReadOptions(prefetch=0))
    assert every.n_selected == int((meta["subject"] == rows[0]).sum())
    first = next(iter(every))
    assert "label" not in first
    assert torch.equal(first["image"][:, 0], torch.from_numpy(store.read_images(first["index"].numpy())))


def test_streaming_mode_matches_cached_values(store_path: str) -> None:
    store = SliceStore.open(store_path)
    streaming = ReadOptions(cache=False, buffer_slices=12)
    streamed = SliceLoader(store_path, None, batch_size=5, shard=Shard(seed=4),
                           read=streaming.model_copy(update={"prefetch": 0}))
    batches = _epoch(streamed, 2)
    idx = _indices(batches)
    assert len(batches) == len(streamed) and len(set(idx.tolist())) == len(idx)
    for batch in batches:
        assert torch.equal(batch["image"][:, 0], torch.from_numpy(store.read_images(batch["index"].numpy())))
    again = _indices(_epoch(SliceLoader(store_path, None, batch_size=5, shard=Shard(seed=4), read=streaming), 2))
    assert np.array_equal(idx, again)


def test_plain_zarr_array_source(tmp_path: Path) -> None:
    import zarr

    source = _memory_source(n_subjects=4, per_subject=30, chunk=8)
    images = zarr.create_array(tmp_path / "img.zarr", shape=source.images.shape, chunks=(8, 4, 4), dtype="float16")
    images[:] = source.images
    on_disk = ArraySource(images, source.meta, source.subjects)
    assert on_disk.chunk_slices == 8
    loader = SliceLoader(on_disk, ["P1", "P2"], batch_size=6, shard=Shard(seed=0))
    for batch in _epoch(loader, 0):
        expected = source.images[batch["index"].numpy()].astype(np.float32)
        assert np.array_equal(batch["image"][:, 0].numpy(), expected)


def test_pickled_loader_reopens_its_store(store_path: str) -> None:
    loader = SliceLoader(store_path, ["S0", "S2"], batch_size=4, shard=Shard(world_size=2, rank=1, seed=9))
    first = _indices(_epoch(loader, 1))
    clone = pickle.loads(pickle.dumps(loader))
    assert clone.cache_bytes == 0
    assert np.array_equal(_indices(_epoch(clone, 1)), first)
    assert loader.cache_bytes == len(loader.indices) * SIZE * SIZE * 2  # float16 rows, as stored
    full = SliceLoader(store_path, ["S0"], batch_size=2, read=ReadOptions(cache_dtype="float32", prefetch=0))
    batch = next(iter(full))
    assert batch["image"].dtype == torch.float32 and full.cache_bytes == len(full.indices) * SIZE * SIZE * 4
    assert torch.equal(batch["image"][:, 0], torch.from_numpy(SliceStore.open(store_path).read_images(batch["index"])))


def test_clear_errors(store_path: str) -> None:
    with pytest.raises(LoaderError, match="not in the store: nobody"):
        SliceLoader(store_path, ["S1", "nobody"], batch_size=2)
    with pytest.raises(LoaderError, match="lower batch_size"):
        SliceLoader(store_path, ["S1"], labelled_only=True, batch_size=1000)
    with pytest.raises(LoaderError, match="rank 2"):
        SliceLoader(store_path, None, batch_size=2, shard=Shard(rank=2, world_size=2))
    both = pd.DataFrame({"subject_id": ["X", "X"], "dataset": ["mnms", "mnms2"]})
    meta = {"subject": np.array([0, 1]), "slice": np.zeros(2), "slice_count": np.ones(2), "labelled": np.ones(2, bool)}
    ambiguous = ArraySource(np.zeros((2, 2, 2), np.float16), meta, both, chunk_slices=1)
    with pytest.raises(LoaderError, match="several datasets"):
        SliceLoader(ambiguous, ["X"], batch_size=1)
    assert SliceLoader(ambiguous, ["mnms2/X"], batch_size=1).indices.tolist() == [1]


def test_empty_store_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    StoreWriter.open(path, {"test": True}, image_size=SIZE, spacing=1.25, chunk_slices=8).finalize()
    for ids, selection in ((["S0", "S1"], "2 subject id.s."), (None, "every subject")):
        with pytest.raises(ValueError, match=f"{path}: the store is empty .no committed subjects.; cannot select labelled slices of {selection}"):
            SliceLoader(str(path), ids, labelled_only=True, batch_size=2)


def _gloo_rank(rank: int, world_size: int, port: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        loader = SliceLoader(store_path, None, batch_size=4, shard=Shard(rank=rank, world_size=world_size, seed=11))
        counts = torch.tensor([len(loader)])
        gathered_counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
        dist.all_gather(gathered_counts, counts)
        loader.set_epoch(1)
        mine = torch.cat([batch["index"] for batch in loader])
        gathered = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)  # same length on every rank, or this would fail
        if rank == 0:
            torch.save({"counts": torch.cat(gathered_counts), "indices": gathered}, Path(out_dir) / "gathered.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_cover_the_epoch(store_path: str, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port, store_path, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "gathered.pt", weights_only=True)
    n = SliceStore.open(store_path).n_slices
    counts, (rank0, rank1) = result["counts"], result["indices"]
    assert counts[0] == counts[1] == n // 2 // 4
    assert len(rank0) == len(rank1) == int(counts[0]) * 4
    assert not set(rank0.tolist()) & set(rank1.tolist())
    assert n - len(set(rank0.tolist()) | set(rank1.tolist())) < 2 * (4 + 1)
