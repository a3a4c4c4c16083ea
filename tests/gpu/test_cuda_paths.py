"""The GPU training recipe (autocast, GradScaler, channels_last, torch.compile, device augmentation).

Every test runs on ``cuda`` (marked ``gpu``, skipped without CUDA) and, where it can, on ``cpu``
so that the logic is exercised in CI. On CPU mixed precision is forced with
``resolve_precision(..., cpu_fp32=False)`` (torch autocasts bf16 and fp16 on CPU too).

The steps use the loop's own pieces (``trainers.pretrain.build_method``, ``wrap_model`` with
``world_size=1``, ``resolve_precision``, ``autocast``, ``trainers.optimizers.build_optimizer`` /
``trainers.schedules.apply_schedule``; ``trainers.finetune.build_model`` / ``train_step``, ``trainers.augment.augment_pair``) on
synthetic batches, in the order of ``pretrain_worker``'s step. Sizes are tiny (64 px, U-Net width 8,
batch 4) so the CPU variants finish in seconds on 2 cores.

Imports only torch, pydantic (through ``trainers``), MONAI (the U-Net blocks) and pytest, so the
file runs on a bare GPU machine with a few carried wheels (``benchmarks/gpu_check.sh``).

The augmentation runs inside the loop's autocast region (``pretrain_worker`` calls
``training_step`` there); ``test_augmentation_runs_inside_autocast`` pins that it keeps fp32.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from trainers.augment import (
    AugmentConfig,
    adjust_gamma,
    augment,
    augment_pair,
    gaussian_noise,
    patch_mask,
    random_affine_pair,
    random_blur,
    scale_intensity,
    shift_intensity,
)
from trainers.finetune import build_model, train_step
from trainers.finetune_config import FinetuneConfig
from trainers.methods import METHODS, PretrainConfig
from trainers.models.unet import UNet2d
from trainers.optimizers import build_optimizer
from trainers.pretrain import build_method
from trainers.runtime import RuntimeOptions, augmentation_seed, autocast, resolve_precision, wrap_model
from trainers.schedules import apply_schedule, total_steps

SIZE = 64
WIDTH = 8
BATCH = 4
HAS_CUDA = torch.cuda.is_available()

CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]

#: Small heads (the paper's 8192-prototype DINO head and 512-wide MLPs are not what is tested here).
SMALL = {
    "simclr": {"hidden_dim": 64, "projection_dim": 64},
    "pcl": {"hidden_dim": 64, "projection_dim": 64},
    "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2},
    "mim": {},
}

#: bf16-vs-fp32 loss tolerance (relative) per method, for one step at initialisation.
#: bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3); every conv/linear rounds its inputs
#: and output to bf16 and accumulates in fp32, BatchNorm re-normalises every level, so the features
#: of the ~20-layer width-8 U-Net carry a relative error of about sqrt(20) * 3.9e-3 ~ 2 %, while the
#: losses themselves run in fp32 (autocast disabled inside them) and average over the batch.
#: Measured on CPU over 12 seeds: SimCLR/PCL <= 2.4e-3, MIM <= 2.3e-4, DINO <= 1.4e-2 (its teacher
#: temperature 0.04 -- 0.02 in epoch 0 -- multiplies logit errors by 25-50 before the softmax).
#: The tolerances are 4x (DINO 3.5x) the worst measured value: a loss that is autocast in the wrong
#: dtype (fp16 overflow, an fp32 op run in bf16 with temperature 0.1) is off by far more.
LOSS_RTOL = {"simclr": 1e-2, "pcl": 1e-2, "dino": 5e-2, "mim": 1e-2}
#: The bf16 gradient must point the way the fp32 one does. Measured cosine >= 0.90 (DINO, 12 seeds;
#: contrastive losses at initialisation sit at chance, log(2B - 1), so their gradients are small and
#: the most rounding-sensitive), >= 0.998 for MIM; a sign/scale bug in the recipe gives <= 0.
GRAD_COSINE_MIN = 0.7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _config(name: str, precision: str, channels_last: bool) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "method": {"name": name, **SMALL[name]},
        "image_size": SIZE, "model_width": WIDTH, "batch_size": BATCH, "epochs": 2,
        "precision": precision, "channels_last": channels_last,
    })


def _images(b: int = BATCH, seed: int = 0) -> torch.Tensor:
    """``(b, 1, SIZE, SIZE)`` discs on a noisy background (CPU)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    radius = torch.rand(b, 1, 1, generator=g) * 0.5 + 0.2
    images = ((yy**2 + xx**2) < radius**2).float() * 2 - 0.5 + 0.1 * torch.randn(b, SIZE, SIZE, generator=g)
    return images[:, None]


def _labelled(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 1, SIZE, SIZE)`` and 4-class label maps ``(B, SIZE, SIZE)`` (CPU)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    r = torch.rand(BATCH, 1, 1, generator=g) * 0.4 + 0.3
    d = yy**2 + xx**2
    label = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.long)
    label[(d < r**2).expand_as(label)] = 1
    label[(d < (0.7 * r) ** 2).expand_as(label)] = 2
    label[((xx > 0.5) & (d > r**2)).expand_as(label)] = 3
    image = label.float() * 0.8 - 1 + 0.1 * torch.randn(BATCH, SIZE, SIZE, generator=g)
    return image[:, None], label


def _batch(device: torch.device, channels_last: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-like batch on ``device`` as ``runtime.device_batches`` delivers it (NHWC image if asked)."""
    image = _images(seed=seed).to(device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return {"image": image, "position": torch.tensor([0.0, 0.05, 0.6, 0.65], device=device)}


def _setup(config: PretrainConfig, device: torch.device):
    """What ``pretrain_worker`` does before its epoch loop (one rank, no resume)."""
    torch.manual_seed(config.seed)
    method = build_method(config)
    model, modules = wrap_model(method.modules, device, 1, RuntimeOptions(cpu_fp32=False),
                                channels_last=config.channels_last, compile=config.compile, method=method)
    method.to(device, channels_last=config.channels_last)
    optimizer = build_optimizer(config, modules)
    return method, model, modules, optimizer


def _loop_step(config, method, model, modules, optimizer, scaler, amp_dtype, batch, generator, *,
               epoch: int, global_step: int, steps_per_epoch: int):
    """One iteration of ``pretrain_worker``'s inner loop; returns (loss, unscaled gradients by name)."""
    device = batch["image"].device
    apply_schedule(config, optimizer, global_step, steps_per_epoch)
    with autocast(device, amp_dtype):
        out = method.training_step(batch, model, epoch, global_step % steps_per_epoch, generator)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().float().clone()
             for n, p in modules.named_parameters() if p.requires_grad}
    method.before_optimizer_step(epoch)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    method.after_optimizer_step(epoch, global_step + 1, total_steps(config, steps_per_epoch))
    return loss.detach(), grads


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten().cpu() for n in sorted(grads)])


# ----------------------------------------------------------------------------------------------
# (a) every SSP method: bf16 autocast + channels_last vs fp32
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_channels_last_step_is_finite_and_matches_fp32(name: str, device: str) -> None:
    """One loop step per method: bf16 + channels_last gives a finite loss, a finite gradient on every
    trainable parameter, finite weights after the step, and a loss (and gradient direction) close
    to the fp32/NCHW step on the same batch, weights and generator seed."""
    dev = torch.device(device)
    spe = 4  # steps per epoch; the step taken is the first of epoch 1 (lr > 0 also in DINO's warm-up)
    results = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        config = _config(name, precision, channels_last)
        method, model, modules, optimizer = _setup(config, dev)
        amp_dtype, use_scaler = resolve_precision(precision, dev, cpu_fp32=False)
        assert amp_dtype == (torch.bfloat16 if precision == "bf16" else None) and not use_scaler
        if channels_last:  # wrap_model converted every conv weight to NHWC (and the DINO teacher's)
            teacher = getattr(method, "teacher", nn.Identity())
            for pname, p in [*modules.named_parameters(), *teacher.named_parameters(prefix="teacher")]:
                if p.ndim == 4:
                    assert p.is_contiguous(memory_format=torch.channels_last), pname
        seen: list[torch.dtype] = []
        hook = _first_conv(modules).register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        generator = torch.Generator(device=dev).manual_seed(augmentation_seed(config.seed, 0, 1))
        loss, grads = _loop_step(config, method, model, modules, optimizer, None, amp_dtype,
                                 _batch(dev, channels_last), generator, epoch=1, global_step=spe, steps_per_epoch=spe)
        hook.remove()
        # autocast really ran the convolutions in bf16 (else the comparison below proves nothing)
        assert seen and set(seen) == {torch.bfloat16 if amp_dtype else torch.float32}, seen
        assert loss.dtype == torch.float32 and loss.device.type == dev.type
        assert math.isfinite(float(loss)), f"{name} {precision}: loss {float(loss)}"
        missing = [n for n, g in grads.items() if g is None]
        assert not missing, f"{name} {precision}: no gradient for {missing[:5]}"
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        assert not bad, f"{name} {precision}: non-finite gradient in {bad[:5]}"
        assert all(torch.isfinite(p).all() for p in modules.parameters()), f"{name} {precision}: weights"
        results[precision] = (float(loss), _flat(grads))
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL[name]), (name, loss16, loss32)
    cosine = float(nn.functional.cosine_similarity(grad16, grad32, dim=0))
    assert cosine > GRAD_COSINE_MIN, (name, cosine)


# ----------------------------------------------------------------------------------------------
# (b) the published recipe: fp16 autocast + GradScaler
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_fp16_grad_scaler_steps_update_the_weights(name: str, device: str) -> None:
    """fp16 autocast + ``GradScaler`` (eager, NCHW): every step has a finite loss and a finite,
    positive scale; a step is skipped exactly when the scaler backs off (an inf/NaN gradient at
    the current scale) and then leaves the weights untouched; within 12 steps one step updates them.

    Skipped first steps are GradScaler's normal start (scale 65536 overflows fp16 gradients; the DINO
    head needs about 4 back-offs at this size). On CPU ``resolve_precision`` gives fp16 autocast but
    no scaler (the loop uses one on CUDA only), so the CPU variant builds ``GradScaler("cpu")``
    itself to exercise the same sequence (scale, unscale_, hook, step, update).
    """
    dev = torch.device(device)
    config = _config(name, "fp16", channels_last=False)
    amp_dtype, use_scaler = resolve_precision("fp16", dev, cpu_fp32=False)
    assert amp_dtype == torch.float16
    assert use_scaler == (dev.type == "cuda")
    method, model, modules, optimizer = _setup(config, dev)
    scaler = torch.amp.GradScaler(dev.type)
    spe = 12
    generator = torch.Generator(device=dev).manual_seed(augmentation_seed(config.seed, 0, 1))
    history = []
    for k in range(12):
        before = {n: p.detach().clone() for n, p in modules.named_parameters()}
        scale_before = float(scaler.get_scale())
        loss, grads = _loop_step(config, method, model, modules, optimizer, scaler, amp_dtype,
                                 _batch(dev, False, seed=k), generator, epoch=1, global_step=spe + k,
                                 steps_per_epoch=spe)
        scale_after = float(scaler.get_scale())
        changed = [n for n, p in modules.named_parameters() if not torch.equal(before[n], p.detach())]
        finite_grads = all(g is None or torch.isfinite(g).all() for g in grads.values())
        history.append((k, float(loss), scale_before, scale_after, len(changed)))
        assert math.isfinite(float(loss)), history
        assert math.isfinite(scale_after) and scale_after > 0, history
        skipped = scale_after < scale_before
        assert skipped == (not finite_grads), history
        if skipped:
            assert not changed, f"a skipped step changed {changed[:5]}: {history}"
        else:
            assert changed, f"an unskipped step changed no weight: {history}"
            assert all(torch.isfinite(p).all() for p in modules.parameters())
            break
    else:
        pytest.fail(f"{name}: 12 fp16 steps, all skipped by the GradScaler: {history}")


# ----------------------------------------------------------------------------------------------
# (c) fine-tuning step (deep supervision) under bf16 autocast + channels_last
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_step_bf16_channels_last_matches_fp32(device: str) -> None:
    """``trainers.finetune.train_step`` (deep-supervision CE + Dice, SGD) on the fine-tuning U-Net
    built by ``build_model``, the batch augmented by ``augment_pair`` with a device generator:
    bf16 autocast + channels_last gives a finite loss within 1 % of fp32/NCHW, finite gradients
    close in direction, and finite updated weights.

    ``FinetuneConfig.precision`` is fp32 as published; ``bf16`` is the opt-in speed option tested here. The loss is 0.5 CE + 0.5 Dice evaluated in fp32 by MONAI (softmax and
    cross-entropy autocast to fp32) from bf16 logits; measured relative difference <= 1.4e-4 and
    gradient cosine >= 0.996 over 6 seeds on CPU, so 1e-2 and 0.9 leave a wide margin.
    """
    dev = torch.device(device)
    config = FinetuneConfig(model_width=WIDTH, image_size=SIZE, seed=0)
    results = {}
    labels = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        model, report = build_model(SIZE, config)
        assert report is None
        net, modules = wrap_model(model, dev, 1, RuntimeOptions(), channels_last=channels_last)
        optimizer = torch.optim.SGD(modules.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
        image, label = _labelled()
        generator = torch.Generator(device=dev).manual_seed(augmentation_seed(config.seed, 0, 0))
        image, label = augment_pair(image.to(dev), label.to(dev), config.augment, generator)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        amp_dtype, _ = resolve_precision(precision, dev, cpu_fp32=False)
        heads: list[list[torch.dtype]] = []
        hook = modules.register_forward_hook(lambda _m, _i, out: heads.append([o.dtype for o in out]))
        before = {n: p.detach().clone() for n, p in modules.named_parameters()}
        loss = train_step(net, optimizer, image, label, amp_dtype=amp_dtype)
        hook.remove()
        assert len(heads) == 1 and len(heads[0]) == len(modules.head) > 1  # deep supervision: every head
        assert set(heads[0]) == {amp_dtype or torch.float32}
        assert math.isfinite(loss)
        grads = {n: p.grad for n, p in modules.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert all(torch.isfinite(p).all() for p in modules.parameters())
        assert any(not torch.equal(before[n], p.detach()) for n, p in modules.named_parameters())
        results[precision] = (loss, _flat({n: g.float() for n, g in grads.items()}))
        labels[precision] = label.cpu()
    assert torch.equal(labels["fp32"], labels["bf16"])  # same augmentation draw for both runs
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert float(nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.9


# ----------------------------------------------------------------------------------------------
# (d) augmentation on the device
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_with_a_cpu_generator_is_deterministic_on_the_device(device: str) -> None:
    """The whole chain (noise and blur certain) on a device batch with a CPU generator: the same
    generator state gives the same output bit for bit and leaves the generator in the same state."""
    dev = torch.device(device)
    x = _images(8).to(dev)
    cfg = AugmentConfig(noise_p=1.0, smooth_p=1.0, solarize_p=0.5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = augment(x, cfg, g1), augment(x, cfg, g2)
    assert a.device.type == dev.type and a.shape == x.shape and a.dtype == x.dtype
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(a, augment(x, cfg, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("device", DEVICES)
def test_device_generator_augmentation_is_deterministic(device: str) -> None:
    """What the loops do: a generator on the batch's device (``torch.Generator(device=device)``
    seeded from ``augmentation_seed``) gives the same views and MIM masks for the same seed."""
    dev = torch.device(device)
    x = _images(8).to(dev)
    cfg = AugmentConfig(noise_p=1.0, smooth_p=1.0)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=dev).manual_seed(augmentation_seed(seed, 0, 0))
        return augment(x, cfg, gen), patch_mask(8, SIZE, 8, 0.75, gen, dev)

    (a, ma), (b, mb) = run(0), run(0)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert ma.device.type == dev.type and torch.all(ma.sum(dim=(1, 2, 3)) == 48 * (SIZE // 8) ** 2)
    assert not torch.equal(a, run(1)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_device_augmentation_matches_cpu_for_the_same_cpu_generator_state(device: str) -> None:
    """With a CPU generator every per-image parameter is drawn on the CPU, so the device result
    equals the CPU result up to float rounding, and the generator ends in the same state, for the
    affine warp (image bicubic, label nearest), blur, intensity scale/shift, gamma and the MIM patch
    mask. (``solarize`` draws the same coins but is a step at its threshold, where a pixel within
    rounding of it may flip; it is covered by the determinism tests.)

    Not guaranteed, and so not compared: ``gaussian_noise``. Its per-pixel noise comes from a device
    generator seeded by ONE draw from the CPU generator when the batch is not on the CPU, while on
    the CPU it draws ``B*H*W`` normals from the generator itself (``augment._device_generator``; the
    module docstring: "deterministic for a given generator state *and device*"). So after the noise
    step the generator states differ and every later draw of ``augment`` (the next op, the next
    view) differs between CPU and CUDA runs of the same seed. For the noise only its contract is
    checked: deterministic, and a per-image spread within ``noise_std_max``.

    TF32 is switched off for the comparison (the blur is a convolution, which cuDNN would otherwise
    run in TF32 on Ampere+), so 1e-4 is float32 rounding of the same arithmetic.
    """
    dev = torch.device(device)
    image, label = _labelled(seed=3)
    cfg = AugmentConfig()

    def chain(img: torch.Tensor, lab: torch.Tensor, gen: torch.Generator):
        warped, warped_label = random_affine_pair(img, lab, gen, cfg)
        y = random_blur(warped, gen, 1.0, cfg.smooth_sigma)
        y = scale_intensity(y, gen, 0.5, cfg.scale_intensity_range)
        y = shift_intensity(y, gen, 0.5, cfg.shift_range)
        y = adjust_gamma(y, gen, 1.0, cfg.gamma_range)
        mask = patch_mask(img.shape[0], SIZE, 8, 0.75, gen, img.device)
        return warped, warped_label, y, mask

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        g_cpu, g_dev = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        ref = chain(image, label, g_cpu)
        out = [t.cpu() for t in chain(image.to(dev), label.to(dev), g_dev)]
    assert torch.equal(g_cpu.get_state(), g_dev.get_state())
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    # nearest neighbour may flip where a sample point lies on a pixel edge to within float rounding
    mismatch = out[1] != ref[1]
    assert mismatch.float().mean() <= 5e-3
    assert set(out[1][mismatch].tolist()) <= set(label.unique().tolist())
    torch.testing.assert_close(out[2], ref[2], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[3], ref[3])

    std_max = 0.2
    x = image.to(dev)
    n1 = gaussian_noise(x, torch.Generator().manual_seed(5), 1.0, std_max)
    n2 = gaussian_noise(x, torch.Generator().manual_seed(5), 1.0, std_max)
    assert torch.equal(n1, n2)
    spread = (n1 - x).flatten(1).std(dim=1)
    assert torch.all(spread <= std_max * 1.1) and torch.all(spread > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_augmentation_runs_inside_autocast(device: str, dtype: torch.dtype) -> None:
    """``pretrain_worker`` calls ``training_step`` (which augments) inside ``autocast``: the chain
    must run there, keep the batch's dtype and match the chain outside autocast closely."""
    dev = torch.device(device)
    x = _images(8).to(dev)
    cfg = AugmentConfig(smooth_p=1.0)
    ref = augment(x, cfg, torch.Generator().manual_seed(0))
    with autocast(dev, dtype):
        out = augment(x, cfg, torch.Generator().manual_seed(0))
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    image, label = (t.to(dev) for t in _labelled())
    ref_pair = augment_pair(image, label, cfg, torch.Generator().manual_seed(0))
    with autocast(dev, dtype):
        out_pair = augment_pair(image, label, cfg, torch.Generator().manual_seed(0))
    assert out_pair[0].dtype == image.dtype and torch.equal(out_pair[1], ref_pair[1])
    torch.testing.assert_close(out_pair[0], ref_pair[0], atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------------------------
# (e) torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (compiling this U-Net on the 2-core CPU machine took 170 s)")
def test_compiled_unet_matches_eager() -> None:
    """``wrap_model(..., channels_last=True, compile=True)`` on the U-Net (deep supervision): the
    state-dict keys carry no ``_orig_mod.`` prefix, and in train mode the compiled forward and its
    gradients match eager.

    fp32: relative L2 error <= 1e-2 per head (both run cuDNN convolutions, by default in TF32:
    2**-11 rounding per conv over ~20 convs; Inductor may pick other layouts/algorithms).
    bf16 autocast (our recipe): the compiled-vs-eager difference must not exceed 3x the eager
    bf16-vs-fp32 difference measured here on the same input (Inductor fuses BatchNorm and LeakyReLU
    and rounds to bf16 at other places than eager, which is rounding of that same size), nor 5e-2
    (bf16-vs-fp32 measured 1-3 % per head on CPU).
    """
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = UNet2d(SIZE, 4, width=WIDTH)
    options = RuntimeOptions()
    nets = {}
    for kind in ("eager32", "eager16", "compiled"):
        nets[kind] = wrap_model(copy.deepcopy(base), dev, 1, options, channels_last=(kind != "eager32"),
                                compile=(kind == "compiled"))
    _, compiled_modules = nets["compiled"]
    assert not any("_orig_mod" in k for k in compiled_modules.state_dict())
    x = torch.randn(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    bf16, _ = resolve_precision("bf16", dev)

    def run(kind: str, dtype: torch.dtype | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        model, modules = nets[kind]
        modules.zero_grad(set_to_none=True)
        with autocast(dev, dtype):
            outs = model(x if kind == "eager32" else x_cl, deep_supervision=True)
            loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in modules.parameters()])
        return [o.detach().float() for o in outs], grads

    out32, grad32 = run("eager32", None)
    out16, grad16 = run("eager16", bf16)
    outc, gradc = run("compiled", bf16)
    assert len(outc) == len(out16) == len(base.head)
    for head, (c, e, r) in enumerate(zip(outc, out16, out32)):
        assert torch.isfinite(c).all()
        budget = min(max(3 * _rel(e, r), 1e-3), 5e-2)
        assert _rel(c, e) <= budget, (head, _rel(c, e), _rel(e, r))
    assert torch.isfinite(gradc).all()
    assert _rel(gradc, grad16) <= min(max(3 * _rel(grad16, grad32), 1e-3), 0.5), (_rel(gradc, grad16), _rel(grad16, grad32))

    # fp32 compiled forward (a recompile: the autocast state is part of the guard)
    model, _ = nets["compiled"]
    eager, _ = nets["eager16"]
    with torch.no_grad():
        c32 = model(x_cl, deep_supervision=True)
        e32 = eager(x_cl, deep_supervision=True)
    for head, (c, e) in enumerate(zip(c32, e32)):
        assert c.dtype == torch.float32
        assert _rel(c, e) <= 1e-2, (head, _rel(c, e))
