"""Execution forms of factorised layers: kernel, feature and auto compute the same function and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
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


# -- taps that only read padding (kflo_cli.reparam.execution.live_taps) ------------------------------------------------
def test_live_taps_known_answers():
    from kflo_cli.reparam.execution import live_taps

    conv = nn.Conv2d(8, 6, 3, padding=1)
    crop = live_taps(conv, (4, 8, 1, 1))  # a 1x1 map: only the centre tap reads it
    assert crop.taps == (slice(1, 2), slice(1, 2)) and crop.padding == (0, 0) and crop.kept((3, 3)) == 1
    assert live_taps(conv, (4, 8, 5, 5)) is None  # every tap reads real input somewhere
    # stride 2 on a 2x2 map: one output position, reading taps 1 and 2 (tap 0 reads the padding row/column)
    assert live_taps(nn.Conv2d(8, 6, 3, padding=1, stride=2), (4, 8, 2, 2)).taps == (slice(1, 3), slice(1, 3))
    # per dimension: a 2x3 map under a 5x5 kernel with padding 2 drops the outer rows only
    crop = live_taps(nn.Conv2d(8, 6, 5, padding=2), (4, 8, 2, 3))
    assert crop.taps == (slice(1, 4), slice(0, 5)) and crop.padding == (1, 2)
    for other in (nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"), nn.Conv2d(8, 6, 3, padding="same"),
                  nn.Linear(8, 6)):
        assert live_taps(other, (4, 8, 1, 1) if not isinstance(other, nn.Linear) else (4, 8)) is None


def _matches_the_full_kernel(conv: nn.Module, shape: tuple[int, ...], spec: str):
    """``conv`` expanded with ``spec`` in float64, its factors moved off their start: checks that the outputs and every
    factor's gradient on an input of ``shape`` equal those of the layer's own convolution with its full composed
    kernel. Returns (model, layer, input, the convolution function, the reference output)."""
    torch.manual_seed(0)
    model = kflo.expand(nn.Sequential(copy.deepcopy(conv).double()), spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer, x = model[0], torch.randn(shape, dtype=torch.float64)
    conv_fn = (F.conv1d, F.conv2d, F.conv3d)[len(shape) - 3]
    reference = conv_fn(x, layer.parametrizations.weight[0](), layer.bias, layer.stride, layer.padding,
                        layer.dilation, layer.groups)
    params = list(model.parameters())
    want = torch.autograd.grad(reference.pow(2).sum(), params)
    out = model(x)
    got = torch.autograd.grad(out.pow(2).sum(), params)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return model, layer, x, conv_fn, reference.detach()


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(8, 6, 3, padding=1), (4, 8, 1, 1)),
    (nn.Conv2d(8, 6, 3, padding=1, stride=2), (4, 8, 2, 2)),
    (nn.Conv2d(8, 6, 5, padding=2), (4, 8, 2, 3)),
    (nn.Conv2d(8, 6, 3, padding=2, dilation=2), (4, 8, 1, 2)),
    (nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), (4, 8, 1, 1)),
    (nn.Conv1d(8, 6, 3, padding=1), (4, 8, 1)),
    (nn.Conv3d(4, 6, 3, padding=1), (2, 4, 1, 2, 1)),
], ids=["1x1", "stride2", "5x5-rows", "dilation2", "grouped", "conv1d", "conv3d"])
@pytest.mark.parametrize("mode", ["kernel", "feature", "auto"])
@pytest.mark.parametrize("decay", ["composed", "factors"])
def test_cropped_forms_compute_the_full_kernels_function(conv, shape, mode, decay):
    """On maps where some taps only read padding, every form runs the cropped kernel: outputs and every factor's
    gradient equal those of the layer's own convolution with the full composed kernel (float64)."""
    if mode == "feature" and conv.groups > 1:
        pytest.skip("KFLO runs grouped convolutions on the kernel only")
    model, layer, x, conv_fn, _ = _matches_the_full_kernel(conv, shape, f"kflo:width=2,mode={mode},decay={decay}")
    # the convolution that ran had the cropped kernel: its FLOPs are the full convolution's times kept / taps
    from torch.utils.flop_counter import FlopCounterMode

    from kflo_cli.reparam.execution import live_taps

    def conv_flops(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0))

    full = conv_flops(lambda: conv_fn(x, layer.parametrizations.weight[0](), None, layer.stride, layer.padding,
                                      layer.dilation, layer.groups))
    kept = live_taps(layer, tuple(shape)).kept(layer.kernel_size)
    if mode == "kernel":
        assert conv_flops(lambda: model(x)) * math.prod(layer.kernel_size) == full * kept


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(8, 6, 3, padding=1, bias=False), (4, 8, 1, 1)),
    (nn.Conv2d(8, 6, 3, padding=1, stride=2, bias=False), (4, 8, 2, 2)),
    (nn.Conv2d(8, 6, 5, padding=2, bias=False), (4, 8, 2, 3)),
    (nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=False), (4, 8, 1, 2)),
    (nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), (4, 8, 1, 1)),
    (nn.Conv1d(8, 6, 3, padding=1, bias=False), (4, 8, 1)),
], ids=["1x1", "stride2", "5x5-rows", "dilation2", "grouped", "conv1d"])
@pytest.mark.parametrize("mode", ["kernel", "feature", "auto"])
@pytest.mark.parametrize("decay", ["composed", "factors"])
def test_expandnet_cl_runs_its_live_taps_only_and_computes_the_full_kernels_function(conv, shape, mode, decay):
    """ExpandNet-CL (1x1, k x k, 1x1, no bias) crops its k x k link to the live taps in both forms: outputs and every
    factor's gradient equal those of the layer's own convolution with the full composed kernel (float64), and the
    convolutions that ran did the cropped work."""
    model, layer, x, _, reference = _matches_the_full_kernel(
        conv, shape, f"expandnet-cl:rate=2,init=random,mode={mode},decay={decay}")
    chain = layer.parametrizations.weight[0]
    assert chain.croppable
    from torch.utils.flop_counter import FlopCounterMode

    from kflo_cli.reparam.execution import live_taps

    crop = live_taps(layer, tuple(shape))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    ran = int(counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0))
    taps = math.prod(layer.kernel_size)
    if mode == "feature":  # the k x k link's convolution on the live taps, the 1x1 links as they are
        assert ran == 2 * chain.feature_macs(layer, tuple(shape), crop)
        assert chain.feature_macs(layer, tuple(shape), crop) < chain.feature_macs(layer, tuple(shape))
    elif mode == "kernel":
        full = 2 * x.shape[0] * math.prod(reference.shape[2:]) * layer.weight.numel()
        assert ran * taps == full * crop.kept(layer.kernel_size)


def test_an_expandnet_chain_with_biases_or_several_multi_tap_links_runs_every_tap():
    # with biases the padded border of the first (1x1) link holds its bias, which the dropped taps would read;
    # ExpandNet-CK chains 3x3 links, across which the padding spreads: neither crops, and both stay exact
    for spec, conv in (("expandnet-cl:rate=2,init=random", nn.Conv2d(8, 6, 3, padding=1)),
                       ("expandnet-ck:rate=2,init=random", nn.Conv2d(8, 6, 5, padding=2, bias=False))):
        for mode in ("kernel", "feature"):
            torch.manual_seed(0)
            model = kflo.expand(nn.Sequential(copy.deepcopy(conv).double()), f"{spec},mode={mode}")
            layer, x = model[0], torch.randn(4, 8, 1, 1, dtype=torch.float64)
            assert not layer.parametrizations.weight[0].croppable
            reference = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
            torch.testing.assert_close(model(x), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec,conv", [
    ("expandnet-cl:rate=2,init=random", nn.Conv2d(8, 6, 3, padding=1, bias=False)),
    ("expandnet-ck:rate=2,init=random", nn.Conv2d(8, 6, 7, padding=3, bias=False)),
    ("expandnet-ck:rate=2,init=random", nn.Conv2d(8, 8, 5, padding=2, groups=2, bias=False)),
], ids=["cl", "ck-7x7", "ck-grouped"])
def test_expandnet_composition_macs_are_what_composing_does(spec, conv):
    # the cost model's count of composing the chain equals the multiply-accumulates torch counts when it composes
    from torch.utils.flop_counter import FlopCounterMode

    model = kflo.expand(nn.Sequential(copy.deepcopy(conv)), spec)
    chain = model[0].parametrizations.weight[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        chain()
    assert counter.get_total_flops() == 2 * chain.composition_macs()
