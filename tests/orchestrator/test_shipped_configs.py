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
    covered = {"paper.yaml", "demo.yaml", "phantom-study.yaml", "phantom-study/finetune.yaml", "deploy/default.yaml"} | {
        f"{kind}/{name}.yaml" for kind in ("paper", "demo") for name in ("simclr", "pcl", "dino", "mim", "finetune")
    }
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert shipped == covered, "add the new config file to tests/orchestrator/test_shipped_configs.py"


@pytest.mark.parametrize("kind", ["paper", "demo", "phantom-study"])
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


def test_demo_and_phantom_study_can_conclude_and_paper_keeps_the_published_design() -> None:
    """The demo tests its small budget with 3+ runs and both controls; the paper config runs as published."""
    from orchestrator.stats import MIN_RUNS

    demo = load_config(StudyConfig, CONFIGS / "demo.yaml").finetune
    small = min(b for b in demo.budgets if b != "all")
    assert len(demo.seeds) * len(demo.train_seeds_for(small)) >= MIN_RUNS
    assert {"scratch-b", "supervised"} <= set(demo.extra_arms)
    phantom = load_config(StudyConfig, CONFIGS / "phantom-study.yaml")
    assert len(phantom.finetune.budgets) == 2
    assert all(len(phantom.finetune.seeds) * len(phantom.finetune.train_seeds_for(b)) >= MIN_RUNS
               for b in phantom.finetune.budgets)
    assert set(phantom.pretrain.methods) == {"simclr", "pcl", "dino", "mim"}
    assert {"scratch-b", "supervised"} <= set(phantom.finetune.extra_arms)
    paper = load_config(StudyConfig, CONFIGS / "paper.yaml").finetune
    assert paper.seeds == (0, 1, 2) and paper.train_seeds == (0,) and paper.extra_arms == ("mim-encdec",)
