"""Every YAML under ``configs/`` validates against the model that reads it (a typo there breaks users)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.configio import load_config
from orchestrator.study import StudyConfig
from trainers.finetune_config import FinetuneConfig
from trainers.methods import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_shipped_config_is_covered() -> None:
    covered = {"paper.yaml", "demo.yaml", "deploy/default.yaml"} | {
        f"{kind}/{name}.yaml" for kind in ("paper", "demo") for name in ("simclr", "pcl", "dino", "mim", "finetune")
    }
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert shipped == covered, "add the new config file to tests/orchestrator/test_shipped_configs.py"


@pytest.mark.parametrize("kind", ["paper", "demo"])
def test_study_configs_and_the_files_they_name_validate(kind: str) -> None:
    study = load_config(StudyConfig, CONFIGS / f"{kind}.yaml")
    repo = CONFIGS.parent
    if study.pretrain.config_dir is not None:
        for method in study.pretrain.methods:
            config = load_config(PretrainConfig, repo / study.pretrain.config_dir / f"{method}.yaml")
            assert config.method.name == method
    if study.finetune.config is not None:
        load_config(FinetuneConfig, repo / study.finetune.config)


@pytest.mark.parametrize("kind", ["paper", "demo"])
def test_finetune_configs_validate(kind: str) -> None:
    config = load_config(FinetuneConfig, CONFIGS / kind / "finetune.yaml")
    if kind == "paper":  # the published recipe: scratch 0.01 and pretrained 0.005 come from lr=None
        assert config.lr is None and config.precision == "fp32" and config.momentum == 0.99
