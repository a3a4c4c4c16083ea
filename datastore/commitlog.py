"""The store's subject table as an append-only commit log: one small object per commit.

Schema 2 (``docs/store.md``, "Commit log") keeps the subject table out of the root ``zarr.json``:
each commit writes one new object ``<store>/commits/<first>-<last>.json`` (commit sequence numbers,
9 digits) holding the rows it adds and the counts after it, so a commit costs the same at subject
50,000 as at subject 1. ``compact`` (run by ``finalize``) replaces the loose entries by one object
covering them all; a reader follows the chain of entries from sequence 0, taking the widest entry
at each step, so a compaction killed half-way (new object written, old ones not yet removed) reads
the same.

Local stores write each entry to a hidden temporary file and publish it with ``os.link``, which
fails if the name exists: two writers can never both publish commit ``k`` (the second gets
:class:`CommitConflict`). fsspec URLs check for the name first (object stores PUT atomically, but
the check and the PUT are two requests).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Folder of the commit log inside the store.
LOG_DIR = "commits"
_ENTRY = re.compile(r"^(\d{9})-(\d{9})\.json$")


class CommitConflict(RuntimeError):
    """Commit ``seq`` already exists: another process committed to this store meanwhile."""


@dataclass
class LogState:
    """What a log holds: every committed subject row in commit order, and the counts after them.

    Attributes:
        rows: subject-table rows (dicts), in commit order.
        counts: extents after the last commit (``{}`` for an empty log); see ``datastore.store``.
        next_seq: sequence number of the next commit.
        entries: names of the entries on the chain, in order.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    next_seq: int = 0
    entries: list[str] = field(default_factory=list)


def entry_name(first: int, last: int) -> str:
    return f"{first:09d}-{last:09d}.json"


class CommitLog:
    """The commit log of the store at ``target`` (local path or fsspec URL)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._url = "://" in target
        self._fs: Any = None
        self._root = f"{target.rstrip('/')}/{LOG_DIR}"
        if self._url:
            import fsspec

            self._fs, root = fsspec.core.url_to_fs(target)
            self._root = f"{root.rstrip('/')}/{LOG_DIR}"

    def _names(self) -> list[str]:
        if self._url:
            if not self._fs.exists(self._root):
                return []
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._root, detail=False)]
        try:
            return os.listdir(self._root)
        except FileNotFoundError:
            return []

    def _read(self, name: str) -> dict[str, Any]:
        path = f"{self._root}/{name}"
        data = self._fs.cat_file(path) if self._url else Path(path).read_bytes()
        return json.loads(data)

    def read(self) -> LogState:
        """The committed state: follow the chain of entries from sequence 0 (widest entry first)."""
        spans: dict[int, list[int]] = {}
        for name in self._names():
            match = _ENTRY.match(name)
            if match:
                spans.setdefault(int(match.group(1)), []).append(int(match.group(2)))
        state = LogState()
        seq = 0
        while seq in spans:
            last = max(spans[seq])
            entry = self._read(entry_name(seq, last))
            state.rows.extend(entry["rows"])
            state.counts = entry["counts"]
            state.entries.append(entry_name(seq, last))
            seq = last + 1
        state.next_seq = seq
        return state

    def exists(self, seq: int) -> bool:
        """True when commit ``seq`` has been published (one existence check)."""
        path = f"{self._root}/{entry_name(seq, seq)}"
        return bool(self._fs.exists(path)) if self._url else os.path.exists(path)

    def append(self, seq: int, rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
        """Publish commit ``seq`` (one object) holding ``rows`` and the ``counts`` after them.

        Raises:
            CommitConflict: commit ``seq`` exists (another writer committed).
        """
        self._publish(entry_name(seq, seq), {"rows": rows, "counts": counts})

    def compact(self, state: LogState) -> None:
        """Replace the entries of ``state`` by one entry covering them (a no-op for 0 or 1 entry)."""
        if len(state.entries) < 2:
            return
        name = entry_name(0, state.next_seq - 1)
        self._publish(name, {"rows": state.rows, "counts": state.counts}, replace=True)
        for old in state.entries:
            if old != name:
                self._remove(old)
        state.entries = [name]

    def _publish(self, name: str, entry: dict[str, Any], replace: bool = False) -> None:
        data = json.dumps(entry, separators=(",", ":")).encode()
        final = f"{self._root}/{name}"
        if self._url:
            if not replace and self._fs.exists(final):
                raise CommitConflict(name)
            self._fs.makedirs(self._root, exist_ok=True)
            self._fs.pipe_file(final, data)
            return
        os.makedirs(self._root, exist_ok=True)
        temp = f"{self._root}/.{name}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        try:
            if replace:
                os.replace(temp, final)
                return
            os.link(temp, final)  # atomic and exclusive: fails if commit ``name`` exists
        except FileExistsError:
            raise CommitConflict(name) from None
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def _remove(self, name: str) -> None:
        path = f"{self._root}/{name}"
        if self._url:
            self._fs.rm_file(path)
        else:
            Path(path).unlink(missing_ok=True)
