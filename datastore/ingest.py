"""Ingest raw M&Ms / M&Ms-2 / ACDC / manifest subjects into the slice store: Ray tasks, one writer, resume.

``plan_ingest`` discovers the subjects, opens (or resumes) the store and lists what is left to do;
it needs no Ray. ``execute_ingest`` processes the remaining subjects as Ray tasks (the caller
initialises Ray; ``executor="serial"`` runs them in-process instead), and the driver appends the
results in plan order. A subject is committed as a whole (see ``datastore/store.py``), so a killed
ingest resumes without duplicates or losses, and the content hash does not depend on the
completion order. The plan holds the store's writer lock until ``execute_ingest`` finishes; a
resume whose CSV or committed source files changed is refused.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datastore.acdc import ACDC, discover_acdc
from datastore.config import IngestConfig
from datastore.formats import DATASETS, Discovery, FormatError, SkippedSubject, SubjectSource, discover
from datastore.manifest import discover_manifest
from datastore.store import StoreWriter, SubjectRecord

#: Test-only: crash the driver after this many commits, with the next subject's rows written but
#: not committed (the worst moment for a kill). ``SSPCTL_INGEST_CRASH_MODE=sigkill`` makes the
#: process SIGKILL itself there instead of raising :class:`InjectedCrash`.
CRASH_ENV = "SSPCTL_INGEST_CRASH_AFTER"
CRASH_MODE_ENV = "SSPCTL_INGEST_CRASH_MODE"


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


def _check_committed_sources(writer: StoreWriter, subjects: list[SubjectSource]) -> None:
    """Refuse to resume when a source file of an already committed subject changed.

    Compares the sha256 recorded in the subject table (``sources``: file name -> sha256) with the
    current files. Costs one read of those files (a rerun of a finished ingest re-hashes them).

    Raises:
        IngestError: one line naming the first changed file and the number of changed files.
    """
    from datastore.formats import sha256_file

    rows = {(r["dataset"], r["subject_id"]): r for r in writer.commit["subjects"]}
    changed: list[str] = []
    for source in subjects:
        recorded = (rows.get((source.dataset, source.subject_id)) or {}).get("sources") or {}
        for path in source.files.values():
            old = recorded.get(path.name)
            if old is not None and sha256_file(path) != old:
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
    record.info["content_hash"] = record.content_hash()
    return record


def _results_ray(
    todo: list[SubjectSource], config: IngestConfig, max_in_flight: int
) -> Iterator[SubjectRecord | SkippedSubject]:
    """Yield results in ``todo`` order from Ray tasks, with at most ``max_in_flight`` subjects running
    or finished-but-unwritten.

    Results are yielded in plan order, not completion order, so that the store's row layout (and so
    the loader's chunk ownership and batches) is the same for every ingest of the same data,
    resumed or not, whatever the number of workers.
    """
    import ray

    if not ray.is_initialized():
        raise IngestError("Ray is not initialised (the caller must start it, e.g. ray_session())")
    task = ray.remote(num_cpus=1, max_retries=1)(process_subject)
    config_ref = ray.put(config)
    queue = list(enumerate(todo))
    pending: dict[Any, tuple[int, SubjectSource]] = {}
    finished: dict[int, SubjectRecord | SkippedSubject] = {}
    next_index = 0
    while queue or pending or finished:
        while queue and len(pending) + len(finished) < max_in_flight:
            index, source = queue.pop(0)
            pending[task.remote(source, config_ref)] = (index, source)
        if next_index in finished:
            yield finished.pop(next_index)
            next_index += 1
            continue
        ready, _ = ray.wait(list(pending), num_returns=1)
        index, source = pending.pop(ready[0])
        try:
            item = ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # a worker died (e.g. out of memory) twice
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            item = SkippedSubject(
                source.dataset, source.subject_id, f"{source.main_file}: Ray task failed ({type(exc).__name__}: {first})"
            )
        finished[index] = item


def _results_serial(todo: list[SubjectSource], config: IngestConfig) -> Iterator[SubjectRecord | SkippedSubject]:
    for source in todo:
        yield process_subject(source, config)


def execute_ingest(
    plan: IngestPlan,
    executor: Literal["ray", "serial"] = "ray",
    max_in_flight: int = 4,
    progress: bool = True,
) -> IngestResult:
    """Process ``plan.todo``, append each result in plan order, then finalize the store.

    Raises:
        InjectedCrash: only with the test-only ``SSPCTL_INGEST_CRASH_AFTER`` environment variable.
    """
    from tqdm import tqdm

    result = IngestResult(
        store=plan.store, already=plan.already, skipped=list(plan.skipped), warnings=list(plan.warnings)
    )
    crash_after = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
    writer = plan.writer
    results = (
        _results_ray(plan.todo, plan.config, max(1, max_in_flight))
        if executor == "ray" and plan.todo
        else _results_serial(plan.todo, plan.config)
    )
    bar = tqdm(total=len(plan.todo), desc="ingest", unit="subject", disable=not progress or None, leave=False)
    try:
        _write_results(results, writer, result, crash_after, bar, progress)
        result.hash = writer.finalize(
            {"skipped": [{"dataset": s.dataset, "subject_id": s.subject_id, "reason": s.reason} for s in result.skipped]}
        )  # merged with the skips of earlier runs; releases the writer lock
    finally:
        bar.close()
        writer.close()  # after a failure: release the lock so that a rerun in this process resumes
    result.n_subjects = len(writer.commit["subjects"])
    result.n_slices = int(writer.commit["n_slices"])
    return result


def _write_results(
    results: Iterator[SubjectRecord | SkippedSubject],
    writer: StoreWriter,
    result: IngestResult,
    crash_after: int | None,
    bar: Any,
    progress: bool,
) -> None:
    """Append each processed subject in plan order, recording skips in ``result``."""
    for item in results:
        bar.update(1)
        if isinstance(item, SkippedSubject):
            result.skipped.append(item)
            if progress:
                bar.write(f"skipped: {item.reason}", file=sys.stderr)
            continue
        for message in item.warnings:
            result.warnings.append(message)
            if progress:
                bar.write(f"warning: {message}", file=sys.stderr)
        row = writer.write_rows(item, item.info.get("content_hash"))
        if crash_after is not None and len(result.ingested) >= crash_after:
            if os.environ.get(CRASH_MODE_ENV) == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedCrash(f"{CRASH_ENV}={crash_after}: crashing before committing {item.subject_id}")
        writer.commit_subject(row)
        result.ingested.append((item.dataset, item.subject_id))
