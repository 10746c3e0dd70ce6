"""Execution forms of factorised layers: kernel, feature and auto compute the same function and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import kflo_cli as kflo
from kflo_cli.reparam.execution import chosen_forms, choose_form, output_positions

# (recipe spec without mode, layer builder, input shape); groups=1 convolutions of every dimension, strided,
# padded in each way nn.Conv supports, and Linear layers on 2-D and 3-D inputs
CASES = [
    ("kflo", lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (4, 3, 9, 9)),
    ("kflo:depth=3,width=2", lambda: nn.Conv2d(4, 6, 5, padding="same", padding_mode="reflect"), (2, 4, 8, 8)),
    ("kflo", lambda: nn.Conv1d(3, 5, 3, dilation=2, padding=2, padding_mode="circular"), (2, 3, 16)),
    ("kflo", lambda: nn.Conv3d(2, 4, 3, padding="valid", bias=False), (2, 2, 5, 5, 5)),
    ("kflo:width=0.5", lambda: nn.Linear(6, 8), (3, 5, 6)),
    ("expandnet-ck:rate=2,init=random", lambda: nn.Conv2d(3, 6, 5, stride=2, padding=2), (2, 3, 11, 11)),
    ("expandnet-cl:rate=2", lambda: nn.Conv2d(3, 6, 3, padding=1, padding_mode="replicate"), (2, 3, 7, 7)),
    ("expandnet-fc:rate=2,classifier=expand", lambda: nn.Linear(6, 4), (5, 6)),
]


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _expanded(spec: str, build, mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = Holder(build()).double()
    kflo.expand(model, f"{spec}{',' if ':' in spec else ':'}mode={mode}", seed=0)
    with torch.no_grad():  # move every factor away from its start, as training would
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("spec,build,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_form_computes_the_same_outputs_and_gradients_in_float64(spec, build, shape):
    x = torch.randn(shape, dtype=torch.float64)
    results = {}
    for mode in ("kernel", "feature", "auto"):
        model = _expanded(spec, build, mode)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        results[mode] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_out, ref_grads = results["kernel"]
    for mode in ("feature", "auto"):
        out, grads = results[mode]
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-11, msg=f"{mode}: {name}")


def test_the_forms_collapse_to_the_same_plain_layer():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    plains = [kflo.collapse(_expanded("kflo", lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), m)).eval()
              for m in ("kernel", "feature", "auto")]
    assert all(type(p.layer) is nn.Conv2d for p in plains)
    for p in plains[1:]:
        torch.testing.assert_close(p(x), plains[0](x), rtol=1e-12, atol=1e-12)


def test_auto_runs_large_feature_maps_on_the_kernel_and_small_ones_through_the_factors():
    # KFLO 2x4 with decay on the factors: composing a 64 -> 64 3x3 kernel costs 64*256*576 MACs; the feature form
    # costs (256*576 + 64*256) MACs per output position and the kernel form 64*576
    model = _expanded("kflo:decay=factors", lambda: nn.Conv2d(64, 64, 3, padding=1), "auto").float()
    layer = model.layer
    param = layer.parametrizations.weight[0]
    assert choose_form(layer, param, (64, 64, 32, 32)) == "kernel"  # 65,536 positions: compose once
    assert choose_form(layer, param, (2, 64, 1, 1)) == "feature"  # 2 positions: never build the kernel
    model(torch.randn(2, 64, 1, 1)).sum().backward()
    assert chosen_forms(model) == {"layer": {(2, 64, 1, 1): "feature"}}
    # evaluation inside parametrize.cached() composes once for every batch: the kernel form
    with torch.no_grad(), parametrize.cached():
        model(torch.randn(2, 64, 1, 1))
    assert param._kflo_forms[((2, 64, 1, 1), False, True)] == "kernel"


def test_a_decay_on_the_composed_kernel_makes_training_compose_it_anyway():
    # the paper's KFLO rule (decay on W') composes the kernel every step: the kernel form is then never worse
    model = _expanded("kflo", lambda: nn.Conv2d(64, 64, 3, padding=1), "auto").float()
    layer = model.layer
    assert choose_form(layer, layer.parametrizations.weight[0], (2, 64, 1, 1)) == "kernel"
    with torch.no_grad():
        assert choose_form(layer, layer.parametrizations.weight[0], (2, 64, 1, 1)) == "feature"


def test_output_positions_follow_the_layer():
    assert output_positions(nn.Conv2d(3, 8, 3, stride=2, padding=1), (1, 3, 9, 9)) == 25
    assert output_positions(nn.Conv2d(3, 8, 3, padding="same"), (1, 3, 9, 7)) == 63
    assert output_positions(nn.Conv1d(3, 8, 3, dilation=2), (1, 3, 16)) == 12
    assert output_positions(nn.Linear(3, 8), (4, 5, 3)) == 1
