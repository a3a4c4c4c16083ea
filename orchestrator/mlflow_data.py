"""The slice store as an MLflow dataset (``mlflow.data``), logged as an input of the runs that read it.

The dataset's name is the study, its digest the store's content hash (its first ``DIGEST_LENGTH``
hex digits; the UI groups runs on the same data and tells apart runs on another ingest), its source the store URI, and its profile what a
user wants to see at a glance: subjects, slices, labelled slices, source datasets and vendors.
Contexts: ``pretraining`` on a pretraining run; ``training`` and ``test`` on a fine-tuning cell.
The split file a run used is logged next to it as the artifact ``inputs/<split file name>``.

Logging an input never fails the run: errors become warnings, like every other tracking call.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger("sspctl.mlflow_data")

CONTEXT_PRETRAINING, CONTEXT_TRAINING, CONTEXT_TEST = "pretraining", "training", "test"
#: MLflow caps a dataset digest at 36 characters: the digest is the content hash's first 32 hex
#: digits (128 bits); the full hash is in the profile (``content_hash``) and the runs' tags.
DIGEST_LENGTH = 32
#: Artifact folder of the split file a run used.
SPLIT_ARTIFACT_DIR = "inputs"


def store_profile(store: Any, subjects: list[str] | None = None) -> dict[str, Any]:
    """Profile of an opened ``SliceStore``, or of the part of it holding ``subjects`` (ids).

    Keys: ``subjects``, ``slices``, ``labelled_slices``, ``image_size``, ``store_subjects`` (the whole
    store's), and ``datasets`` / ``vendors`` mapping each name to its number of subjects.
    """
    import numpy as np

    table = store.subjects
    if subjects is not None:
        table = table[table["subject_id"].astype(str).isin({str(s) for s in subjects})]
    if subjects is None:
        n_slices, n_labelled = store.n_slices, store.n_labels
    else:
        # Rows include the padding that ends each subject on a chunk boundary; labels' too (-1).
        rows = np.zeros(store.n_rows, dtype=bool)
        for first, count in zip(table["first_row"], table["n_rows"]):
            rows[int(first): int(first) + int(count)] = True
        label_slice = store.label_slice
        n_slices, n_labelled = int(rows.sum()), int(rows[label_slice[label_slice >= 0]].sum())
    profile: dict[str, Any] = {
        "subjects": len(table), "slices": int(n_slices), "labelled_slices": int(n_labelled),
        "image_size": store.image_size, "store_subjects": len(store.subjects),
    }
    for column, key in (("dataset", "datasets"), ("vendor", "vendors")):
        if column in table.columns:
            counts = table[column].fillna("unknown").astype(str).value_counts().sort_index()
            profile[key] = {str(name): int(n) for name, n in counts.items()}
        else:
            profile[key] = {}
    return profile


def _source(uri: str) -> Any:
    """The MLflow dataset source of a store URI (local path or an fsspec URL such as ``s3://``)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": the local source, twice
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(uri)
    except Exception:  # noqa: BLE001 - a scheme MLflow has no source class for: keep the URI as it is
        return HTTPDatasetSource(uri)


def store_dataset(store_uri: str, name: str, subjects: list[str] | None = None) -> Any:
    """An ``mlflow.data`` dataset describing the store at ``store_uri`` (or its ``subjects``; opened here).

    Raises:
        datastore.store.StoreError: the store cannot be opened.
    """
    from datastore.store import SliceStore
    from mlflow.data.dataset import Dataset

    store = SliceStore.open(store_uri)
    profile = {**store_profile(store, subjects), "content_hash": store.hash or ""}
    digest = (store.hash or "")[:DIGEST_LENGTH]

    class StoreDataset(Dataset):
        """A Zarr slice store: digest = content hash, profile = ``store_profile``."""

        def _compute_digest(self) -> str:
            return digest

        def to_dict(self) -> dict[str, str]:
            import json

            return {**super().to_dict(), "profile": json.dumps(self.profile)}

        @cached_property
        def profile(self) -> dict[str, Any]:
            return profile

        @property
        def schema(self) -> None:
            return None

    uri = store_uri if "://" in store_uri else str(Path(store_uri).expanduser().resolve())
    return StoreDataset(source=_source(uri), name=name, digest=digest)


def log_store_inputs(
    tracking_uri: str,
    run_id: str,
    store_uri: str,
    inputs: list[tuple[str, str, list[str] | None]],
    split: str | Path | None = None,
) -> bool:
    """Log the store as inputs of ``run_id``, and the split file as the artifact ``inputs/<name>``.

    ``inputs``: ``(dataset name, context, subject ids or None for the whole store)`` per input. MLflow
    keeps one input per dataset name and digest in a run, so two contexts need two names (a cell
    logs ``{study}/train-b{budget}-s{seed}`` and ``{study}/test``; all carry the store's digest).
    Returns False (after a warning) when MLflow or the store could not be reached.
    """
    try:
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from orchestrator.study_tracking import client_for

        items = [
            DatasetInput(store_dataset(store_uri, name, subjects)._to_mlflow_entity(),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for name, context, subjects in inputs
        ]
        client = client_for(tracking_uri)
        client.log_inputs(run_id, datasets=items)
        if split is not None:
            client.log_artifact(run_id, str(split), SPLIT_ARTIFACT_DIR)
        return True
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        log.warning("could not log the store %s as an input of MLflow run %s (%s)", store_uri, run_id,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return False


def cell_inputs(study: str, split: str | Path, budget: Any, seed: int) -> list[tuple[str, str, list[str] | None]]:
    """The ``log_store_inputs`` inputs of a fine-tuning cell: its labelled training subset and the test set.

    Raises:
        datastore.splits.SplitError: unreadable split, or no such budget/seed.
    """
    from datastore.splits import load_split

    parsed = load_split(split)
    return [(f"{study}/train-b{budget}-s{seed}", CONTEXT_TRAINING, list(parsed.budget(budget, seed))),
            (f"{study}/test", CONTEXT_TEST, list(parsed.subjects("test")))]
