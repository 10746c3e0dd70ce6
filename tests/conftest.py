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


def scaled_timeout(seconds: float) -> float:
    """A test's time limit ``seconds`` times ``KFLO_TEST_TIMEOUT_SCALE`` (default 1), for slow or loaded machines.

    Every hard-coded time limit of the suite (subprocess timeouts, waiting loops) goes through here, so one
    variable stretches them all: ``KFLO_TEST_TIMEOUT_SCALE=3 python -m pytest -q``.
    """
    raw = os.environ.get("KFLO_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = float("nan")
    if not scale > 0 or scale == float("inf"):
        raise pytest.UsageError(f"KFLO_TEST_TIMEOUT_SCALE={raw!r} must be a positive number (a factor such as 1 or 2.5)")
    return seconds * scale


def pytest_configure(config):
    scaled_timeout(1)  # a bad KFLO_TEST_TIMEOUT_SCALE stops the run before any test, with one message


def slow_cases(cases: list[tuple], ids: list[str], slow: set[str]) -> list:
    """``cases`` as ``pytest.param``s named ``ids``; those named in ``slow`` carry ``pytest.mark.slow``.

    ``slow`` must name existing cases, so a renamed case cannot silently lose its mark. The slow cases are the
    long ones measured with ``--durations``; CI runs them, ``-m "not slow"`` leaves them out locally.
    """
    unknown = set(slow) - set(ids)
    if unknown:
        raise ValueError(f"slow_cases: no case is named {sorted(unknown)}")
    return [pytest.param(*case, id=i, marks=[pytest.mark.slow] if i in slow else []) for case, i in zip(cases, ids)]


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every parameter away from its initial value (relative noise), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.add_(scale * (p.abs().mean() + 1e-3) * noise)


@torch.no_grad()
def move_bn_stats(model: nn.Module, input_size: tuple[int, ...], steps: int = 2, batch: int = 4, seed: int = 1) -> None:
    """Run train-mode forwards so that BatchNorm running statistics leave their initial values (inputs drawn in
    float32, then cast to the model's floating dtype)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    was = model.training
    model.train()
    for _ in range(steps):
        model((torch.randn((batch, *input_size), generator=gen) * 2.0 + 0.5).to(dtype))
    model.train(was)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_user_error(result, *fragments: str) -> None:
    """A CliRunner result is a user error: exit 2, one ``error: ...`` line on stderr holding every fragment, no
    traceback."""
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in result.output, err
    for fragment in fragments:
        assert fragment in err, err
