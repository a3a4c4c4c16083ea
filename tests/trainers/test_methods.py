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
from trainers.optimizers import build_optimizer, param_groups
from trainers.schedules import ema_momentum, lr_at, teacher_temperature

SIZE = 32
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL_DINO = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16, "n_local_crops": 2}


def _config(name: str, lr: float | None = None, **method: object) -> PretrainConfig:
    extra = SMALL_DINO if name == "dino" else {}
    data: dict = {"method": {"name": name, **extra, **method}, "image_size": SIZE, "epochs": 2, "precision": "fp32"}
    if lr is not None:
        data["optimizer"] = {"lr": lr}
    return PretrainConfig.model_validate(data)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
            assert lr_at(config, epoch * 3 + it, 3) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


def test_dino_schedules_follow_the_published_cosine_scheduler() -> None:
    import numpy as np

    config = PretrainConfig.model_validate({"method": "dino", "epochs": 4, "schedule": {"warmup_epochs": 1}})
    spe = 5
    base, final, total, warm = 0.0075, 1e-6, 20, 5  # DINO utils.cosine_scheduler, written out
    iters = np.arange(total - warm)
    ref = np.concatenate((np.linspace(0, base, warm), final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))
    assert [lr_at(config, s, spe) for s in range(total)] == pytest.approx(ref.tolist(), rel=1e-9, abs=1e-12)
    dino: DINOConfig = config.method  # type: ignore[assignment]
    assert ema_momentum(dino, 0, total) == pytest.approx(0.996) and ema_momentum(dino, total, total) == 1.0
    full = DINOConfig()
    temps = [teacher_temperature(full, e, 100) for e in range(100)]
    assert temps[:30] == pytest.approx(np.linspace(0.02, 0.04, 30).tolist()) and set(temps[30:]) == {0.04}
    assert teacher_temperature(full, 2, 3) == pytest.approx(0.04)  # warm-up clipped to a 3-epoch run


# learning rates that make 12 steps on one fixed batch monotone enough (paper lr for DINO and MIM)
@pytest.mark.parametrize("name,lr", [("simclr", 0.02), ("pcl", 0.02), ("dino", None), ("mim", None)])
def test_training_step_learns_a_fixed_batch_and_export_loads_into_unet(name: str, lr: float | None) -> None:
    torch.manual_seed(0)
    config = _config(name, lr)
    method = METHODS[name](config, SIZE)
    model = method.modules.train()
    opt = build_optimizer(config, model)  # constant peak lr on this fixed batch
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
        method.after_optimizer_step(1, step + 1, steps)  # the loop's convention: steps taken so far
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
    groups = param_groups(config, student)
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
    m = ema_momentum(method.cfg, 2, 10)  # 3 steps taken: the step just taken has index 2
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


def _dino_momentum_schedule(base: float, final: float, total: int) -> list[float]:
    """DINO ``utils.cosine_scheduler(base, final, epochs, niter_per_ep)`` without warm-up, written out."""
    import numpy as np

    iters = np.arange(total)
    return (final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))).tolist()


def test_dino_ema_uses_momentum_schedule_of_the_step_just_taken() -> None:
    """main_dino.py: after the optimizer step of iteration ``it`` (0-based), ``m = momentum_schedule[it]``.

    Driven with the pretrain loop's convention (``global_step`` incremented before the hook): the
    first update uses the base 0.996, the last the schedule's final entry, and every step in between
    its own entry. The teacher is set to 1 and the student to 0, so after one update teacher == m.
    """
    method = METHODS["dino"](_config("dino"), SIZE)
    total = 10
    schedule = _dino_momentum_schedule(0.996, 1.0, total)
    assert schedule[0] == 0.996 and schedule[-1] < 1.0
    used = []
    global_step = 0
    for _ in range(total):
        with torch.no_grad():
            for p in method.teacher.parameters():
                p.fill_(1.0)
            for p in method.student.parameters():
                p.zero_()
        global_step += 1  # as trainers.pretrain: count the optimizer step, then call the hook
        method.after_optimizer_step(0, global_step, total)
        values = torch.cat([p.detach().flatten() for p in method.teacher.parameters()])
        assert torch.all(values == values[0])
        used.append(values[0].item())
    assert used[0] == pytest.approx(0.996, abs=1e-7)
    assert used[-1] == pytest.approx(schedule[-1], abs=1e-7) and used[-1] < 1.0
    assert used == pytest.approx(schedule, abs=1e-7)
    assert [method.momentum_for(k + 1, total) for k in range(total)] == pytest.approx(schedule, rel=0, abs=1e-15)
    with pytest.raises(ValueError, match="global_step"):
        method.after_optimizer_step(0, 0, total)


def test_cross_rank_batchnorm_applies_to_several_cuda_ranks_and_cpu_ranks_with_global_batches() -> None:
    from trainers.cross_rank_batchnorm import convert_cross_rank_batchnorm
    from trainers.runtime import RuntimeOptions, batchnorm_converter, sync_batchnorm_applies

    on, off, elastic = RuntimeOptions(), RuntimeOptions(sync_batchnorm=False), RuntimeOptions(global_batches=True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert sync_batchnorm_applies(cuda, 2, on) and sync_batchnorm_applies(cpu, 2, elastic)
    assert not sync_batchnorm_applies(cuda, 1, on)
    assert not sync_batchnorm_applies(cuda, 2, off)
    assert not sync_batchnorm_applies(cpu, 2, on)  # per-rank batches on CPU keep per-worker BN (latency)
    # torch's SyncBatchNorm refuses CPU tensors: CPU ranks get the cross-rank layer of trainers/
    assert batchnorm_converter(torch.device("cuda", 0)) == torch.nn.SyncBatchNorm.convert_sync_batchnorm
    assert batchnorm_converter(torch.device("cpu")) is convert_cross_rank_batchnorm


def _bn_types(module: torch.nn.Module) -> dict[str, type]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return {name: type(m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_dino_sync_batchnorm_converts_student_and_teacher_and_keeps_the_ema_exact(device: str) -> None:
    """The loop's cross-rank BN conversion (``convert_sync_batchnorm(modules, device, method)``) reaches
    DINO's teacher: torch's SyncBatchNorm for CUDA ranks, ``CrossRankBatchNorm`` for CPU ranks.

    Without a process group both layers' forward is plain batch norm, so one training step (on the
    CPU) also gives the same loss as the unconverted networks.
    """
    from trainers.cross_rank_batchnorm import CrossRankBatchNorm
    from trainers.runtime import convert_sync_batchnorm

    layer = torch.nn.SyncBatchNorm if device == "cuda" else CrossRankBatchNorm

    torch.manual_seed(0)
    method = METHODS["dino"](_config("dino"), SIZE)
    plain = METHODS["dino"](_config("dino"), SIZE)
    plain.student.load_state_dict(method.student.state_dict())
    plain.teacher.load_state_dict(method.teacher.state_dict())
    names_before = [n for n, _ in method.teacher.named_parameters()]
    keys_before = list(method.extra_state())
    assert set(_bn_types(method.teacher).values()) >= {torch.nn.BatchNorm1d, torch.nn.BatchNorm2d}

    modules = convert_sync_batchnorm(method.modules, torch.device(device), method)
    assert modules is method.student  # the loop's ``modules`` is still the network the EMA reads
    for net in (method.student, method.teacher):
        types = _bn_types(net)
        assert types and set(types.values()) == {layer}, types
    assert _bn_types(method.student).keys() == _bn_types(method.teacher).keys()
    assert [n for n, _ in method.teacher.named_parameters()] == names_before
    assert [n for n, _ in method.student.named_parameters()] == names_before
    assert list(method.extra_state()) == keys_before  # teacher.* checkpoint keys unchanged
    assert not any(p.requires_grad for p in method.teacher.parameters())

    batch, gen = _batch(), 3
    out = method.training_step(batch, modules, 1, 0, torch.Generator().manual_seed(gen))
    ref = plain.training_step(batch, plain.student, 1, 0, torch.Generator().manual_seed(gen))
    assert torch.allclose(out["loss"], ref["loss"], atol=1e-6)
    out["loss"].backward()
    with torch.no_grad():  # a stand-in optimizer step that moves every student parameter
        for p in method.student.parameters():
            p.add_(0.01)
    t_before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    m = method.momentum_for(5, 10)
    method.after_optimizer_step(1, 5, 10)
    students = dict(method.student.named_parameters())
    for name, p_t in method.teacher.named_parameters():  # paired by NAME: an exact EMA of the student
        assert torch.allclose(p_t, m * t_before[name] + (1 - m) * students[name].detach(), atol=1e-6), name
    bn_weight = next(n for n in names_before if "bn" in n or "norm" in n)
    assert not torch.equal(t_before[bn_weight], dict(method.teacher.named_parameters())[bn_weight])
