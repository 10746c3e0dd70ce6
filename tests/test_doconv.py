"""DO-Conv recipe: per-true-input-channel D, function-preserving start, exact collapse, counts, zoo and CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import kflo_cli as kflo
from kflo_cli.errors import KfloError
from kflo_cli.reparam.doconv import DOConvParametrization, channel_kernels_of, compose_doconv

from conftest import slow_cases
from recipe_checks import cli_roundtrip, conv_configs, layer_roundtrip, zoo_roundtrip

TOL64 = 1e-10  # float64 layers: composing and collapsing only reorder float64 sums


def expected_params(kwargs: dict, dmul: int) -> int:
    taps = math.prod(kwargs["kernel_size"])
    cin, cout, groups = kwargs["in_channels"], kwargs["out_channels"], kwargs["groups"]
    return cout * (cin // groups) * dmul + cin * taps * dmul + (cout if kwargs["bias"] else 0)


@given(cfg=conv_configs(min_taps=2), extra=st.integers(0, 3), seed=st.integers(0, 100))
def test_doconv_layer_start_collapse_and_count(cfg, extra, seed):
    cls, kwargs, in_shape = cfg
    taps = math.prod(kwargs["kernel_size"])
    dmul = taps + extra
    torch.manual_seed(seed)
    layer = cls(**kwargs).double()
    x = torch.randn((2, *in_shape), dtype=torch.float64)
    spec = f"doconv:depth_multiplier={dmul}" if extra else "doconv"
    wrapper = layer_roundtrip(layer, spec, x, tol=TOL64, seed=seed)
    expanded = wrapper[0]
    assert "weight" not in dict(expanded.named_parameters())
    assert sum(p.numel() for p in expanded.parameters()) == expected_params(kwargs, dmul)
    # Train mode: the forward and backward reach both factors.
    expanded.train()
    expanded(x).pow(2).sum().backward()
    inner = expanded.parametrizations.weight[0]
    assert inner.channel_kernels.grad.abs().sum() > 0 and inner.depthwise.grad.abs().sum() > 0


def naive_doconv(kernel: torch.Tensor, depthwise: torch.Tensor, groups: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The definition, one output and input channel at a time: W'[o, c] = (D_{c_true} + I)^T-weighted W[o, c]."""
    out, per_group, *k = shape
    taps = math.prod(k)
    eye = torch.eye(taps, kernel.shape[2], dtype=kernel.dtype)
    result = torch.zeros(out, per_group, taps, dtype=kernel.dtype)
    for o in range(out):
        g = o // (out // groups)
        for c in range(per_group):
            result[o, c] = (depthwise[g * per_group + c] + eye) @ kernel[o, c]
    return result.reshape(shape)


@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 4), (2, 4, 6), (3, 3, 6)])
def test_depthwise_matrix_is_tied_to_the_true_input_channel(groups, cin, cout):
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, 3, groups=groups).double()
    inner = DOConvParametrization(layer.weight.shape, cin, groups, 11).double()
    inner.right_inverse(layer.weight.detach())
    with torch.no_grad():
        inner.depthwise.normal_()
    assert torch.allclose(inner(), naive_doconv(inner.kernel(), inner.depthwise, groups, layer.weight.shape), atol=1e-12)
    # Changing D of true input channel c changes only the filters of c's group, and only at c's position.
    base = inner().detach().clone()
    c_true = cin - 1
    with torch.no_grad():
        inner.depthwise[c_true] += 1.0
    changed = (inner().detach() - base).abs().sum(dim=(2, 3)) > 0
    g, c_local = divmod(c_true, cin // groups)
    expected = torch.zeros_like(changed)
    expected[g * (cout // groups):(g + 1) * (cout // groups), c_local] = True
    assert torch.equal(changed, expected)


def test_extra_columns_are_random_and_depthwise_starts_at_zero():
    layer = nn.Conv2d(2, 3, 3)
    inner = DOConvParametrization(layer.weight.shape, 2, 1, 12)
    inner.right_inverse(layer.weight.detach())
    assert torch.equal(inner.kernel()[:, :, :9], layer.weight.detach().reshape(3, 2, 9))
    assert inner.kernel()[:, :, 9:].abs().sum() > 0, "zero extra columns facing a zero D never train"
    assert inner.depthwise.abs().sum() == 0


def test_depth_multiplier_below_taps_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, 3))
    with pytest.raises(KfloError, match=r"layer '0' has a 5x5 kernel \(25 taps\).*depth_multiplier >= 25"):
        kflo.expand(model, "doconv:depth_multiplier=9")
    # Excluding the 5x5 layer makes D_mul = 9 valid for the 3x3 one.
    kflo.expand(model, "doconv:depth_multiplier=9", exclude=["0"])
    assert [r.name for r in kflo.record(model).plan if r.applied] == ["1"]
    with pytest.raises(KfloError, match="depth_multiplier=-1 is out of range; use an integer from 0 to 4096"):
        kflo.create_recipe("doconv:depth_multiplier=-1")


def test_one_tap_convolutions_are_skipped_and_linear_layers_ignored():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    rows = {r.name: r for r in kflo.plan(model, "doconv")}
    assert not rows["0"].applied and "1-tap" in rows["0"].reason
    assert rows["1"].applied and "3" not in rows


@pytest.mark.parametrize("cls_name", ["Conv2dSame", "StdConv2d", "ScaledStdConv2d"])
def test_timm_weight_reading_subclasses(cls_name):
    import timm.layers as tl

    torch.manual_seed(0)
    layer = getattr(tl, cls_name)(4, 6, 3, stride=2).double()
    layer_roundtrip(layer, "doconv", torch.randn(2, 4, 9, 9, dtype=torch.float64), tol=TOL64)


def test_roles_and_gradients():
    model = kflo.expand(nn.Sequential(nn.Conv2d(2, 3, 3)), "doconv")
    roles = kflo.param_roles(model)
    assert roles["0.parametrizations.weight.0.channel_kernels"].kind == "doconv-kernel"
    assert roles["0.parametrizations.weight.0.depthwise"].kind == "doconv-depthwise"
    assert kflo.step_scales(model) == {}


ZOO = [
    ("timm:test_efficientnet", {"num_classes": 5}, (3, 32, 32)),
    ("timm:tf_mobilenetv3_small_minimal_100", {"num_classes": 5}, (3, 32, 32)),
    ("torchvision:shufflenet_v2_x0_5", {"num_classes": 5}, (3, 32, 32)),
    ("smallnet_k7", {}, (3, 32, 32)),
]


@pytest.mark.parametrize("model_id,kwargs,size", slow_cases(ZOO, [z[0] for z in ZOO],
                                                           {"timm:test_efficientnet", "timm:tf_mobilenetv3_small_minimal_100"}))
def test_zoo(model_id, kwargs, size, tmp_path):
    model = zoo_roundtrip(model_id, kwargs, size, "doconv", tmp_path)
    skipped = [r for r in kflo.record(model).plan if not r.applied]
    assert all("1-tap" in r.reason for r in skipped)


def test_cli_expand_collapse_verify(tmp_path):
    plain = cli_roundtrip("timm:test_resnet", ["--recipe-file", "doconv"], tmp_path, "3,32,32", ["--num-classes", "4"])
    import timm
    from safetensors.torch import load_file

    timm.create_model("test_resnet", num_classes=4).load_state_dict(load_file(str(plain)), strict=True)


@pytest.mark.parametrize("groups,cin,cout,kernel,dmul",
                         [(1, 3, 4, (3, 3), 9), (2, 4, 6, (3, 3), 11), (3, 3, 6, (3,), 3), (4, 4, 4, (2, 2, 2), 8),
                          (1, 5, 7, (5, 5), 25)])
def test_composition_matches_the_definition_in_value_and_gradient(groups, cin, cout, kernel, dmul):
    """``compose_doconv`` (a batched product with its own backward) against the definition run through autograd."""
    torch.manual_seed(groups + dmul)
    shape = (cout, cin // groups, *kernel)
    taps = math.prod(kernel)
    w = torch.randn(cout, cin // groups, dmul, dtype=torch.float64, requires_grad=True)
    d = torch.randn(cin, taps, dmul, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(taps, dmul, dtype=torch.float64)
    fast = compose_doconv(channel_kernels_of(w, groups), d + eye, groups).reshape(shape)
    slow = naive_doconv(w, d, groups, shape)
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(shape, dtype=torch.float64)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), (w, d))
    slow_grads = torch.autograd.grad((slow * upstream).sum(), (w, d))
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: compose_doconv(a, b, groups),
                                    (channel_kernels_of(w, groups).detach().requires_grad_(), d + eye))


def test_composition_under_bfloat16_autocast_gives_float32_gradients():
    """Under autocast the kernel comes out in bfloat16 and its gradient arrives in bfloat16; the factors' gradients
    must come back in their own dtype, close to the float32 ones."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    model = kflo.expand(nn.Sequential(layer), "doconv")
    inner = model[0].parametrizations.weight[0]
    with torch.no_grad():
        inner.depthwise.normal_(std=0.1)
    x = torch.randn(2, 4, 5, 5)
    model(x).square().sum().backward()
    reference = [inner.channel_kernels.grad.clone(), inner.depthwise.grad.clone()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().sum().backward()
    for p, ref in zip((inner.channel_kernels, inner.depthwise), reference):
        assert p.grad.dtype == torch.float32
        assert torch.allclose(p.grad, ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


def test_checkpoints_hold_w_in_the_paper_layout_and_load_back():
    """W is stored per input channel but ``state_dict()`` holds the paper's ``out x in/groups x D_mul`` under
    ``kernel`` (the layout of every checkpoint before the per-channel storage), and loading it restores W'."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, groups=2)
    inner = DOConvParametrization(layer.weight.shape, 4, 2, 10)
    inner.right_inverse(layer.weight.detach())
    with torch.no_grad():
        inner.depthwise.normal_()
        inner.channel_kernels.normal_()
    state = inner.state_dict()
    assert list(state) == ["kernel", "depthwise"] and state["kernel"].shape == (6, 2, 10)
    assert torch.equal(state["kernel"], naive_kernel := inner.kernel().detach())
    # the paper's definition on the saved layout gives the composed kernel
    assert torch.allclose(naive_doconv(naive_kernel, state["depthwise"], 2, layer.weight.shape), inner(), atol=1e-6)
    fresh = DOConvParametrization(layer.weight.shape, 4, 2, 10)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(), inner())
