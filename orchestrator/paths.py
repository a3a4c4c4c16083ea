"""User paths and names, checked once at the command line before anything reaches Ray or MLflow.

Ray workers run in their own working directories, so every path a command hands on is absolute
(``user_path``). Names that become folder names (study, grid, run) are checked as names
(``check_name``), and every folder the tool writes is built with ``inside`` so that it lies under
its root by construction.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

#: Allowed in study, grid and run names: letters, digits, ``.``, ``_`` and ``-``, starting with a
#: letter or digit (so never ``..`` or a hidden folder), at most ``NAME_MAX_LEN`` characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX_LEN = 64


class PathCheckError(ValueError):
    """A user path or name is unusable; the message is one line naming the flag and the problem."""


def is_url(value: str | Path) -> bool:
    """True for an fsspec URL such as ``s3://bucket/store.zarr`` (left as it is)."""
    return "://" in str(value)


def user_path(value: str | Path, flag: str, must_exist: bool = True, kind: str = "any") -> str:
    """``value`` as an absolute local path (``~`` expanded), or unchanged if it is a URL.

    Args:
        value: what the user typed.
        flag: the option named in an error (``"--store"``).
        must_exist: refuse a local path that does not exist.
        kind: ``"file"``, ``"dir"`` or ``"any"``: what an existing path must be.

    Raises:
        PathCheckError: the path is missing or of the wrong kind.
    """
    if is_url(value):
        return str(value)
    path = Path(value).expanduser().absolute()
    path = Path(*_normalise(path.parts))
    shown = f"{flag} {value}" + (f" ({path})" if str(path) != str(value) else "")
    if must_exist and not path.exists():
        raise PathCheckError(f"{shown}: not found")
    if path.exists() and kind == "file" and not path.is_file():
        raise PathCheckError(f"{shown}: not a file")
    if path.exists() and kind == "dir" and not path.is_dir():
        raise PathCheckError(f"{shown}: not a directory")
    return str(path)


def _normalise(parts: tuple[str, ...]) -> list[str]:
    """Drop ``.`` and fold ``..`` lexically (a symlinked store keeps its own name)."""
    out: list[str] = []
    for part in parts:
        if part == "..":
            if len(out) > 1:
                out.pop()
        elif part != ".":
            out.append(part)
    return out


def check_name(name: str, what: str) -> str:
    """``name`` if it is a valid study/grid/run name (see ``NAME_PATTERN``), else raise.

    Raises:
        PathCheckError: one line naming ``what`` and the rule broken.
    """
    if not isinstance(name, str) or not name:
        raise PathCheckError(f"{what}: a name is required")
    if len(name) > NAME_MAX_LEN:
        raise PathCheckError(f"{what} {name[:20]!r}...: longer than {NAME_MAX_LEN} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise PathCheckError(
            f"{what} {name!r}: use letters, digits, '.', '_' and '-' only, starting with a letter or digit "
            "(no path separators, no '..')"
        )
    return name


def inside(root: Path, *parts: str) -> Path:
    """``root / parts...`` after checking each part is a plain name and the result stays under ``root``.

    Raises:
        PathCheckError: a part is a path (separator, ``..``, absolute) or the result leaves ``root``.
    """
    path = Path(root)
    for part in parts:
        text = str(part)
        if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
            raise PathCheckError(f"{text!r}: not a plain name for a folder under {root}")
        path = path / text
    resolved, base = path.resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise PathCheckError(f"{path}: resolves outside {base}")
    return path


@contextlib.contextmanager
def removed_if_left_empty(folder: str | Path) -> Iterator[None]:
    """Remove ``folder`` again if the block fails and the folder did not exist before and holds no file.

    So a command that fails on bad input leaves no empty ``--output`` behind; anything it did write
    (a database, a checkpoint) is kept.
    """
    path = Path(folder)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
            for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            path.rmdir()
        raise
