"""Shared test helpers: moving a model away from its initial state, comparing outputs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import settings

settings.register_profile("ci", max_examples=int(os.environ.get("KFLO_HYPOTHESIS_EXAMPLES", "25")), deadline=None, derandomize=True)
settings.load_profile("ci")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every parameter away from its initial value (relative noise), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.add_(scale * (p.abs().mean() + 1e-3) * noise)


@torch.no_grad()
def move_bn_stats(model: nn.Module, input_size: tuple[int, ...], steps: int = 2, batch: int = 4, seed: int = 1) -> None:
    """Run train-mode forwards so that BatchNorm running statistics leave their initial values."""
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    model.train()
    for _ in range(steps):
        model(torch.randn((batch, *input_size), generator=gen) * 2.0 + 0.5)
    model.train(was)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
