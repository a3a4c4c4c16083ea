"""``deterministic: true`` of the training configs: make one process's training repeatable bit for bit.

What the loops already fix without it: initial weights (``torch.manual_seed``), data order
(``SliceLoader`` permutes by ``(seed, epoch, rank)``; it has no worker processes, only reader threads
whose batches are consumed in a fixed order) and augmentation (a ``torch.Generator`` per rank and
epoch). What this adds: torch may only use deterministic kernels (an op without one raises, naming
it), cuDNN does not benchmark (which could pick a different convolution algorithm per run) and uses
deterministic algorithms, and on CUDA cuBLAS gets a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``,
which torch requires for deterministic matrix products).

Bit-identity still needs the same machine type, library versions, thread count
(``torch.get_num_threads()``), worker count and device; see ``docs/finetuning.md``.
"""

from __future__ import annotations

import os

import torch

#: cuBLAS workspace setting torch's reproducibility notes require for deterministic GEMMs on CUDA >= 10.2.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def configure_determinism(enabled: bool, device: torch.device) -> None:
    """Switch this process to deterministic kernels when ``enabled`` (a no-op otherwise).

    Call it in the training process before the first CUDA matrix product (cuBLAS reads its
    workspace setting when it creates its handle). The switch is process-wide and stays on.
    """
    if not enabled:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


__all__ = ["CUBLAS_WORKSPACE_CONFIG", "configure_determinism"]
