"""Ingest raw M&Ms / M&Ms-2 / ACDC / manifest subjects into the slice store: parallel writers, resume.

``plan_ingest`` discovers the subjects, opens (or resumes) the store and lists what is left to do;
it needs no Ray. ``execute_ingest`` runs the remaining subjects through two kinds of Ray task (the
caller initialises Ray; ``executor="serial"`` runs everything in-process instead):

1. *process* reads and preprocesses a subject and returns its summary (no pixels) to the driver;
   the pixels stay in Ray's object store;
2. the driver allocates the subject's chunk-aligned rows (in plan order), and a *write* task writes
   the pixels there: writers never share a chunk;
3. the driver commits finished subjects in allocation order: their per-row metadata, then one
   commit-log entry (``datastore/store/writer.py``).

A subject is committed as a whole, so a killed ingest resumes without duplicates or losses, and
the row layout and the content hash do not depend on the completion order. The plan holds the
store's writer lock until ``execute_ingest`` finishes; a resume whose CSV or committed source
files changed is refused (a file whose size and mtime match its record is not re-hashed).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datastore.acdc import ACDC, discover_acdc
from datastore.config import IngestConfig
from datastore.formats import DATASETS, Discovery, FormatError, SkippedSubject, SubjectSource, discover
from datastore.manifest import discover_manifest
from datastore.store import PendingSubject, StoreWriter, SubjectRecord, SubjectSummary, write_subject_data

#: Test-only: crash the driver after this many commits, with the next subject's rows written but
#: not committed (the worst moment for a kill). ``SSPCTL_INGEST_CRASH_MODE=sigkill`` makes the
#: process SIGKILL itself there instead of raising :class:`InjectedCrash`.
CRASH_ENV = "SSPCTL_INGEST_CRASH_AFTER"
CRASH_MODE_ENV = "SSPCTL_INGEST_CRASH_MODE"


#: Stage names of ``IngestResult.stages``.
STAGES = ("process", "write", "allocate", "commit", "finalize")


class IngestError(RuntimeError):
    """Nothing can be ingested (bad source root or CSV, or a store of another config)."""


class InjectedCrash(RuntimeError):
    """Raised by the test-only crash hook ``SSPCTL_INGEST_CRASH_AFTER``."""


@dataclass
class IngestPlan:
    """What an ingest run will do; built by :func:`plan_ingest`."""

    store: str
    config: IngestConfig
    writer: StoreWriter
    todo: list[SubjectSource]
    already: int
    skipped: list[SkippedSubject]
    warnings: list[str]
    complete: bool

    @property
    def noop(self) -> bool:
        """True when the store is finished and holds every usable discovered subject."""
        return self.complete and not self.todo


@dataclass
class IngestResult:
    """Outcome of :func:`execute_ingest`."""

    store: str
    ingested: list[tuple[str, str]] = field(default_factory=list)
    already: int = 0
    skipped: list[SkippedSubject] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hash: str | None = None
    n_subjects: int = 0
    n_slices: int = 0
    #: Seconds per stage summed over this run's subjects: ``process`` and ``write`` (in the
    #: workers), ``allocate`` and ``commit`` (in the driver), ``finalize`` (driver, once).
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    #: ``(subjects committed so far, seconds of that commit, perf_counter after it)`` per commit:
    #: how the cost of a commit grows with the store (``benchmarks/scale.py``).
    commits: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped


#: ``plan_ingest`` source keys: the directory layouts, plus ``manifest`` (one or more files).
SOURCE_KINDS = (*DATASETS, ACDC, "manifest")


def discover_sources(sources: Mapping[str, Path | str | Sequence[Path | str] | None]) -> list[Discovery]:
    """Discover every given source: ``{"mnms": dir, "mnms2": dir, "acdc": dir, "manifest": [files]}``.

    ``None`` entries are ignored. A subject that two sources give under one dataset and id is
    skipped (in both). Raises :class:`IngestError` when nothing is given, a key is unknown, or a
    root or manifest is unusable as a whole.
    """
    given = {k: v for k, v in sources.items() if v is not None and v != [] and v != ()}
    if not given:
        raise IngestError("give at least one source (--mnms, --mnms2, --acdc or --manifest)")
    unknown = set(given) - set(SOURCE_KINDS)
    if unknown:
        raise IngestError(f"unknown source(s) {sorted(unknown)}; expected {SOURCE_KINDS}")
    found: list[Discovery] = []
    try:
        for kind in sorted(given):
            value = given[kind]
            if kind == "manifest":
                paths = [value] if isinstance(value, (str, Path)) else list(value)  # type: ignore[arg-type]
                found.extend(discover_manifest(Path(p)) for p in paths)
            elif kind == ACDC:
                found.append(discover_acdc(Path(value)))  # type: ignore[arg-type]
            else:
                found.append(discover(Path(value), kind))  # type: ignore[arg-type]
    except FormatError as exc:
        raise IngestError(str(exc)) from None
    _skip_cross_source_duplicates(found)
    return found


def _skip_cross_source_duplicates(found: list[Discovery]) -> None:
    """A (dataset, id) given by two sources is skipped in both, naming both (as in one CSV)."""
    roots: dict[tuple[str, str], list[str]] = {}
    for discovery in found:
        for subject in discovery.subjects:
            roots.setdefault((subject.dataset, subject.subject_id), []).append(str(discovery.root))
    twice = {key: where for key, where in roots.items() if len(where) > 1}
    for discovery in found:
        for subject in [s for s in discovery.subjects if (s.dataset, s.subject_id) in twice]:
            discovery.subjects.remove(subject)
            where = twice[(subject.dataset, subject.subject_id)]
            discovery.skipped.append(SkippedSubject(
                subject.dataset, subject.subject_id,
                f"{subject.main_file}: subject {subject.dataset}/{subject.subject_id} is given by {len(where)} sources "
                f"({', '.join(where)}); give it once, or another 'dataset' in the manifest",
            ))


def _one_per_subject(skipped: Sequence[SkippedSubject]) -> list[SkippedSubject]:
    """A source's skips with one entry per subject (the first reason): a bad id is reported by its CSV
    row and its folder. Across sources every entry stays (a subject given twice names each source)."""
    by_subject: dict[tuple[str, str], SkippedSubject] = {}
    for skip in skipped:
        by_subject.setdefault((skip.dataset, skip.subject_id), skip)
    return list(by_subject.values())


def plan_ingest(
    sources: Mapping[str, Path | str | Sequence[Path | str] | None],
    store: str | os.PathLike[str],
    config: IngestConfig,
) -> IngestPlan:
    """Discover subjects of every given source and open or resume the store.

    Args:
        sources: ``{"mnms": dir, "mnms2": dir, "acdc": dir, "manifest": [file, ...]}``; ``None``
            entries are ignored. Every subject records its source dataset in the subject table.
        store: local path or fsspec URL of the store.
        config: ingest settings (must equal the store's if it exists).

    Raises:
        IngestError: no source given, a root/CSV/manifest is unusable, or the store holds another config.
    """
    from datastore.store import StoreError

    found = discover_sources(sources)
    csv_checksums = {k: v for d in found for k, v in d.csv_checksums.items()}
    try:
        writer = StoreWriter.open(
            store,
            config.store_fields(),
            image_size=config.size,
            spacing=config.spacing,
            chunk_slices=config.chunk_slices,
            extra_attrs={
                "sources": {d.dataset: str(d.root.resolve()) for d in found},  # manifest: its folder
                "csv_checksums": csv_checksums,
            },
        )
    except StoreError as exc:
        raise IngestError(str(exc)) from None
    subjects = [s for d in found for s in d.subjects]
    try:
        _check_committed_sources(writer, subjects)
    except IngestError:
        writer.close()
        raise
    done = writer.done
    todo = [s for s in subjects if (s.dataset, s.subject_id) not in done]
    skipped = [s for d in found for s in _one_per_subject(d.skipped) if (s.dataset, s.subject_id) not in done]
    warnings = [*writer.warnings, *(w for d in found for w in d.warnings)]
    complete = bool(dict(writer.group.attrs).get("complete", False))
    plan = IngestPlan(
        store=writer.path,
        config=config,
        writer=writer,
        todo=todo,
        already=len(subjects) - len(todo),
        skipped=skipped,
        warnings=warnings,
        complete=complete,
    )
    if plan.noop:
        writer.close()  # nothing to write: do not hold the lock (execute_ingest takes it again)
    return plan


def file_stat(path: Path) -> list[int]:
    """``[size in bytes, mtime in ns]`` of a source file: recorded beside its sha256."""
    stat = path.stat()
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def _check_committed_sources(writer: StoreWriter, subjects: list[SubjectSource]) -> None:
    """Refuse to resume when a source file of an already committed subject changed.

    Compares the sha256 recorded in the subject table (``sources``: file name -> sha256) with the
    current files. A file whose size and mtime equal the recorded ``source_stats`` is trusted
    without reading it, so a no-op rerun costs one ``stat`` per file (rows of older runs without
    ``source_stats`` are re-hashed).

    Raises:
        IngestError: one line naming the first changed file and the number of changed files.
    """
    from datastore.formats import sha256_file

    rows = {(r["dataset"], r["subject_id"]): r for r in writer.commit["subjects"]}
    changed: list[str] = []
    for source in subjects:
        row = rows.get((source.dataset, source.subject_id)) or {}
        recorded, stats = row.get("sources") or {}, row.get("source_stats") or {}
        for path in source.files.values():
            old = recorded.get(path.name)
            if old is None or stats.get(path.name) == file_stat(path):
                continue
            if sha256_file(path) != old:
                changed.append(str(path))
    if changed:
        more = f" ({len(changed)} changed files in all)" if len(changed) > 1 else ""
        raise IngestError(
            f"{changed[0]}: changed since it was ingested into {writer.path}{more}; resuming would mix "
            "old and new data: use a new --store path"
        )


def process_subject(source: SubjectSource, config: IngestConfig) -> SubjectRecord | SkippedSubject:
    """Read, validate and preprocess one subject (runs inside a Ray task or in-process)."""
    import torch

    from datastore.formats import read_subject
    from datastore.preprocess import preprocess

    torch.set_num_threads(1)  # one task per CPU: avoid oversubscription
    try:
        stats = {path.name: file_stat(path) for path in source.files.values()}  # before reading: a later change re-hashes
        record = preprocess(read_subject(source), config)
    except FormatError as exc:
        return SkippedSubject(source.dataset, source.subject_id, str(exc))
    except Exception as exc:  # noqa: BLE001 - report and keep ingesting the others
        message = str(exc).splitlines()[0] if str(exc) else ""
        return SkippedSubject(
            source.dataset,
            source.subject_id,
            f"{source.main_file}: unexpected {type(exc).__name__}: {message}",
        )
    record.info["source_stats"] = stats
    record.info["content_hash"] = record.content_hash()
    return record


def process_for_store(source: SubjectSource, config: IngestConfig) -> tuple[SubjectSummary | SkippedSubject, SubjectRecord | None]:
    """:func:`process_subject` split for the driver: the summary it needs, and the record for the writer."""
    start = time.perf_counter()
    item = process_subject(source, config)
    if isinstance(item, SkippedSubject):
        return item, None
    summary = item.summary(item.info["content_hash"])
    summary.process_s = time.perf_counter() - start
    return summary, item


@dataclass
class _Progress:
    """What the driver reports as subjects finish (skips, warnings, commits)."""

    result: IngestResult
    bar: Any
    verbose: bool
    crash_after: int | None

    def skipped(self, item: SkippedSubject) -> None:
        self.result.skipped.append(item)
        self.bar.update(1)
        if self.verbose:
            self.bar.write(f"skipped: {item.reason}", file=sys.stderr)

    def add(self, stage: str, seconds: float) -> None:
        self.result.stages[stage] += seconds

    def allocate(self, writer: StoreWriter, summary: SubjectSummary) -> PendingSubject:
        start = time.perf_counter()
        pending = writer.allocate(summary)
        self.add("allocate", time.perf_counter() - start)
        self.add("process", summary.process_s)
        return pending

    def warned(self, summary: SubjectSummary) -> None:
        for message in summary.warnings:
            self.result.warnings.append(message)
            if self.verbose:
                self.bar.write(f"warning: {message}", file=sys.stderr)

    def commit(self, writer: StoreWriter, written: Sequence[PendingSubject]) -> None:
        """Commit ``written`` (oldest first); the test-only crash hook fires before the commit it names."""
        if self.crash_after is not None and len(self.result.ingested) + len(written) > self.crash_after:
            self._commit(writer, written[: max(self.crash_after - len(self.result.ingested), 0)])
            if os.environ.get(CRASH_MODE_ENV) == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedCrash(f"{CRASH_ENV}={self.crash_after}: crashing before committing another written subject")
        self._commit(writer, written)

    def _commit(self, writer: StoreWriter, written: Sequence[PendingSubject]) -> None:
        start = time.perf_counter()
        writer.commit_subjects(written)
        end = time.perf_counter()
        self.add("commit", end - start)
        self.result.commits.append((len(writer.state.rows), end - start, end))
        self.result.ingested.extend((p.summary.dataset, p.summary.subject_id) for p in written)
        self.bar.update(len(written))


def _run_serial(plan: IngestPlan, progress: _Progress) -> None:
    """Process, write and commit each subject in this process, in plan order."""
    for source in plan.todo:
        summary, record = process_for_store(source, plan.config)
        if isinstance(summary, SkippedSubject):
            progress.skipped(summary)
            continue
        assert record is not None
        progress.warned(summary)
        pending = progress.allocate(plan.writer, summary)
        progress.add("write", write_subject_data(plan.writer.group, record, pending.allocation))
        progress.commit(plan.writer, [pending])


def _run_ray(plan: IngestPlan, progress: _Progress, max_in_flight: int) -> None:
    """Process and write subjects in Ray tasks; allocate in plan order and commit in that order.

    At most ``max_in_flight`` subjects are being processed, waiting for their turn, or being
    written (their pixels wait in Ray's object store, not in the driver).
    """
    import ray

    if not ray.is_initialized():
        raise IngestError("Ray is not initialised (the caller must start it, e.g. ray_session())")
    process = ray.remote(num_cpus=1, max_retries=1, num_returns=2)(process_for_store)
    write = ray.remote(num_cpus=1, max_retries=2)(write_subject_data)
    writer, config_ref = plan.writer, ray.put(plan.config)
    queue = deque(enumerate(plan.todo))
    processing: dict[Any, tuple[int, SubjectSource, Any]] = {}  # summary ref -> (index, source, record ref)
    finished: dict[int, tuple[SubjectSummary | SkippedSubject, Any]] = {}
    writing: dict[Any, PendingSubject] = {}
    order: deque[tuple[PendingSubject, Any]] = deque()  # allocated, uncommitted, in allocation order
    done: set[Any] = set()
    next_index = 0
    while queue or processing or finished or order:
        while queue and len(processing) + len(finished) + len(order) < max_in_flight:
            index, source = queue.popleft()
            summary_ref, record_ref = process.remote(source, config_ref)
            processing[summary_ref] = (index, source, record_ref)
        while next_index in finished:  # allocate in plan order: the same layout for any completion order
            summary, record_ref = finished.pop(next_index)
            next_index += 1
            if isinstance(summary, SkippedSubject):
                progress.skipped(summary)
                continue
            progress.warned(summary)
            pending = progress.allocate(writer, summary)
            ref = write.remote(writer.path, record_ref, pending.allocation)
            writing[ref] = pending
            order.append((pending, ref))
        written = []
        while order and order[0][1] in done:
            pending, ref = order.popleft()
            done.discard(ref)
            written.append(pending)
        if written:
            progress.commit(writer, written)
            continue
        ready, _ = ray.wait([*processing, *writing], num_returns=1)
        if ready[0] in writing:
            progress.add("write", _write_seconds(ready[0], writing.pop(ready[0])))
            done.add(ready[0])
            continue
        index, source, record_ref = processing.pop(ready[0])
        try:
            finished[index] = (ray.get(ready[0]), record_ref)
        except ray.exceptions.RayError as exc:  # a worker died (e.g. out of memory) twice
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"{source.main_file}: Ray task failed ({type(exc).__name__}: {first})"
            finished[index] = (SkippedSubject(source.dataset, source.subject_id, reason), None)


def _write_seconds(ref: Any, pending: PendingSubject) -> float:
    """A finished write task's seconds; a failed one's own error (e.g. ``OSError`` ENOSPC) re-raised in one line."""
    import ray

    try:
        return float(ray.get(ref))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OSError):
            raise cause from None
        first = str(cause or exc).strip().splitlines()[0] if str(cause or exc).strip() else type(exc).__name__
        raise IngestError(f"writing subject {pending.summary.dataset}/{pending.summary.subject_id} failed ({first})") from None


def execute_ingest(
    plan: IngestPlan,
    executor: Literal["ray", "serial"] = "ray",
    max_in_flight: int = 4,
    progress: bool = True,
) -> IngestResult:
    """Process, write and commit ``plan.todo`` (see the module doc), then finalize the store.

    Raises:
        OSError: a write failed (e.g. a full disk); every committed subject stays, a rerun resumes.
        InjectedCrash: only with the test-only ``SSPCTL_INGEST_CRASH_AFTER`` environment variable.
    """
    from tqdm import tqdm

    result = IngestResult(
        store=plan.store, already=plan.already, skipped=list(plan.skipped), warnings=list(plan.warnings)
    )
    crash_after = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
    writer = plan.writer
    bar = tqdm(total=len(plan.todo), desc="ingest", unit="subject", disable=not progress or None, leave=False)
    reporter = _Progress(result, bar, progress, crash_after)
    try:
        if executor == "ray" and plan.todo:
            _run_ray(plan, reporter, max(1, max_in_flight))
        else:
            _run_serial(plan, reporter)
        start = time.perf_counter()
        result.hash = writer.finalize(
            {"skipped": [{"dataset": s.dataset, "subject_id": s.subject_id, "reason": s.reason} for s in result.skipped]}
        )  # merged with the skips of earlier runs; releases the writer lock
        reporter.add("finalize", time.perf_counter() - start)
    finally:
        bar.close()
        writer.close()  # after a failure: release the lock so that a rerun in this process resumes
    result.n_subjects = len(writer.commit["subjects"])
    result.n_slices = int(writer.commit["n_slices"])
    return result
