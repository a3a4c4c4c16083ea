"""DINO self-distillation loss and centre update (pure functions).

Student logits hold ``n_crops`` crop chunks of ``B`` rows each, crop-major (all images' crop 0,
then all images' crop 1, ...), the ``n_global`` global crops first; the teacher sees only the
global crops, in the same order. For teacher chunk ``q`` and student chunk ``v != q``::

    t = softmax((teacher_q - center) / teacher_temp)        (no gradient)
    ce(q, v) = mean_b sum_k -t_bk log_softmax(student_v / student_temp)_bk
    loss = mean over the n_global * n_crops - n_global pairs of ce(q, v)

Computed in fp32 under autocast. The centre is updated separately (``update_center``) after the
loss, from the teacher logits of the whole global batch (all-reduced across ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.distributed import all_reduce_mean


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global: int,
    n_crops: int,
) -> torch.Tensor:
    """DINO cross-entropy between teacher and student crops.

    Args:
        student_out: ``(n_crops * B, D)`` student logits, crop-major, globals first.
        teacher_out: ``(n_global * B, D)`` teacher logits (detached inside).
        center: ``(1, D)`` or ``(D,)`` running centre of the teacher logits.
        student_temp: student softmax temperature (0.1).
        teacher_temp: teacher softmax temperature (0.02 -> 0.04 warm-up).
        n_global: number of global crops (2), the first chunks of ``student_out``.
        n_crops: total crops per image (2 + 6 = 8).

    Returns:
        fp32 scalar.
    """
    with torch.autocast(device_type=student_out.device.type, enabled=False):
        if n_global < 1 or n_crops < 2:
            raise ValueError(f"dino_loss: need n_global >= 1 and n_crops >= 2, got {n_global}, {n_crops}")
        if student_out.shape[0] % n_crops or teacher_out.shape[0] % n_global:
            raise ValueError(
                f"dino_loss: {student_out.shape[0]} student rows / {n_crops} crops or "
                f"{teacher_out.shape[0]} teacher rows / {n_global} globals is not whole"
            )
        if student_out.shape[0] // n_crops != teacher_out.shape[0] // n_global:
            raise ValueError("dino_loss: student and teacher disagree on the batch size")
        log_s = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
        t = F.softmax((teacher_out.detach().float() - center.float().reshape(1, -1)) / teacher_temp, dim=-1)
        t_chunks = t.chunk(n_global)
        total = student_out.new_zeros((), dtype=torch.float32)
        terms = 0
        for q, tq in enumerate(t_chunks):
            for v, sv in enumerate(log_s):
                if v == q:
                    continue
                total = total + (-(tq * sv).sum(dim=-1)).mean()
                terms += 1
        return total / terms


def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher's batch-mean logits: ``m * center + (1 - m) * mean_rows(teacher_out)``.

    Args:
        center: ``(1, D)`` current centre.
        teacher_out: ``(R, D)`` teacher logits of this rank (all its global crops).
        momentum: centre momentum (0.9).

    Returns:
        New ``(1, D)`` fp32 centre; the batch mean is averaged over ranks (equal ``R`` per rank),
        so every rank holds the single-process centre of the global batch.
    """
    batch_center = all_reduce_mean(teacher_out.detach().float().mean(dim=0, keepdim=True))
    return center.float() * momentum + batch_center * (1.0 - momentum)
