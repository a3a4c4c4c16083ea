"""NT-Xent (SimCLR) and its positional variant (PCL) as pure functions.

Both follow the published code's formula (SupCon "L_out" form). For ``2N`` embeddings ``z_i``::

    s_ij = cos(z_i, z_j) / tau
    log p_ij = s_ij - log sum_{k != i} exp(s_ik)          (denominator includes the positives)
    L = -(1 / |A|) sum_{i in A} (1 / |P(i)|) sum_{j in P(i)} log p_ij

NT-Xent: ``P(i)`` is the other view of the same image (rows ``2k`` and ``2k + 1`` are the views of
image ``k``), so ``A`` is every row. PCL: ``P(i) = {j != i : |pos_i - pos_j| < threshold}``
(strict), across subjects and frames; anchors without any positive are left out of the mean ``A``
(with the two views of each image sharing a position every anchor has one).

Everything is computed in fp32 even under autocast (``exp(1 / 0.1)`` summed over hundreds of terms
overflows fp16). Callers that want the global batch across ranks gather first
(``trainers.distributed.gather_with_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _interleave(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` x 2 -> ``(2N, D)`` with rows ``[z0_0, z1_0, z0_1, z1_1, ...]``."""
    if z0.shape != z1.shape:
        raise ValueError(f"ntxent: the two views have different shapes {tuple(z0.shape)} and {tuple(z1.shape)}")
    return torch.stack((z0, z1), dim=1).reshape(-1, z0.shape[-1])


def _log_prob(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(M, D)`` -> ``(M, M)`` fp32 matrix of ``log p_ij`` (diagonal excluded from the softmax)."""
    if z.ndim != 2:
        raise ValueError(f"expected embeddings of shape (M, D), got {tuple(z.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    return sim - lse


def _supcon(log_prob: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over anchors with >= 1 positive of the mean over positives of ``-log p_ij``."""
    counts = positives.sum(dim=1)
    has_pos = counts > 0
    if not bool(has_pos.any()):
        raise ValueError("contrastive loss: no anchor has a positive pair")
    per_anchor = -(log_prob * positives).sum(dim=1)[has_pos] / counts[has_pos]
    return per_anchor.mean()


def ntxent(z: torch.Tensor, z1: torch.Tensor | None = None, *, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over ``2N`` embeddings.

    Args:
        z: ``(2N, D)`` with the two views of image ``k`` in rows ``2k, 2k + 1``; or, when ``z1`` is
            given, the first views ``(N, D)``.
        z1: optional second views ``(N, D)``.
        temperature: ``tau`` (the paper uses 0.1).

    Returns:
        fp32 scalar, mean over all ``2N`` anchors (both directions).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        if z1 is not None:
            z = _interleave(z, z1)
        if z.shape[0] % 2 or z.shape[0] < 2:
            raise ValueError(f"ntxent: expected an even number >= 2 of rows (view pairs), got {z.shape[0]}")
        log_prob = _log_prob(z, temperature)
        partner = torch.arange(z.shape[0], device=z.device) ^ 1
        return -log_prob.gather(1, partner[:, None]).mean()


def positional_ntxent(
    z: torch.Tensor, positions: torch.Tensor, threshold: float = 0.1, temperature: float = 0.1
) -> torch.Tensor:
    """PCL loss: positives are all other rows whose slice position differs by < ``threshold``.

    Args:
        z: ``(M, D)`` embeddings (views of an image adjacent, as for ``ntxent``).
        positions: ``(M,)`` relative slice positions in [0, 1) (``slice / slice_count``), one per row.
        threshold: strict bound on ``|pos_i - pos_j|`` (the paper uses 0.1).
        temperature: ``tau`` (0.1).

    Returns:
        fp32 scalar.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        if positions.shape != (z.shape[0],):
            raise ValueError(f"positional_ntxent: positions {tuple(positions.shape)} do not match {z.shape[0]} rows")
        log_prob = _log_prob(z, temperature)
        pos = positions.to(device=z.device, dtype=torch.float64)
        positives = (pos[:, None] - pos[None, :]).abs() < threshold
        positives.fill_diagonal_(False)
        return _supcon(log_prob, positives.float())
