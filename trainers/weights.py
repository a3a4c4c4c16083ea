"""Exported pretrained weights: the files, their manifest, and the strict part loader of fine-tuning.

A pretraining run directory ``<workspace>/pretrain/<run_name>/`` holds, per exported part,
``<part>.pt``: a plain ``dict[str, Tensor]`` (keys equal to ``UNet2d.state_dict()`` keys under
``encoder.`` and, for ``encoder_decoder``, ``decoder.``) saved with ``torch.save`` and loadable with
``torch.load(weights_only=True)``; plus ``manifest.json`` (``WeightsManifest``), written last, so a
directory with a manifest is a finished run.

Each part exists as the last epoch's weights (``<part>.pt``, listed in ``files``) and, when the run
selected one, as its best checkpoint (``<part>_best.pt``, listed in ``best.files``: lowest validation
loss, or for DINO lowest epoch training loss, as published). Fine-tuning picks one with
``checkpoint="last" | "best"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from trainers.safe_io import atomic_torch_save, safe_torch_load

MANIFEST_FILE = "manifest.json"
Part = Literal["encoder", "encoder_decoder"]
Checkpoint = Literal["last", "best"]
#: Key prefixes of ``UNet2d.state_dict()`` that each transferable part covers.
PART_PREFIXES: dict[str, tuple[str, ...]] = {"encoder": ("encoder.",), "encoder_decoder": ("encoder.", "decoder.")}


class WeightsError(ValueError):
    """Weights or manifest cannot be used; the message is one line naming the file and the problem."""


class PartMismatchError(WeightsError):
    """``load_pretrained`` refused a part; ``report`` says which keys matched, were missing or unexpected."""

    def __init__(self, message: str, report: "LoadReport") -> None:
        super().__init__(message)
        self.report = report


class BestCheckpoint(BaseModel):
    """The best epoch of a pretraining run: its 0-based ``epoch``, the ``loss`` that selected it and
    which loss that was (``metric``: ``valid_loss``, or ``train_loss`` for DINO, which has no
    validation loop), and ``files`` (part -> file name in the run directory, e.g. ``encoder_best.pt``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int
    loss: float
    metric: Literal["valid_loss", "train_loss"]
    files: dict[str, str]


class WeightsManifest(BaseModel):
    """``manifest.json`` of a pretraining run (the cross-package contract in ``docs/architecture.md``).

    ``files`` maps part name -> file name in the run directory; ``sha256`` the same file names -> digest.
    ``final_loss`` is the mean training loss of the last epoch; ``epochs`` the number of epochs trained;
    ``model_width`` the U-Net base width (``UNet2d(image_size, 4, width=model_width)`` loads the files).
    ``files`` holds the last epoch's weights; ``best`` (``None`` when the run selected none, e.g.
    without validation subjects) the best epoch's, whose digests are in ``sha256`` too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    run_name: str
    config: dict[str, Any]
    dataset_hash: str
    epochs: int
    final_loss: float
    image_size: int
    model_width: int = 32
    mlflow_run_id: str | None = None
    files: dict[str, str]
    sha256: dict[str, str] = {}
    best: BestCheckpoint | None = None


@dataclass(frozen=True)
class LoadReport:
    """Outcome of ``load_pretrained``: model keys loaded, part keys the file lacks, file keys the part lacks.

    ``ignored`` lists file keys outside the requested part (e.g. ``decoder.*`` when loading only the
    encoder from an encoder+decoder file); they are not loaded and are not an error. ``file`` is the
    weights file that was read and ``sha256`` the digest of its bytes.
    """

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: list[str] = field(default_factory=list)
    file: str = ""
    sha256: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """Save a flat ``{key: tensor}`` dict (detached, contiguous CPU copies) atomically; return its sha256.

    Raises:
        WeightsError: if a key is not a string or a value is not a tensor.
    """
    path = Path(path)
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is {type(value).__name__}, weights must be str -> Tensor")
        clean[key] = value.detach().to("cpu").contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(clean, path)
    return _sha256(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        WeightsError: file missing, not loadable safely, or not a ``dict[str, Tensor]``.
    """
    path = Path(path)
    state = safe_torch_load(path, WeightsError, "weights file")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path}: expected a dict of str -> Tensor")
    return state


def write_manifest(directory: str | Path, manifest: WeightsManifest) -> Path:
    """Write ``manifest.json`` atomically (it marks the run finished, so it goes last)."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> WeightsManifest:
    """Read and validate ``<directory>/manifest.json``.

    Raises:
        WeightsError: missing, not JSON, or with missing/unknown keys (one line naming the key).
    """
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: manifest not found (is this a finished pretraining run?)") from None
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    try:
        return WeightsManifest.model_validate(data)
    except ValidationError as exc:
        item = exc.errors()[0]
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        raise WeightsError(f"{path}: {key}: {msg}") from None


def resolve_weights_file(path: str | Path, part: Part, checkpoint: Checkpoint = "last") -> Path:
    """A weights file path: ``path`` itself if it is a file, else the manifest's file for ``part`` in that
    run dir, from the last epoch (``files``) or the best one (``best.files``).

    Raises:
        WeightsError: the run lacks the part, ``best`` is asked of a run without a best checkpoint, or of
            a single weights file (which has no manifest to choose from).
    """
    path = Path(path)
    if checkpoint not in ("last", "best"):
        raise WeightsError(f"unknown checkpoint '{checkpoint}' (expected 'last' or 'best')")
    if not path.is_dir():
        if checkpoint == "best":
            raise WeightsError(f"{path}: checkpoint 'best' needs a pretraining run directory (with {MANIFEST_FILE}), not a file")
        return path
    manifest = read_manifest(path)
    if checkpoint == "best":
        if manifest.best is None:
            raise WeightsError(
                f"{path / MANIFEST_FILE}: the run has no best checkpoint (pretrained without validation subjects); "
                f"use pretrained_checkpoint: last"
            )
        files = manifest.best.files
    else:
        files = manifest.files
    if part not in files:
        raise WeightsError(f"{path / MANIFEST_FILE}: run exports {sorted(files)}, not part '{part}'")
    return path / files[part]


def load_pretrained(model: nn.Module, path: str | Path, part: Part, checkpoint: Checkpoint = "last") -> LoadReport:
    """Copy the ``part`` (``"encoder"`` or ``"encoder_decoder"``) of pretrained weights into ``model``.

    ``model`` is a ``UNet2d`` (or anything with the same key prefixes); ``path`` a weights file or a run
    directory with a manifest, whose ``checkpoint`` (``"last"`` or ``"best"``) is read. Strict: every
    key of the part in ``model.state_dict()`` must be in the file
    with the same shape, and the file may not hold keys under the part's prefixes that the model lacks.
    Nothing is copied unless the whole part matches. Keys of the file outside the part are ignored.

    Raises:
        PartMismatchError: one line naming the file, the part and the first offending keys; its
            ``report`` holds the matched, missing and unexpected keys.
        WeightsError: the file or manifest is missing or unreadable.
    """
    if part not in PART_PREFIXES:
        raise WeightsError(f"unknown part '{part}' (expected one of {sorted(PART_PREFIXES)})")
    file = resolve_weights_file(path, part, checkpoint)
    weights = load_weights(file)
    prefixes = PART_PREFIXES[part]
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    if not target:
        raise WeightsError(f"{file}: the model has no parameters under {prefixes}")
    in_part = {k: v for k, v in weights.items() if k.startswith(prefixes)}
    ignored = sorted(k for k in weights if not k.startswith(prefixes))
    missing = sorted(k for k in target if k not in in_part)
    unexpected = sorted(k for k in in_part if k not in target)
    mismatched = sorted(
        f"{k} {tuple(in_part[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items() if k in in_part and in_part[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
    matched = sorted(k for k in target if k in in_part and in_part[k].shape == target[k].shape)
    report = LoadReport(matched=matched, missing=missing, unexpected=unexpected, ignored=ignored,
                        file=str(file), sha256=_sha256(file))
    if problems:
        raise PartMismatchError(f"{file}: cannot load part '{part}' strictly: {'; '.join(problems)}", report)
    with torch.no_grad():
        result = model.load_state_dict({k: in_part[k] for k in target}, strict=False)
    # strict=False only because the other parts are absent; the part itself must have loaded fully.
    assert not result.unexpected_keys and not set(target) & set(result.missing_keys)
    return report
