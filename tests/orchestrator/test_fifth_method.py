"""A fifth SSP method needs ``trainers/methods/`` only: a toy method registered at run time pretrains
(``pretrain_worker``) and becomes a grid arm whose one cell fine-tunes from its exported encoder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from trainers.methods.config import MethodBlock

SIZE = 16  # the ``cell_data`` store's (tests/conftest.py)


class ToyConfig(MethodBlock):
    """The toy's config block: a denoising auto-encoder with one noise level."""

    name: Literal["toy"] = "toy"
    noise: float = 0.1


class Toy:
    """A denoising U-Net auto-encoder; exports its encoder. Built on ``MethodBase`` at registration."""

    name = "toy"


@pytest.fixture()
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """Register the toy for one test, then restore the vocabulary, the registry and the config union."""
    from trainers.methods import config as method_config
    from trainers.methods import names, registry
    from trainers.methods.base import MethodBase
    from trainers.methods.simclr import check_images, encoder_state
    from trainers.models.unet import UNet2d

    class ToyMethod(MethodBase):
        name = "toy"

        def __init__(self, config: method_config.PretrainConfig, image_size: int | None = None) -> None:
            self.config, self.image_size = config, image_size or config.image_size
            self.net = UNet2d(self.image_size, out_channels=1, num_heads=1, width=config.model_width)

        @property
        def modules(self) -> nn.Module:
            return self.net

        def training_step(self, batch, model, epoch, step, generator):  # type: ignore[no-untyped-def]
            x = check_images(batch, self.image_size)
            noisy = x + self.config.method.noise * torch.randn(x.shape, generator=generator, device=x.device)
            return {"loss": torch.mean((model(noisy) - x) ** 2)}

        def export(self) -> dict[str, dict[str, torch.Tensor]]:
            return {"encoder": encoder_state(self.net)}

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(method_config, "METHOD_CONFIGS", dict(method_config.METHOD_CONFIGS))
    monkeypatch.setattr(method_config, "PAPER_DEFAULTS", dict(method_config.PAPER_DEFAULTS))
    monkeypatch.setattr(names, "_added", [])
    registry.register(ToyMethod, ToyConfig, {"batch_size": 4, "optimizer": {"lr": 0.01}, "precision": "fp32"})
    yield ToyMethod
    monkeypatch.undo()
    method_config.rebuild_method_union()


def test_a_registered_toy_method_pretrains_and_runs_a_grid_cell(toy: type, cell_data: dict[str, Path], tmp_path: Path) -> None:
    from orchestrator.arms import ARMS, arm_order
    from orchestrator.grid import plan_grid
    from orchestrator.grid_spec import grid_request
    from orchestrator.workspace import Workspace
    from trainers.finetune import finetune_worker
    from trainers.methods import METHODS, PretrainConfig
    from trainers.methods.names import method_names
    from trainers.pretrain import pretrain_worker
    from trainers.weights import read_manifest

    assert METHODS["toy"] is toy and "toy" in method_names()
    assert ARMS["toy"].role == "method" and arm_order("toy") < arm_order("mim-encdec")
    config = PretrainConfig.model_validate({"method": "toy", "epochs": 1, "image_size": SIZE, "model_width": 4})
    assert isinstance(config.method, ToyConfig) and config.batch_size == 4  # its paper defaults apply

    workspace = Workspace.resolve(tmp_path / "ws", create=True)
    run_dir = workspace.root / "pretrain" / "toy-run"
    out = pretrain_worker({"store": str(cell_data["store"]), "config": config.model_dump(mode="json"),
                           "run_name": "toy-run", "output": str(run_dir)})
    manifest = read_manifest(run_dir)
    assert manifest.method == "toy" and manifest.files == {"encoder": "encoder.pt"} == out["files"]
    assert manifest.final_loss == out["final_loss"] > 0

    recipe = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "valid_batch_size": 8, "model_width": 4}
    plan = plan_grid(grid_request(cell_data["store"], cell_data["split"], budgets=[2], seeds=[0],
                                  pretrained={"toy": run_dir}, methods=["toy"], config=recipe, study="toy-study",
                                  workspace=workspace))
    assert [c.method for c in plan.cells] == ["scratch", "toy"]
    trial = next(t for t in plan.pending if t.method == "toy")
    assert trial.job.config["part"] == "encoder"  # the part its run's manifest exports
    result = finetune_worker(trial.job.model_dump())
    assert result["init_weights"] == str(run_dir / "encoder.pt")
    assert {row["class"] for row in result["dice"]} >= {"LV", "MYO", "RV"}


def test_the_toy_is_gone_once_its_test_ends() -> None:
    """The fixture above leaves the vocabulary as shipped (so the other tests see four methods)."""
    from pydantic import ValidationError

    from orchestrator.arms import ARMS
    from trainers.methods import METHODS, PretrainConfig
    from trainers.methods.names import METHOD_NAMES, method_names

    assert method_names() == METHOD_NAMES and tuple(METHODS) == METHOD_NAMES and "toy" not in ARMS
    with pytest.raises(ValidationError, match="toy"):
        PretrainConfig.model_validate({"method": "toy"})
