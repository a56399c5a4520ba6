"""Fixtures shared by the kernel tests."""

import math

import pytest
import torch

import kernel_targets


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """The kernel tests' device, from kernel_targets (which also picks their dtypes)."""
    return kernel_targets.DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Buffers from torch.empty/empty_like start as NaN, so unwritten output elements fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
