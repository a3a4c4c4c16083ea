"""Shared fixtures (torch only, so the GPU tests still collect on a bare CUDA machine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test with one torch thread: tiny convolutions are fastest so on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
