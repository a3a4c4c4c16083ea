"""SSP losses against closed forms and independent implementations (MONAI, plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.distributed import all_reduce_mean, gather_with_grad, scale_grad_for_ddp
from trainers.losses import dino_loss, masked_mse, ntxent, positional_ntxent, update_center


def _interleave(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    return torch.stack((z0, z1), 1).reshape(-1, z0.shape[1])


def _loop_supcon(z: np.ndarray, pos: np.ndarray, threshold: float, tau: float) -> float:
    """The spec's PCL formula written out with plain loops (float64)."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    m = len(z)
    total, anchors = 0.0, 0
    for i in range(m):
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(m) if k != i)
        terms = [float(z[i] @ z[j]) / tau - math.log(denom) for j in range(m) if j != i and abs(pos[i] - pos[j]) < threshold]
        if terms:
            total += -sum(terms) / len(terms)
            anchors += 1
    return total / anchors


# ---- NT-Xent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,tau", [(3, 0.1), (8, 0.5)])
def test_ntxent_identical_embeddings_give_log_2n_minus_1(n: int, tau: float) -> None:
    z = torch.ones(2 * n, 5) * 0.3
    assert ntxent(z, temperature=tau).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_orthonormal_perfect_pairs(tau: float) -> None:
    n = 4
    base = torch.eye(n)  # pair k = e_k twice; pairs orthonormal to each other
    z = _interleave(base, base * 2.0)  # scale must not matter (cosine)
    expected = -1 / tau + math.log(math.exp(1 / tau) + 2 * n - 2)
    assert ntxent(z, temperature=tau).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ntxent_single_pair_is_zero() -> None:
    z = torch.randn(2, 7)
    assert ntxent(z, temperature=0.1).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_matches_monai_contrastive_loss(tau: float) -> None:
    from monai.losses import ContrastiveLoss

    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    ref = ContrastiveLoss(temperature=tau)(z0, z1)  # MONAI: input = first views, target = second views
    assert ntxent(z0, z1, temperature=tau).item() == pytest.approx(ref.item(), rel=1e-5)
    assert ntxent(_interleave(z0, z1), temperature=tau).item() == pytest.approx(ref.item(), rel=1e-5)


def test_ntxent_is_fp32_under_autocast_and_does_not_overflow() -> None:
    z = torch.randn(64, 8) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ntxent(z.to(torch.bfloat16), temperature=0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ntxent(z.to(torch.bfloat16).float(), temperature=0.05).item(), rel=1e-5)


def test_ntxent_rejects_odd_rows() -> None:
    with pytest.raises(ValueError, match="even number"):
        ntxent(torch.randn(5, 3))


# ---- PCL --------------------------------------------------------------------------------------


def test_pcl_matches_plain_loop_formula() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(12, 6, generator=g, dtype=torch.float64)
    pos = torch.tensor([0.0, 0.0, 0.05, 0.05, 0.5, 0.5, 0.55, 0.55, 0.9, 0.9, 0.12, 0.12], dtype=torch.float64)
    ours = positional_ntxent(z, pos, threshold=0.1, temperature=0.1).item()
    assert ours == pytest.approx(_loop_supcon(z.numpy(), pos.numpy(), 0.1, 0.1), rel=1e-5)


def test_pcl_reduces_to_ntxent_when_positions_are_far_apart_and_threshold_is_strict() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 5, generator=g)
    # neighbouring images are exactly `threshold` apart: strict < makes them negatives
    pos = torch.tensor([0.0, 0.25, 0.5, 0.75]).repeat_interleave(2)
    assert positional_ntxent(z, pos, threshold=0.25, temperature=0.1).item() == pytest.approx(
        ntxent(z, temperature=0.1).item(), rel=1e-5
    )


def test_pcl_identical_embeddings_same_position_give_log_2n_minus_1() -> None:
    z = torch.ones(10, 4)
    assert positional_ntxent(z, torch.full((10,), 0.3)).item() == pytest.approx(math.log(9), rel=1e-5)


def test_pcl_positions_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="positions"):
        positional_ntxent(torch.randn(4, 3), torch.zeros(3))


# ---- single-process distributed helpers -------------------------------------------------------


def test_helpers_are_noops_without_process_group() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(all_reduce_mean(x), x.detach())
    loss = (x**2).sum()
    assert scale_grad_for_ddp(loss) is loss


# ---- DINO -------------------------------------------------------------------------------------


def test_dino_uniform_logits_give_log_d() -> None:
    d, b = 32, 3
    s, t = torch.zeros(8 * b, d), torch.zeros(2 * b, d)
    loss = dino_loss(s, t, torch.zeros(1, d), 0.1, 0.04, n_global=2, n_crops=8)
    assert loss.item() == pytest.approx(math.log(d), rel=1e-6)


def test_dino_matches_loop_over_pairs() -> None:
    g = torch.Generator().manual_seed(4)
    b, d, n_crops, n_global = 3, 10, 4, 2
    s = torch.randn(n_crops * b, d, generator=g)
    t = torch.randn(n_global * b, d, generator=g)
    c = torch.randn(1, d, generator=g) * 0.1
    ref, pairs = 0.0, 0
    for q in range(n_global):
        for v in range(n_crops):
            if v == q:
                continue
            for i in range(b):
                tq = np.exp((t[q * b + i] - c[0]).double().numpy() / 0.04)
                tq /= tq.sum()
                sv = s[v * b + i].double().numpy() / 0.1
                log_sv = sv - np.log(np.exp(sv).sum())
                ref += -(tq * log_sv).sum() / b
            pairs += 1
    ours = dino_loss(s, t, c, 0.1, 0.04, n_global=n_global, n_crops=n_crops)
    assert ours.item() == pytest.approx(ref / pairs, rel=1e-5)


def test_dino_teacher_gets_no_gradient_and_student_does() -> None:
    s = torch.randn(8, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    dino_loss(s, t, torch.zeros(1, 6), 0.1, 0.04, 2, 4).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_dino_center_update_closed_form() -> None:
    c_vec = torch.randn(1, 16)
    center = update_center(torch.zeros(1, 16), c_vec.repeat(6, 1), momentum=0.9)
    assert torch.allclose(center, 0.1 * c_vec, atol=1e-6)
    center2 = update_center(center, c_vec.repeat(6, 1), momentum=0.9)
    assert torch.allclose(center2, 0.19 * c_vec, atol=1e-6)


def test_dino_rejects_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="batch size"):
        dino_loss(torch.zeros(8, 4), torch.zeros(6, 4), torch.zeros(1, 4), 0.1, 0.04, 2, 4)


# ---- MIM --------------------------------------------------------------------------------------


def test_masked_mse_ignores_unmasked_pixels_and_normalises_by_masked_count() -> None:
    g = torch.Generator().manual_seed(5)
    target = torch.randn(2, 1, 8, 8, generator=g)
    pred = torch.randn(2, 1, 8, 8, generator=g, requires_grad=True)
    mask = (torch.rand(2, 1, 8, 8, generator=g) < 0.75).float()
    loss = masked_mse(pred, target, mask)
    sel = mask.bool()
    assert loss.item() == pytest.approx(((pred - target)[sel] ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.all(pred.grad[~sel] == 0)
    changed = pred.detach().clone()
    changed[~sel] += 100.0
    assert masked_mse(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_masked_mse_rejects_empty_mask_and_shape_mismatch() -> None:
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="no pixel"):
        masked_mse(x, x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="shapes differ"):
        masked_mse(x, torch.zeros(1, 1, 4, 5), x)
