"""SSP methods: registry, configs, one training step each, learning on a fixed batch, exports, DINO hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from trainers.methods import METHODS, PretrainConfig
from trainers.methods.config import PAPER_DEFAULTS, DINOConfig
from trainers.models.unet import UNet2d

SIZE = 32
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL_DINO = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16, "n_local_crops": 2}


def _config(name: str, lr: float | None = None, **method: object) -> PretrainConfig:
    extra = SMALL_DINO if name == "dino" else {}
    data: dict = {"method": {"name": name, **extra, **method}, "image_size": SIZE, "epochs": 2, "precision": "fp32"}
    if lr is not None:
        data["optimizer"] = {"lr": lr}
    return PretrainConfig.model_validate(data)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run fastest single-threaded on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    radius = torch.rand(b, 1, 1, generator=g) * 0.5 + 0.2
    images = ((yy**2 + xx**2) < radius**2).float() * 2 - 0.5 + 0.1 * torch.randn(b, SIZE, SIZE, generator=g)
    return {"image": images[:, None], "position": torch.tensor([0.0, 0.05, 0.6, 0.65])[:b]}


def test_registry_holds_the_four_methods() -> None:
    assert sorted(METHODS) == ["dino", "mim", "pcl", "simclr"]
    for name, cls in METHODS.items():
        assert cls.name == name


def test_method_rejects_a_config_of_another_method() -> None:
    with pytest.raises(ValueError, match="expected 'pcl'"):
        METHODS["pcl"](_config("simclr"), SIZE)


@pytest.mark.parametrize("path", [CONFIGS / kind / f"{m}.yaml" for kind in ("paper", "demo") for m in ("simclr", "pcl", "dino", "mim")], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_configs_validate(path: Path) -> None:
    config = PretrainConfig.model_validate(yaml.safe_load(path.read_text()))
    assert config.method.name == path.stem
    if path.parent.name == "paper":  # the YAML spells out the paper defaults
        same = PretrainConfig.model_validate({"method": path.stem, "checkpoint_every": config.checkpoint_every})
        assert config == same
        assert config.batch_size == PAPER_DEFAULTS[path.stem]["batch_size"]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValidationError, match="method"):
        PretrainConfig.model_validate({"method": {"name": "byol"}})
    with pytest.raises(ValidationError, match="temprature"):
        PretrainConfig.model_validate({"method": {"name": "simclr", "temprature": 0.1}})
    with pytest.raises(ValidationError, match="patches_per_side"):
        PretrainConfig.model_validate({"method": {"name": "mim", "patches_per_side": 7}, "image_size": 64})


def test_cosine_epoch_schedule_matches_torch_cosine_annealing() -> None:
    config = PretrainConfig.model_validate({"method": "simclr", "epochs": 5})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optimizer.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.0)
    for epoch in range(5):
        for it in range(3):
            assert config.lr_at(epoch * 3 + it, 3) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


def test_dino_schedules_follow_the_published_cosine_scheduler() -> None:
    import numpy as np

    config = PretrainConfig.model_validate({"method": "dino", "epochs": 4, "schedule": {"warmup_epochs": 1}})
    spe = 5
    base, final, total, warm = 0.0075, 1e-6, 20, 5  # DINO utils.cosine_scheduler, written out
    iters = np.arange(total - warm)
    ref = np.concatenate((np.linspace(0, base, warm), final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))
    assert [config.lr_at(s, spe) for s in range(total)] == pytest.approx(ref.tolist(), rel=1e-9, abs=1e-12)
    dino: DINOConfig = config.method  # type: ignore[assignment]
    assert dino.momentum_at(0, total) == pytest.approx(0.996) and dino.momentum_at(total, total) == 1.0
    full = DINOConfig()
    temps = [full.teacher_temp_at(e, 100) for e in range(100)]
    assert temps[:30] == pytest.approx(np.linspace(0.02, 0.04, 30).tolist()) and set(temps[30:]) == {0.04}
    assert full.teacher_temp_at(2, 3) == pytest.approx(0.04)  # warm-up clipped to a 3-epoch run


# learning rates that make 12 steps on one fixed batch monotone enough (paper lr for DINO and MIM)
@pytest.mark.parametrize("name,lr", [("simclr", 0.02), ("pcl", 0.02), ("dino", None), ("mim", None)])
def test_training_step_learns_a_fixed_batch_and_export_loads_into_unet(name: str, lr: float | None) -> None:
    torch.manual_seed(0)
    config = _config(name, lr)
    method = METHODS[name](config, SIZE)
    model = method.modules.train()
    opt = config.build_optimizer(model)  # constant peak lr on this fixed batch
    batch = _batch()
    losses = []
    steps = 12
    for step in range(steps):
        out = method.training_step(batch, model, epoch=1, step=step, generator=torch.Generator().manual_seed(5))
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        method.before_optimizer_step(1)
        opt.step()
        method.after_optimizer_step(1, step, steps)
        losses.append(out["loss"].item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses

    parts = method.export()
    assert set(parts) == ({"encoder", "encoder_decoder"} if name == "mim" else {"encoder"})
    unet = UNet2d(SIZE, 4)
    unet.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in parts["encoder"].items()}, strict=True)
    if name == "mim":
        enc_dec = parts["encoder_decoder"]
        missing, unexpected = unet.load_state_dict(enc_dec, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing)
        assert any(k.startswith("decoder.") for k in enc_dec)
    for value in parts["encoder"].values():
        assert value.device.type == "cpu"


def test_bad_batch_is_a_one_line_error() -> None:
    method = METHODS["simclr"](_config("simclr"), SIZE)
    with pytest.raises(ValueError, match=r"batch\['image'\] must be \(B, 1, 32, 32\)"):
        method.training_step({"image": torch.zeros(2, 1, 16, 16)}, method.modules, 0, 0, torch.Generator())
    pcl = METHODS["pcl"](_config("pcl"), SIZE)
    with pytest.raises(ValueError, match="position"):
        pcl.training_step({"image": torch.zeros(2, 1, SIZE, SIZE)}, pcl.modules, 0, 0, torch.Generator())


def test_dino_hooks_freeze_last_layer_ema_and_state_round_trip() -> None:
    torch.manual_seed(0)
    method = METHODS["dino"](_config("dino"), SIZE)
    student, teacher = method.student, method.teacher
    # faithful default: independent teacher; weight-norm magnitude fixed at 1 and not optimised
    assert not torch.equal(student.encoder.blocks[0].conv1.conv.weight, teacher.encoder.blocks[0].conv1.conv.weight)
    g = student.head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    config = method.config
    groups = config.param_groups(student)
    assert all(p is not g for grp in groups for p in grp["params"])
    no_decay = next(grp for grp in groups if not grp["apply_weight_decay"])
    assert all(p.ndim == 1 for p in no_decay["params"])

    out = method.training_step(_batch(), student, epoch=0, step=0, generator=torch.Generator().manual_seed(1))
    assert out["teacher_temp"].item() == pytest.approx(0.02)
    assert method.center.abs().sum() > 0  # centre moved
    out["loss"].backward()
    method.before_optimizer_step(epoch=0)
    assert all(p.grad is None for n, p in student.named_parameters() if "last_layer" in n)
    assert student.encoder.blocks[0].conv1.conv.weight.grad is not None

    t_before = {k: v.clone() for k, v in teacher.named_parameters()}
    m = method.cfg.momentum_at(3, 10)
    method.after_optimizer_step(0, 3, 10)
    for (name, p_t), p_s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.allclose(p_t, m * t_before[name] + (1 - m) * p_s.detach(), atol=1e-6), name

    state = method.extra_state()
    other = METHODS["dino"](_config("dino"), SIZE)
    other.load_extra_state(state)
    assert torch.equal(other.center, method.center)
    for (k, a), b in zip(teacher.state_dict().items(), other.teacher.state_dict().values()):
        assert torch.equal(a, b), k

    copied = METHODS["dino"](_config("dino", teacher_init_from_student=True), SIZE)
    for a, b in zip(copied.student.state_dict().values(), copied.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_dino_last_layer_trains_after_the_frozen_epoch() -> None:
    method = METHODS["dino"](_config("dino"), SIZE)
    out = method.training_step(_batch(), method.student, epoch=1, step=0, generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    method.before_optimizer_step(epoch=1)
    v = method.student.head.last_layer.parametrizations.weight.original1
    assert v.grad is not None and v.grad.abs().sum() > 0
