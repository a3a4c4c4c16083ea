"""Open, create or complete a store on disk (the writer's side; the caller holds the lock).

A new store's root ``zarr.json`` is written once, with every schema attribute, before any array;
a store killed during creation is completed on the next open while nothing is committed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from datastore.commitlog import CommitLog
from datastore.store.layout import (
    GROUP_NODES,
    LOCK_NAME,
    NODE_NAMES,
    SCHEMA_VERSION,
    StoreError,
    create_nodes,
    is_url,
    legacy_store_error,
    package_version,
)


def initial_attrs(
    ingest_config: dict[str, Any],
    image_size: int,
    spacing: float,
    chunk_slices: int,
    native_chunk: int,
    extra_attrs: dict[str, Any] | None,
) -> dict[str, Any]:
    """Root attributes of a new store (JSON-normalised)."""
    import zarr

    return json.loads(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "package_version": package_version(),
                "zarr_version": zarr.__version__,
                "ingest_config": ingest_config,
                "image_size": int(image_size),
                "spacing": float(spacing),
                "chunk_slices": int(chunk_slices),
                "native_chunk": int(native_chunk),
                "hash": None,
                "complete": False,
                **(extra_attrs or {}),
            }
        )
    )


def local_store_exists(target: str) -> bool:
    """True when ``target`` holds anything besides the writer lock file."""
    path = Path(target)
    if not path.exists():
        return False
    return not path.is_dir() or any(p.name != LOCK_NAME for p in path.iterdir())


def open_or_create(target: str, fresh: dict[str, Any], extra_attrs: dict[str, Any] | None) -> Any:
    """The root group of a new, half-created or resumable store at ``target`` (lock held).

    ``fresh`` = the root attributes of a new store; ``extra_attrs`` (sources, csv_checksums) are
    merged into those of an existing one.

    A new store's root ``zarr.json`` is written once, with every schema attribute, before any
    array: a kill can leave arrays missing (recreated here while nothing is committed) but never
    a group without attributes. A group without attributes holding only empty sspctl nodes (left
    by an older version killed during creation) is completed as well.
    """
    import zarr

    exists = _url_exists(target) if is_url(target) else local_store_exists(target)
    sizes = (int(fresh["image_size"]), int(fresh["chunk_slices"]), int(fresh["native_chunk"]))
    if not exists:
        group = zarr.open_group(target, mode="w-" if is_url(target) else "a", attributes=fresh)
        create_nodes(group, *sizes, NODE_NAMES)
        return group
    try:
        group = zarr.open_group(target, mode="r+")
    except Exception as exc:  # noqa: BLE001
        raise StoreError(f"{target}: exists but is not a zarr store ({exc})") from None
    attrs = dict(group.attrs)
    if not attrs and _is_zarr_group_document(target) and _holds_only_empty_nodes(group):
        create_nodes(group, *sizes, NODE_NAMES, overwrite=True)
        group.attrs.update(fresh)  # last: a kill before it leaves the same recognisable state
        return group
    if "schema_version" not in attrs:
        raise StoreError(f"{target}: exists and is not an sspctl store of schema_version {SCHEMA_VERSION}")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise legacy_store_error(target, attrs)
    if attrs.get("ingest_config") != fresh["ingest_config"]:
        raise StoreError(
            f"{target}: was ingested with another config ({_config_diff(attrs.get('ingest_config') or {}, fresh['ingest_config'])}); "
            "use a new --store path"
        )
    committed = bool(CommitLog(target).read().rows)
    _complete_nodes(group, target, attrs, committed)
    extra = json.loads(json.dumps(extra_attrs or {}))
    if committed:
        _check_csv_checksums(target, attrs.get("csv_checksums") or {}, extra.get("csv_checksums") or {})
    for key, value in extra.items():  # e.g. a rerun with only --mnms2 keeps the mnms root
        if isinstance(value, dict) and isinstance(attrs.get(key), dict):
            extra[key] = {**attrs[key], **value}
    if any(attrs.get(k) != v for k, v in extra.items()):
        group.attrs.update(extra)  # e.g. sources moved; a no-op rerun writes nothing
    return group


def _is_zarr_group_document(target: str) -> bool:
    """True if the root ``zarr.json`` is a complete zarr v3 group document (as zarr writes it)."""
    try:
        if is_url(target):
            import fsspec

            with fsspec.open(f"{target.rstrip('/')}/zarr.json", "rb") as handle:
                document = json.loads(handle.read())
        else:
            document = json.loads((Path(target) / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("zarr_format") == 3 and document.get("node_type") == "group"


def _holds_only_empty_nodes(group: Any) -> bool:
    """True if every node under ``group`` is an empty sspctl array or group (nothing ingested)."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lock file is "not a component of a Zarr hierarchy"
        members = group.members(max_depth=None)
    for name, node in members:
        if name in GROUP_NODES and isinstance(node, zarr.Group):
            continue
        if name in NODE_NAMES and isinstance(node, zarr.Array) and node.shape[:1] == (0,):
            continue
        return False
    return True


def _missing_nodes(group: Any) -> list[str]:
    missing = []
    for name in NODE_NAMES:
        try:
            group[name]
        except KeyError:
            missing.append(name)
    return missing


def _complete_nodes(group: Any, target: str, attrs: dict[str, Any], committed: bool) -> None:
    """Create the nodes a creation killed half-way left out; refuse if subjects are committed."""
    missing = _missing_nodes(group)
    if not missing:
        return
    if committed:
        raise StoreError(f"{target}: node(s) {', '.join(missing)} missing from a store with committed subjects; use a new --store path")
    create_nodes(group, int(attrs["image_size"]), int(attrs["chunk_slices"]), int(attrs["native_chunk"]), missing)


def _check_csv_checksums(target: str, stored: dict[str, str], current: dict[str, str]) -> None:
    """Refuse to resume when a metadata CSV (matched by file name) changed since it was ingested."""
    for path, digest in sorted(current.items()):
        for old_path, old in sorted(stored.items()):
            if Path(old_path).name == Path(path).name and old != digest:
                raise StoreError(
                    f"{path}: changed since subjects were ingested into {target} (sha256 {old[:12]}... -> "
                    f"{digest[:12]}...); resuming would mix old and new metadata: use a new --store path"
                )


def _url_exists(url: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    new = json.loads(json.dumps(new))
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown difference"
