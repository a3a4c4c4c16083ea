"""Streaming slice loader: one training rank's share of every epoch, as shuffled batches.

Design (measured in ``benchmarks/loader.py``, numbers in ``docs/benchmarks.md``):

* **Ownership.** The selected slices (subject filter, optionally labelled only) are grouped by the
  store's read unit (``chunk_slices`` consecutive rows), the groups are shuffled once with ``seed``
  and the resulting sequence is cut into ``world_size`` contiguous blocks whose sizes differ by at
  most one slice. Rank ``r`` owns block ``r`` for the whole run: ranks are disjoint, their union is
  the selection, and a rank touches only about ``1/world_size`` of the store's chunks. Unlike
  ``DistributedSampler``, slices do not move between ranks from epoch to epoch (the price of
  decoding each chunk once); a global batch is still a random draw from every rank's share.
* **Cache.** On first iteration (lazily, in the iterating process: store handles are not fork-safe)
  the rank decodes each chunk it owns exactly once, in long sequential runs on a few threads, and
  keeps only its rows in memory, in the store's dtype: float16 is 128 KiB per 256x256 slice, so a
  rank holding 90,618 / 8 slices needs about 1.5 GB (all 90,618 in one process: 11.9 GB); labels
  add 64 KiB per slice. Batches are converted to float32 after the move to ``device`` (on the GPU).
* **Epochs.** Every epoch a rank permutes its own slices with ``(seed, epoch, rank)`` and cuts
  ``len(loader)`` batches; the count is the same on every rank. With ``drop_last`` the few slices that
  do not fill a batch change from epoch to epoch (fewer than ``world_size * (batch_size + 1)``).
* **Global batches.** ``Shard(global_batches=True)`` (opt-in, ``drop_last`` only): every rank owns
  the whole selection, orders each epoch as one rank with the global batch ``batch_size *
  world_size`` would (seeds without the rank) and yields its rows ``[rank * batch_size, (rank + 1) *
  batch_size)`` of each global batch, gathering only those. Global batch ``k`` is then the same at
  any world size (elastic training), for ``world_size`` times the decode and memory.
* **Reads.** A read call hands the store several runs at once (``SliceSource.read_image_ranges``);
  zarr decodes their chunks concurrently in its own pool, which reaches the sequential decode
  ceiling, where the same runs read one per call from several Python threads measured 3x slower.
  Two background threads issue the calls, so that the copy of one call's rows into fresh memory
  overlaps the next decode.
* **Bounded memory.** ``ReadOptions(cache=False)`` streams instead: each epoch the rank reads its chunks in a
  shuffled order, ``chunks_per_read`` per call, groups them into windows of about ``buffer_slices``
  slices, and yields each window's slices in a fresh random order, gathered straight from the
  decoded chunks into the batch (one copy per slice). ``ReadOptions.cache_gb`` sets a memory
  budget and chooses: the cache when the rank's share fits, else streaming with windows sized to
  the budget (``plan`` / ``memory_plan`` say which and why).

Options come in two frozen groups (``datastore/loader_options.py``): ``Shard`` (rank, world size,
seed, shuffle, drop_last, global_batches: which slices a rank owns and the order of each epoch) and
``ReadOptions`` (memory budget or mode, window, threads, read sizes, cache dtype, prefetch, progress
bar).

Usage in a train loop (one loader per rank, built inside the worker)::

    loader = SliceLoader(store_path, split.budget(10, seed=0), labelled_only=True, batch_size=32 // world,
                         shard=Shard(rank=rank, world_size=world, seed=0), read=ReadOptions(cache_gb=4))
    print(loader.memory_plan)  # cache or stream, and why
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:   # len(loader) batches, the same on every rank
            ...

Batches (``docs/architecture.md``): ``image`` float32 ``(B, 1, H, W)``, ``label`` int64 ``(B, H, W)``
(labelled loaders only), ``position`` float32 ``(B,)`` = ``slice / slice_count``, ``subject`` int64
``(B,)`` (row in the store's subject table), ``index`` int64 ``(B,)`` (global slice row).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from datastore.loader_options import DEFAULT_READ_SLICES, MemoryPlan, ReadOptions, Shard, default_cache_gb



class LoaderError(ValueError):
    """The loader cannot be built for this selection; the message is one line."""


@runtime_checkable
class SliceSource(Protocol):
    """What the loader reads. ``datastore.store.SliceStore`` provides it (through ``as_source``).

    ``meta`` holds per-slice numpy arrays of length ``n_slices`` with at least ``subject`` (row in
    ``subjects``), ``slice``, ``slice_count`` and ``labelled``; ``subjects`` is a DataFrame with a
    ``subject_id`` column whose row order matches ``meta["subject"]``.
    """

    @property
    def n_slices(self) -> int: ...

    @property
    def chunk_slices(self) -> int: ...

    @property
    def meta(self) -> Mapping[str, np.ndarray]: ...

    @property
    def subjects(self) -> Any: ...

    def read_image_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the image array, ``(stop - start, H, W)`` in the stored dtype."""
        ...

    def read_image_ranges(self, runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """``read_image_range`` of each ``(start, stop)`` in ``runs``, in order; a store decodes them concurrently."""
        ...

    def read_labels(self, indices: np.ndarray) -> np.ndarray:
        """Label maps of the (sorted, labelled) global rows ``indices``: uint8 ``(n, H, W)``."""
        ...


@dataclass
class ArraySource:
    """A ``SliceSource`` over arrays: numpy arrays, or zarr arrays sliced lazily (tests, benchmarks).

    ``images`` is ``(N, H, W)``; ``labels`` (optional) is ``(N, H, W)`` uint8 indexed by global row.
    """

    images: Any
    meta: Mapping[str, np.ndarray]
    subjects: Any
    labels: Any = None
    chunk_slices: int = 0

    def __post_init__(self) -> None:
        if not self.chunk_slices:
            chunks = getattr(self.images, "chunks", None)
            self.chunk_slices = int(chunks[0]) if chunks else 64

    @property
    def n_slices(self) -> int:
        return int(self.images.shape[0])

    def read_image_range(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.images[start:stop])

    def read_image_ranges(self, runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        return [self.read_image_range(start, stop) for start, stop in runs]

    def read_labels(self, indices: np.ndarray) -> np.ndarray:
        if self.labels is None:
            raise LoaderError("this source has no labels")
        if hasattr(self.labels, "get_orthogonal_selection"):
            return np.asarray(self.labels.get_orthogonal_selection((np.asarray(indices),)))
        return np.asarray(self.labels[np.asarray(indices)])


class _StoreSource:
    """Adapts a ``datastore.store.SliceStore`` to ``SliceSource``.

    Image ranges are read in the stored dtype (float16 in schema 1) straight from the store's
    documented ``images`` array, halving the cache compared with ``read_image_range`` (float32).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._images: Any = None  # the zarr ``images`` array, opened on first read

    def __getstate__(self) -> dict[str, Any]:
        return {"_store": self._store, "_images": None}

    @property
    def n_slices(self) -> int:
        """Rows of the image array (schema 2: slices plus the padding that aligns subjects to chunks)."""
        return int(getattr(self._store, "n_rows", self._store.n_slices))

    @property
    def chunk_slices(self) -> int:
        return int(getattr(self._store, "chunk_slices", 64))

    @property
    def meta(self) -> Mapping[str, np.ndarray]:
        return self._store.meta

    @property
    def subjects(self) -> Any:
        return self._store.subjects

    def _zarr_images(self) -> Any:
        """The store's zarr ``images`` array (``None`` for a store without a zarr group)."""
        if self._images is None and getattr(self._store, "group", None) is not None:
            self._images = self._store.group["images"]
        return self._images

    def read_image_range(self, start: int, stop: int) -> np.ndarray:
        return self.read_image_ranges([(start, stop)])[0]

    def read_image_ranges(self, runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Each run's rows, decoded concurrently by zarr's own pipeline in one call.

        One call with several runs in flight reaches the sequential decode ceiling; the same runs
        read from several Python threads measured 3x slower (``docs/benchmarks.md``, "Loader").
        """
        images = self._zarr_images()
        if images is None:
            reader = getattr(self._store, "read_image_range", None)
            if reader is not None:
                return [np.asarray(reader(start, stop)) for start, stop in runs]
            return [np.asarray(self._store.read_images(np.arange(start, stop))) for start, stop in runs]
        return _gather_ranges(images, runs, _describe(self._store))

    def read_labels(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self._store.read_labels(indices))


def _gather_ranges(images: Any, runs: Sequence[tuple[int, int]], where: str) -> list[np.ndarray]:
    """Rows ``[start, stop)`` of the zarr array ``images`` for every run, read in one concurrent call.

    A damaged chunk raises ``CorruptChunkError`` naming the store, the array and the rows.
    """
    import asyncio

    from zarr.core.sync import sync  # zarr's own sync bridge (what Array.__getitem__ uses); zarr is pinned <3.2

    async def read_all() -> list[Any]:
        reads = (images.async_array.getitem(slice(start, stop)) for start, stop in runs)
        return await asyncio.gather(*reads, return_exceptions=True)

    blocks = sync(read_all())
    for (start, stop), block in zip(runs, blocks):
        if isinstance(block, BaseException):  # name store, array and rows
            from datastore.store import unreadable

            raise unreadable(where, "images", start, stop, block) from None
    return [np.asarray(block) for block in blocks]


def _describe(store: Any) -> str:
    """How error messages name ``store``: its path, else its type."""
    if isinstance(store, (str, Path)):
        return str(store)
    path = getattr(store, "path", None) or getattr(getattr(store, "_store", None), "path", None)
    return str(path) if path else f"the {type(store).__name__}"


def as_source(store: Any) -> SliceSource:
    """A ``SliceSource`` for a store path/URL, an opened ``SliceStore`` or a source already."""
    if isinstance(store, (str, Path)):
        from datastore.store import SliceStore

        store = SliceStore.open(str(store))
    if isinstance(store, (ArraySource, _StoreSource)):
        return store
    return _StoreSource(store)


# --------------------------------------------------------------------------------------------
# Pure planning functions (no I/O): selection, ownership, batch counts, epoch order.
# --------------------------------------------------------------------------------------------


def subject_rows(subjects: Any, subject_ids: Sequence[str]) -> np.ndarray:
    """Sorted rows of ``subjects`` (DataFrame: ``subject_id``, ``dataset``) for ``subject_ids``.

    An id is either a plain ``subject_id`` or ``"<dataset>/<subject_id>"`` (needed only when two
    datasets share an id). Unknown or ambiguous ids raise ``LoaderError`` listing them.
    """
    ids = [str(s) for s in subjects["subject_id"]]
    datasets = [str(d) for d in subjects["dataset"]] if "dataset" in subjects else [""] * len(ids)
    rows_of: dict[str, list[int]] = {}
    for row, (dataset, sid) in enumerate(zip(datasets, ids)):
        rows_of.setdefault(sid, []).append(row)
        rows_of.setdefault(f"{dataset}/{sid}", []).append(row)
    wanted = [str(s) for s in subject_ids]
    unknown = [s for s in wanted if s not in rows_of]
    ambiguous = [s for s in wanted if len(rows_of.get(s, [])) > 1]
    for problem, bad in (("not in the store", unknown), ("in several datasets (use <dataset>/<id>)", ambiguous)):
        if bad:
            shown = ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise LoaderError(f"{len(bad)} subject id(s) {problem}: {shown}")
    return np.array(sorted({rows_of[s][0] for s in wanted}), dtype=np.int64)


def select_indices(
    meta: Mapping[str, np.ndarray], rows: np.ndarray | None, labelled_only: bool
) -> np.ndarray:
    """Sorted global slice indices whose subject row is in ``rows`` (all if None), int64 ``(n,)``.

    Padding rows (``meta["subject"] == -1``, schema 2) are never selected.
    """
    keep = np.asarray(meta["subject"]) >= 0
    if rows is not None:
        keep &= np.isin(np.asarray(meta["subject"]), rows)
    if labelled_only:
        keep &= np.asarray(meta["labelled"]).astype(bool)
    return np.flatnonzero(keep).astype(np.int64)


def partition(
    selected: np.ndarray, chunk_slices: int, world_size: int, seed: int, shuffle: bool = True
) -> list[np.ndarray]:
    """Split ``selected`` into ``world_size`` disjoint, sorted index arrays (sizes differ by <= 1).

    With ``shuffle`` the store chunks are dealt in an order drawn from ``seed`` so each rank gets
    a random mix of whole chunks; without it rank ``r`` gets the ``r``-th contiguous block.
    """
    order = selected
    if shuffle and len(selected):
        chunk_of = selected // max(int(chunk_slices), 1)
        chunks = np.unique(chunk_of)
        rank_of_chunk = np.empty(int(chunks.max()) + 1, dtype=np.int64)
        rank_of_chunk[np.random.default_rng([seed, 0x0A11]).permutation(chunks)] = np.arange(len(chunks))
        order = selected[np.lexsort((selected, rank_of_chunk[chunk_of]))]
    base, extra = divmod(len(order), world_size)
    bounds = np.cumsum([0] + [base + (r < extra) for r in range(world_size)])
    return [np.sort(order[bounds[r] : bounds[r + 1]]) for r in range(world_size)]


def batches_per_epoch(n_selected: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches every rank yields per epoch (the same on all ranks)."""
    largest_share = -(-n_selected // world_size)
    smallest_share = n_selected // world_size
    return smallest_share // batch_size if drop_last else -(-largest_share // batch_size)


def epoch_order(
    n_owned: int,
    n_batches: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    shuffle: bool = True,
    drop_last: bool = True,
) -> np.ndarray:
    """Positions into a rank's owned slices for one epoch, in batch order, int64.

    Length ``n_batches * batch_size`` with ``drop_last``; otherwise every owned slice once, padded
    by repeating the first one where a rank is one slice short of a non-empty last batch.
    """
    order = np.arange(n_owned, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([seed, epoch, rank, 0xE90C]).permutation(n_owned)
    if drop_last:
        return order[: n_batches * batch_size]
    needed = (n_batches - 1) * batch_size + 1
    if n_owned < needed:
        order = np.concatenate([order, order[: needed - n_owned]])
    return order


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


@dataclass
class _Cache:
    """One rank's slices in memory, rows aligned with the sorted owned indices."""

    images: np.ndarray  # (n, H, W), cache dtype
    labels: np.ndarray | None  # (n, H, W) uint8
    bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.bytes = self.images.nbytes + (0 if self.labels is None else self.labels.nbytes)


def _chunk_runs(indices: np.ndarray, chunk_slices: int, n_slices: int, max_slices: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` covering the chunks that hold ``indices``, in ascending order.

    Consecutive chunks are merged into one range of at most ``max_slices`` rows (rounded to chunks).
    """
    if not len(indices):
        return []
    chunks = np.unique(indices // chunk_slices)
    per_run = max(1, max_slices // chunk_slices)
    runs: list[tuple[int, int]] = []
    start = prev = int(chunks[0])
    for c in chunks[1:].tolist():
        if c != prev + 1 or c - start >= per_run:
            runs.append((start, prev + 1))
            start = c
        prev = c
    runs.append((start, prev + 1))
    return [(a * chunk_slices, min(b * chunk_slices, n_slices)) for a, b in runs]


class SliceLoader:
    """Shuffled batches of one rank's share of the selected slices (see the module docstring).

    Args:
        store: store path/URL, an opened ``SliceStore``, or any ``SliceSource``. A path is opened
            lazily in the process that iterates (and dropped when the loader is pickled).
        subject_ids: subject ids (``subjects.subject_id``) to draw from; ``None`` = every subject.
        labelled_only: keep only labelled (ED/ES) slices and add ``label`` to each batch.
        batch_size: slices per batch on this rank; the global batch is ``batch_size * world_size``.
        shard: this rank, the number of ranks, the seed (ownership for the run; with the epoch, the
            order of every epoch), ``shuffle`` (False: contiguous blocks in store order),
            ``drop_last`` (False: the last batch is partial) and ``global_batches`` (every rank owns
            the selection and yields its rows of the world-size-independent global batches).
        read: how the share is read. ``cache_gb`` (a budget in GB, 1e9 bytes) decides: the cache
            when the share fits, else streaming with ``buffer_slices`` lowered so that the windows,
            the read-ahead and the batches in flight fit (:func:`default_cache_gb` gives a default
            from the node's memory and ranks per node). Without a budget ``cache`` decides.
            ``cache_dtype`` ``"float32"`` converts once at fill time instead of after the move to
            ``device`` (twice the memory, faster CPU batches).
        device: move batches there (``image`` is converted to float32 after the transfer).

    Attributes:
        plan: the ``MemoryPlan`` chosen (``memory_plan`` is its one line; print it once per run).
        cache, buffer_slices, chunks_per_read: the mode, the streaming window and the chunks per
            streaming read call in effect (a budget may change them).
    """

    def __init__(
        self,
        store: Any,
        subject_ids: Sequence[str] | None = None,
        *,
        labelled_only: bool = False,
        batch_size: int,
        shard: Shard = Shard(),
        read: ReadOptions = ReadOptions(),
        device: Any = None,
    ) -> None:
        if batch_size < 1:
            raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
        if not shard.rank < shard.world_size:
            raise LoaderError(f"rank {shard.rank} is not in [0, world_size={shard.world_size})")
        self._store_ref = store if isinstance(store, (str, Path)) else None
        self._source: SliceSource | None = as_source(store)
        self.labelled_only = labelled_only
        self.batch_size = int(batch_size)
        self.shard, self.read = shard, read
        self.device = device
        if shard.global_batches and not shard.drop_last:
            raise LoaderError("Shard.global_batches needs drop_last=True: a partial global batch cannot be split across ranks")
        world_size = shard.world_size
        #: The epoch order is cut in batches of ``_cut`` slices, drawn from seeds with ``_seed_rank``;
        #: this rank yields rows ``_rows`` of each. Default: its own batches. ``global_batches``: the
        #: order of one rank with the global batch, of which this rank yields its rows.
        if shard.global_batches:
            self._cut, self._seed_rank = self.batch_size * world_size, 0
            self._rows = (shard.rank * self.batch_size, (shard.rank + 1) * self.batch_size)
        else:
            self._cut, self._seed_rank, self._rows = self.batch_size, shard.rank, (0, self.batch_size)
        self.cache, self.buffer_slices = read.cache, max(read.buffer_slices, self._cut)
        self.progress = (shard.rank == 0) if read.progress is None else read.progress
        self._epoch = 0

        source = self._source
        where = _describe(store)
        what = "labelled slices" if labelled_only else "slices"
        selection = "every subject" if subject_ids is None else f"{len(subject_ids)} subject id(s)"
        if int(source.n_slices) == 0 or len(source.subjects) == 0:
            raise LoaderError(f"{where}: the store is empty (no committed subjects); cannot select {what} of {selection}")
        meta = source.meta
        rows = None if subject_ids is None else subject_rows(source.subjects, subject_ids)
        if rows is not None and not len(rows):
            raise LoaderError(f"{where}: subject_ids is empty")
        selected = select_indices(meta, rows, labelled_only)
        if not len(selected):
            raise LoaderError(f"{where}: no {what} for {selection} ({len(source.subjects) if rows is None else len(rows)} subjects)")
        self.n_selected = len(selected)
        self.chunk_slices = int(source.chunk_slices)
        self.n_store_slices = int(source.n_slices)
        #: Streaming: whole chunks, in the epoch's shuffled order, read in one call (decoded concurrently).
        self.chunks_per_read = max(1, read.read_slices // self.chunk_slices)
        # The selection is split between ``owners`` ranks; this rank owns share ``owner``.
        owners, owner = (1, 0) if shard.global_batches else (world_size, shard.rank)
        self._n_batches = batches_per_epoch(len(selected), self._cut, owners, shard.drop_last)
        if self._n_batches == 0 or len(selected) < world_size:
            raise LoaderError(
                f"{len(selected)} {what} cannot give every one of {world_size} rank(s) a batch of "
                f"{batch_size}; lower batch_size or world_size"
            )
        #: Sorted global slice indices this rank owns (the whole selection with ``global_batches``).
        self.indices = partition(selected, self.chunk_slices, owners, shard.seed, shard.shuffle)[owner]
        # conventions.slice_position, vectorised: slice_index / slice_count (0-based from the base).
        self._position = (
            np.asarray(meta["slice"])[self.indices] / np.asarray(meta["slice_count"])[self.indices]
        ).astype(np.float32)
        self._subject = np.asarray(meta["subject"])[self.indices].astype(np.int64)
        self._cache: _Cache | None = None
        self.plan = MemoryPlan(mode="cache" if self.cache else "stream", slices=len(self.indices))
        if read.cache_gb is not None:
            self._plan_memory(read.cache_gb, source)
        if self._store_ref is not None:
            self._source = None  # reopened by the process that iterates (handles are not fork-safe)

    def _plan_memory(self, cache_gb: float, source: SliceSource) -> None:
        """Choose cache or streaming for a budget of ``cache_gb`` GB (see ``ReadOptions.cache_gb``)."""
        budget = int(cache_gb * 1e9)
        first = source.read_image_range(0, 1)
        per_slice = int(first[0].nbytes) + (int(first[0].size) if self.labelled_only else 0)  # + uint8 label
        share = per_slice * len(self.indices)
        plan = {"slices": len(self.indices), "share_gb": share / 1e9, "budget_gb": cache_gb}
        if share <= budget:
            self.cache = True
            self.plan = MemoryPlan(mode="cache", **plan)
            return
        self.cache = False
        # Reads in flight stay within a quarter of the budget: fewer chunks per call for small budgets.
        threads = self.read.read_threads
        self.chunks_per_read = max(1, min(self.chunks_per_read, budget // per_slice // (8 * threads * self.chunk_slices)))
        # The cut (the global batch with ``global_batches``): the window, hence the order, must not
        # depend on the world size.
        fixed = (self.read.prefetch + 2) * self._cut + 2 * threads * self.chunks_per_read * self.chunk_slices
        # Live: the window in use and the read-ahead (2 windows: batches are gathered from the decoded
        # chunks, no window copy); 6 leaves room for what the allocator keeps (resident memory measured
        # up to 1.4x the live peak).
        window = (budget // per_slice - fixed) // 6
        if window < self._cut:
            raise LoaderError(
                f"cache_gb={cache_gb:g} is too small to stream batches of {self._cut} "
                f"({per_slice * (3 * self._cut + fixed) / 1e9:.3f} GB needed at least)"
            )
        self.buffer_slices = int(min(self.buffer_slices, window))
        self.plan = MemoryPlan(mode="stream", window_slices=self.buffer_slices, **plan)

    # -- public API ---------------------------------------------------------------------------

    @property
    def memory_plan(self) -> str:
        """One line: cache or stream, and why (``plan.line``)."""
        return self.plan.line

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank)."""
        return self._n_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self._epoch = int(epoch)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """Global slice indices this rank yields in ``epoch`` (default: the current), in order."""
        return self.indices[self._order(self._epoch if epoch is None else epoch)]

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the in-memory cache (0 before the first iteration or when streaming)."""
        return 0 if self._cache is None else self._cache.bytes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._iter_cached() if self.cache else self._iter_streaming()
        if self.read.prefetch > 0:
            return _prefetched(batches, self.read.prefetch)
        return batches

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        if self._store_ref is not None:
            state["_source"] = None
        return state

    # -- internals ----------------------------------------------------------------------------

    def _cut_order(self, epoch: int) -> np.ndarray:
        """Positions into ``indices`` for ``epoch``, cut in batches of ``_cut`` (``epoch_order``), int64."""
        shard = self.shard
        return epoch_order(
            len(self.indices), self._n_batches, self._cut, seed=shard.seed, epoch=epoch,
            rank=self._seed_rank, shuffle=shard.shuffle, drop_last=shard.drop_last,
        )  # fmt: skip

    def _order(self, epoch: int) -> np.ndarray:
        """Positions into ``indices`` this rank yields in ``epoch``, in batch order, int64.

        With ``global_batches``: rows ``_rows`` of each global batch, ``(len(self) * batch_size,)``;
        otherwise ``_cut_order``.
        """
        order = self._cut_order(epoch)
        if not self.shard.global_batches:
            return order
        lo, hi = self._rows
        return order.reshape(-1, self._cut)[:, lo:hi].ravel()

    def _src(self) -> SliceSource:
        if self._source is None:
            self._source = as_source(self._store_ref)
        return self._source

    def _cache_dtype(self, stored: np.dtype) -> np.dtype:
        """``read.cache_dtype`` if given, else the stored dtype (float16 for our store)."""
        return np.dtype(self.read.cache_dtype) if self.read.cache_dtype is not None else np.dtype(stored)

    def _fill_cache(self) -> _Cache:
        """Decode every chunk this rank owns once and keep its rows (rows follow ``indices``).

        Runs of ``read.read_slices`` rows are read on ``read.read_threads`` threads (the store decodes a
        run's chunks concurrently), each casting its rows straight into the cache.
        """
        source = self._src()
        runs = _chunk_runs(self.indices, self.chunk_slices, self.n_store_slices, self.read.read_slices)
        bar = _progress(len(self.indices), "caching slices", self.progress)
        images: np.ndarray | None = None

        def read(run: tuple[int, int]) -> int:
            start, stop = run
            lo, hi = (int(i) for i in np.searchsorted(self.indices, [start, stop]))
            block = source.read_image_range(start, stop)
            assert images is not None
            if hi - lo == stop - start:  # the whole run is ours: one casting copy, no gather
                images[lo:hi] = block
            else:
                images[lo:hi] = block[self.indices[lo:hi] - start]
            return hi - lo

        first = source.read_image_range(runs[0][0], min(runs[0][0] + 1, runs[0][1]))
        images = np.empty((len(self.indices), *first.shape[1:]), dtype=self._cache_dtype(first.dtype))
        with ThreadPoolExecutor(self.read.read_threads) as pool:
            for count in pool.map(read, runs):
                bar.update(count)
        labels = None
        if self.labelled_only:
            labels = np.empty(images.shape, dtype=np.uint8)
            step = 4096
            for lo in range(0, len(self.indices), step):
                labels[lo : lo + step] = source.read_labels(self.indices[lo : lo + step])
        bar.close()
        return _Cache(images, labels)

    def _iter_cached(self) -> Iterator[dict[str, Any]]:
        if self._cache is None:
            self._cache = self._fill_cache()
        cache = self._cache
        order = self._order(self._epoch)
        for start in range(0, len(order), self.batch_size):
            pos = order[start : start + self.batch_size]
            yield self._batch(pos, cache.images[pos], None if cache.labels is None else cache.labels[pos])

    def _iter_streaming(self) -> Iterator[dict[str, Any]]:
        """Decode this rank's chunks in a shuffled order; yield each window's slices shuffled.

        Each window's order is cut in batches of ``_cut`` slices (a batch may span two windows), of
        which this rank gathers only its rows ``_rows`` (with ``global_batches``: its rows of the
        global batch; the other ranks' rows are drawn, not gathered).
        """
        source = self._src()
        rng = np.random.default_rng([self.shard.seed, self._epoch, self._seed_rank, 0x5793])
        runs = _chunk_runs(self.indices, self.chunk_slices, self.n_store_slices, self.chunk_slices)
        if self.shard.shuffle:
            runs = [runs[i] for i in rng.permutation(len(runs))]
        total = len(self._cut_order(self._epoch))  # includes drop_last=False padding
        lo, hi = self._rows

        def part(run: tuple[int, int], img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            start, stop = run
            lo, hi = (int(i) for i in np.searchsorted(self.indices, [start, stop]))
            if hi - lo != stop - start:  # only part of the chunk is ours (subject filter, padding rows)
                img = img[self.indices[lo:hi] - start]
            lab = source.read_labels(self.indices[lo:hi]) if self.labelled_only else None
            return np.arange(lo, hi), img, lab

        def read(group: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
            return [part(run, img) for run, img in zip(group, source.read_image_ranges(group))]

        group = self.chunks_per_read
        groups = [runs[i : i + group] for i in range(0, len(runs), group)]
        carry: list[np.ndarray | None] | None = None  # this rank's rows of a batch the last window left short
        filled = 0  # rows of that batch drawn (this rank's and, with global_batches, the others')
        emitted = 0
        with ThreadPoolExecutor(self.read.read_threads) as pool:
            ahead = max(2 * self.read.read_threads, self.buffer_slices // (group * self.chunk_slices))
            parts = (p for parts in _bounded_map(pool, read, groups, ahead=ahead) for p in parts)
            for window in _windows(parts, self.buffer_slices):
                order = rng.permutation(len(window)) if self.shard.shuffle else np.arange(len(window))
                start = 0
                while emitted < total and start < len(order):
                    size = min(self._cut, total - emitted)
                    pick = order[start : start + size - filled]  # rows filled .. filled + len(pick) of the batch
                    start += len(pick)
                    rows = window.take(pick[max(lo - filled, 0) : max(hi - filled, 0)])  # this rank's
                    if carry is not None:
                        rows = [None if r is None else np.concatenate([c, r]) for c, r in zip(carry, rows)]  # type: ignore[list-item]
                    carry, filled = rows, filled + len(pick)
                    if filled < size:  # the window ran out: these rows lead the next one's first batch
                        break
                    yield self._batch(*rows)  # type: ignore[arg-type]
                    carry, filled, emitted = None, 0, emitted + size
                del window
        while emitted < total:  # drop_last=False: the rows left over, then repeats of one row
            if carry is None or not len(carry[0]):  # type: ignore[arg-type]
                (first,) = read(runs[:1])
                carry = [None if r is None else r[:1] for r in first]
            take = min(self.batch_size, total - emitted, len(carry[0]))  # type: ignore[arg-type]
            yield self._batch(*(None if r is None else r[:take] for r in carry))  # type: ignore[arg-type]
            carry = [None if r is None else r[take:] for r in carry]
            emitted += take

    def _batch(self, pos: np.ndarray, images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        """Assemble one batch dict from cache positions and their rows."""
        import torch

        batch: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
            "position": torch.from_numpy(self._position[pos]),
            "subject": torch.from_numpy(self._subject[pos]),
            "index": torch.from_numpy(self.indices[pos]),
        }
        if labels is not None:
            batch["label"] = torch.from_numpy(np.ascontiguousarray(labels))
        if self.device is not None:
            device = torch.device(self.device)
            pin = device.type == "cuda"
            batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}
        # Widen after the transfer: float16 / uint8 cross the bus, the GPU does the conversion.
        batch["image"] = batch["image"].float()
        if "label" in batch:
            batch["label"] = batch["label"].long()
        return batch


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _bounded_map(pool: ThreadPoolExecutor, fn: Any, items: Sequence[Any], ahead: int) -> Iterator[Any]:
    """``pool.map`` that keeps at most ``ahead`` calls in flight (bounded memory), in order."""
    pending: deque[Any] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Window:
    """Decoded parts ``(positions, images, labels)`` seen as one sequence of rows, without copying them.

    ``take`` gathers rows straight from the parts into the batch: one copy per slice instead of two
    (into a concatenated window, then into the batch).
    """

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> None:
        self.parts = parts
        sizes = [len(p[0]) for p in parts]
        self.part_of = np.repeat(np.arange(len(parts)), sizes)
        self.row_of = np.concatenate([np.arange(n) for n in sizes])
        self.positions = np.concatenate([p[0] for p in parts])

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, pick: np.ndarray) -> list[np.ndarray | None]:
        """``[positions, images, labels]`` of window rows ``pick``, in that order."""
        parts, rows = self.part_of[pick], self.row_of[pick]
        gathered: list[np.ndarray | None] = [self.positions[pick]]
        for field in (1, 2):
            first = self.parts[0][field]
            if first is None:
                gathered.append(None)
                continue
            out = np.empty((len(pick), *first.shape[1:]), dtype=first.dtype)
            for part in np.unique(parts):
                mine = parts == part
                out[mine] = self.parts[part][field][rows[mine]]  # type: ignore[index]
            gathered.append(out)
        return gathered


def _windows(parts: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]], size: int) -> Iterator[_Window]:
    """Group decoded runs ``(positions, images, labels)`` into windows of at least ``size`` rows."""
    batch: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    rows = 0
    for part in parts:
        batch.append(part)
        rows += len(part[0])
        if rows >= size:
            yield _Window(batch)
            batch, rows = [], 0
    if batch:
        yield _Window(batch)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="slice", disable=not enabled or None, leave=False)


_DONE = object()


def _prefetched(batches: Iterator[dict[str, Any]], depth: int) -> Iterator[dict[str, Any]]:
    """Run ``batches`` on a daemon thread, ``depth`` items ahead; errors re-raise in the consumer."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        """Put ``item`` unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            offer(exc)

    worker = threading.Thread(target=produce, name="slice-loader-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


__all__: list[str] = [
    "ArraySource",
    "LoaderError",
    "MemoryPlan",
    "ReadOptions",
    "Shard",
    "SliceLoader",
    "SliceSource",
    "as_source",
    "batches_per_epoch",
    "default_cache_gb",
    "epoch_order",
    "partition",
    "select_indices",
    "subject_rows",
]
