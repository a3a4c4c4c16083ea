"""The positive control's initialisation: a model trained with the labels of the whole training pool.

The ``supervised`` arm (``orchestrator/arms.py``) loads the encoder of this model like a pretrained
encoder. It is trained with the grid's own fine-tuning recipe, from scratch, on every labelled
subject of the split's ``train`` part (budget ``all``; never a test subject), with a training seed
of its own, and exported as a pretraining run directory (``encoder.pt``, ``encoder_decoder.pt``,
``manifest.json`` with ``method: supervised``), so the grid loads it like any other run.

The run directory ``<workspace>/pretrain/supervised-<hash8>/`` is named from the dataset, the split
file and the recipe; a directory with a manifest is finished and reused. An interrupted training
starts over on the next run (it is one cell's worth of work). ``sspctl study`` trains it in a Ray task
of its own while the methods pretrain, since it needs none of them (``orchestrator.study``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.arms import SUPERVISED
from orchestrator.study_tracking import short_hash
from orchestrator.workspace import Workspace

#: Training seed of the positive-control model (far from the grid's training seeds).
SUPERVISED_TRAIN_SEED = 2000


def supervised_run_dir(workspace: Workspace, dataset_hash: str, split: str, config: Mapping[str, Any]) -> Path:
    """``<workspace>/pretrain/supervised-<hash8>/`` for this dataset, split file and recipe."""
    split_digest = hashlib.sha256(Path(split).read_bytes()).hexdigest()[:16]
    identity = {"dataset": dataset_hash, "split": split_digest, "config": dict(config)}
    return workspace.root / "pretrain" / f"{SUPERVISED}-{short_hash(identity)}"


def _recipe(base_config: Mapping[str, Any]) -> Any:
    """The positive-control model's ``FinetuneConfig``: the grid's recipe, scratch, budget all, its own seed."""
    from trainers.finetune_config import FinetuneConfig

    recipe = {k: v for k, v in base_config.items() if k not in ("method", "weights", "part", "budget", "seed", "train_seed")}
    return FinetuneConfig.model_validate(
        {**recipe, "method": "scratch", "budget": "all", "seed": 0, "train_seed": SUPERVISED_TRAIN_SEED}
    )


def _planned(store: str, split: str, base_config: Mapping[str, Any], workspace: Workspace) -> tuple[Any, Any, Path]:
    """The model's ``FinetuneConfig``, the opened store and the run directory these inputs name."""
    from datastore.store import SliceStore

    config, opened = _recipe(base_config), SliceStore.open(store)
    return config, opened, supervised_run_dir(workspace, opened.hash, split, config.model_dump(mode="json"))


def is_trained(store: str, split: str, base_config: Mapping[str, Any], workspace: Workspace) -> bool:
    """Whether the positive-control model for these inputs is finished (``ensure_supervised_init`` would reuse it)."""
    from trainers.weights import MANIFEST_FILE

    return (_planned(store, split, base_config, workspace)[2] / MANIFEST_FILE).is_file()


def ensure_supervised_init(store: str, split: str, base_config: Mapping[str, Any], workspace: Workspace) -> Path:
    """Train (or reuse) the positive-control model and return its run directory.

    Args:
        store: the slice store (absolute path or URL).
        split: the split YAML; its ``train`` part (budget ``all``) is the training pool.
        base_config: the grid's base ``FinetuneConfig`` keys (the recipe).
        workspace: the run directory goes under ``<workspace>/pretrain/``.
    """
    from trainers.finetune import finetune_worker
    from trainers.jobs import FinetuneJob
    from trainers.weights import MANIFEST_FILE, PART_PREFIXES, WeightsManifest, load_weights, save_weights, write_manifest

    config, opened, run_dir = _planned(store, split, base_config, workspace)
    if (run_dir / MANIFEST_FILE).is_file():
        return run_dir
    job = FinetuneJob(store=store, split=split, config=config, output=run_dir / "train", evaluate=False)
    result = finetune_worker(job)
    state = load_weights(run_dir / "train" / "model.pt")
    files, digests = {}, {}
    for part, prefixes in PART_PREFIXES.items():
        name = f"{part}.pt"
        digests[name] = save_weights({k: v for k, v in state.items() if k.startswith(prefixes)}, run_dir / name)
        files[part] = name
    valid_loss = float(result.get("valid", {}).get("valid_loss", math.nan))
    manifest = WeightsManifest(
        method=SUPERVISED, run_name=run_dir.name, config=config.model_dump(mode="json"), dataset_hash=opened.hash,
        epochs=config.epochs, final_loss=valid_loss if math.isfinite(valid_loss) else -1.0,
        image_size=opened.image_size, model_width=config.model_width, files=files, sha256=digests,
    )
    write_manifest(run_dir, manifest)
    return run_dir
