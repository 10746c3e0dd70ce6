"""Checkpoints written before the redesign (kflo 0.1.0 at commit d8a653d) still load and compute what they did.

The files in tests/fixtures/ were written by ``tests/fixtures/make_legacy_fixtures.py`` with that code: expanded
models (parameters perturbed, BatchNorm statistics moved), their collapses, and an input with the expanded
model's eval-mode output. Together they cover every built-in recipe but Powerpropagation, recipe combinations,
per-recipe include globs, ExpandNet's feature form and the compander's network-wide (coarse) pair.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kflo_cli as kflo
from kflo_cli.checkpoint import load_into

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.name[: -len(".safetensors")] for p in FIXTURES.glob("*.safetensors")
               if not p.name.endswith(("_plain.safetensors", "_io.safetensors")))

#: float32 outputs recomputed by the same operations; the chain's order of multiplication may differ.
RTOL = 1e-5


def test_fixtures_present():
    assert len(CASES) == 3, CASES


@pytest.mark.parametrize("case", CASES)
def test_legacy_expanded_checkpoint_computes_what_it_did(case):
    io = load_file(str(FIXTURES / f"{case}_io.safetensors"))
    model = kflo.load(FIXTURES / f"{case}.safetensors")
    assert kflo.is_expanded(model)
    with torch.no_grad():
        out = model.eval()(io["input"])
    scale = io["output"].abs().max()
    assert ((out - io["output"]).abs().max() / scale).item() < RTOL


@pytest.mark.parametrize("case", CASES)
def test_legacy_plain_checkpoint_and_collapse_agree(case):
    io = load_file(str(FIXTURES / f"{case}_io.safetensors"))
    meta = kflo.read_metadata(FIXTURES / f"{case}_plain.safetensors")
    # the plain file loads strictly into the unmodified architecture
    fresh = kflo.create_model(meta["model_id"], **meta["model_kwargs"])
    load_into(fresh, load_file(str(FIXTURES / f"{case}_plain.safetensors")))
    collapsed_now = kflo.collapse(kflo.load(FIXTURES / f"{case}.safetensors"))
    with torch.no_grad():
        old = fresh.eval()(io["input"])
        new = collapsed_now.eval()(io["input"])
    scale = io["output"].abs().max()
    assert ((old - io["output"]).abs().max() / scale).item() < RTOL
    assert ((new - io["output"]).abs().max() / scale).item() < RTOL
    assert list(collapsed_now.state_dict()) == list(fresh.state_dict())
