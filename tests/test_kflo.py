"""KFLO recipe: function-preserving start, exact collapse, parameter counts, roles, over random layer configurations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import kflo_cli as kflo
from kflo_cli.errors import KfloError
from kflo_cli.reparam.kflo import KfloParametrization, kflo_width

from conftest import perturb, rel_err

TOL64 = 1e-10  # float64 layers: composing and collapsing only reorders float64 sums


@st.composite
def layer_configs(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    bias = draw(st.booleans())
    if kind == "linear":
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return kind, dict(in_features=fin, out_features=fout, bias=bias), (fin,)
    dims = int(kind[4])
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    if groups == "depthwise":
        cin = draw(st.integers(1, 6))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        cin = groups * draw(st.integers(1, 3))
        cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3 if dims == 3 else 4)) for _ in range(dims))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    padding_kind = draw(st.sampled_from(["int", "same", "valid"]))
    if padding_kind == "same":
        stride = 1
        padding = "same"
    elif padding_kind == "valid":
        padding = "valid"
    else:
        padding = draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if padding == "valid" or padding == 0:
        mode = "zeros"
    size = tuple(max(k * dilation + 3, 6) for k in kernel)
    kwargs = dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                  dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    return kind, kwargs, (cin, *size)


def build(kind: str, kwargs: dict) -> nn.Module:
    cls = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
    return cls(**kwargs).double()


def expected_params(layer: nn.Module, depth: int, width: float) -> int:
    out = layer.weight.shape[0]
    fan = math.prod(layer.weight.shape[1:])
    rows = kflo_width(out, width)
    bias = layer.bias.numel() if layer.bias is not None else 0
    return rows * fan + (depth - 2) * rows * rows + out * rows + bias


@given(cfg=layer_configs(), depth=st.sampled_from([2, 3, 4]), width=st.floats(0.5, 4.0), seed=st.integers(0, 100))
def test_kflo_layer_start_collapse_and_count(cfg, depth, width, seed):
    kind, kwargs, in_shape = cfg
    torch.manual_seed(seed)
    layer = build(kind, kwargs)
    x = torch.randn((3, *in_shape), dtype=torch.float64)
    y0 = layer(x)
    model = nn.Sequential(layer)
    kflo.expand(model, f"kflo:depth={depth},width={width}", seed=seed)
    expanded = model[0]
    assert "weight" not in dict(expanded.named_parameters())
    assert sum(p.numel() for p in expanded.parameters()) == expected_params(build(kind, kwargs), depth, width)

    param = expanded.parametrizations.weight[0]
    rows = kflo_width(kwargs.get("out_channels", kwargs.get("out_features")), width)
    exact = rows >= min(param.cascade[-1].shape[0], param.w1.shape[1])
    if exact:
        assert param.exact_start
        assert rel_err(y0, expanded(x)) < TOL64
    # The rank-limited start is the best rank-R approximation: never worse than dropping the layer.
    else:
        assert (expanded.weight - layer_weight_of(kind, kwargs, seed)).norm() <= layer_weight_of(kind, kwargs, seed).norm()

    perturb(model, scale=0.2, seed=seed)
    plain = kflo.collapse(model)
    assert type(plain[0]) is type(build(kind, kwargs))
    assert set(plain.state_dict()) == set(nn.Sequential(build(kind, kwargs)).state_dict())
    assert rel_err(model(x), plain(x)) < TOL64


def layer_weight_of(kind, kwargs, seed):
    torch.manual_seed(seed)
    return build(kind, kwargs).weight.detach()


def test_kflo_init_layout_for_wide_cascade():
    layer = nn.Conv2d(4, 3, 3)
    p = KfloParametrization(layer.weight.shape, depth=3, width=2.0)
    p.right_inverse(layer.weight.detach())
    assert p.w1.shape == (6, 36)
    assert torch.equal(p.w1[:3], layer.weight.detach().reshape(3, 36))
    assert torch.equal(p.cascade[0], torch.eye(6))
    assert torch.equal(p.cascade[1], torch.cat([torch.eye(3), torch.zeros(3, 3)], 1))
    assert p.w1[3:].abs().sum() > 0, "extra W_1 rows must be random, not zero (zero rows and columns never train)"


@pytest.mark.parametrize("width,rows", [(0.5, 2), (1.5, 5), (2.5, 8), (1.0, 3)])
def test_width_rounds_half_up(width, rows):
    assert kflo_width(3, width) == rows
    assert kflo_width(1, 0.01) == 1


@pytest.mark.parametrize("spec,fragment", [
    ("kflo:depth=1", "depth=1 is out of range; use an integer from 2 to 16"),
    ("kflo:depth=2.5", "not a valid int"),
    ("kflo:width=0", "width=0 is out of range; use a number > 0 and at most 64"),
    ("kflo:width=-1", "width=-1 is out of range; use a number > 0 and at most 64"),
    ("kflo:width=nan", "width=nan is not a finite number"),
    ("kflo:width=abc", "not a valid float"),
    ("kflo:depht=2", "has no parameter depht"),
    ("kflo:depth", "is not key=value"),
    ("kfloo", "did you mean: kflo"),
])
def test_bad_specs_are_refused(spec, fragment):
    with pytest.raises(KfloError, match=fragment):
        kflo.create_recipe(spec)


def test_roles_and_penalty_follow_the_paper():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    kflo.expand(model, "kflo:depth=3,width=2")
    roles = kflo.param_roles(model)
    # W_1 itself is not decayed: its role puts the run's decay on the composed kernel W' (a loss term)
    assert roles["0.parametrizations.weight.0.w1"].decay_target == "composed"
    assert roles["0.parametrizations.weight.0.w1"].weight_decay == "default"
    assert roles["0.parametrizations.weight.0.cascade.0"].weight_decay == 1e-9
    assert roles["0.parametrizations.weight.0.cascade.0"].decay_target == "parameter"
    assert roles["0.parametrizations.weight.0.cascade.1"].kind == "kflo-cascade"
    assert roles["0.bias"].kind == "ordinary"
    wd = 5e-4
    penalty = kflo.decay_penalty(model, wd)
    expected = 0.5 * wd * (model[0].weight.pow(2).sum() + model[2].weight.pow(2).sum())
    assert torch.allclose(penalty, expected)
    # Its gradient with respect to a composed kernel is wd * W', as SGD's weight_decay on a plain weight.
    w = model[0].weight.detach().requires_grad_(True)
    (0.5 * wd * w.pow(2).sum()).backward()
    assert torch.allclose(w.grad, wd * w.detach())


@pytest.mark.parametrize("cls_name", ["Conv2dSame", "StdConv2d", "ScaledStdConv2d", "ScaledStdConv2dSame", "StdConv2dSame"])
def test_timm_weight_reading_subclasses(cls_name):
    import timm.layers as tl

    cls = getattr(tl, cls_name)
    torch.manual_seed(0)
    layer = cls(3, 5, 3, stride=2).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    y0 = layer(x)
    model = nn.Sequential(layer)
    kflo.expand(model, "kflo")
    assert rel_err(y0, model(x)) < TOL64
    perturb(model, 0.2)
    plain = kflo.collapse(model)
    assert type(plain[0]) is cls
    assert rel_err(model(x), plain(x)) < TOL64


def test_gradients_flow_to_all_factors():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    kflo.expand(model, "kflo:depth=3,width=2")
    model(torch.randn(2, 2, 6, 6)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_expand_twice_and_collapse_plain_are_refused():
    model = kflo.expand(nn.Sequential(nn.Linear(3, 3)), "kflo")
    with pytest.raises(KfloError, match="already expanded"):
        kflo.expand(model, "kflo")
    with pytest.raises(KfloError, match="already plain"):
        kflo.collapse(nn.Sequential(nn.Linear(3, 3)))


def test_collapse_leaves_the_expanded_model_working():
    model = kflo.expand(nn.Sequential(nn.Conv2d(2, 3, 3)), "kflo")
    x = torch.randn(1, 2, 5, 5)
    y = model(x)
    kflo.collapse(model)
    kflo.collapse(model)
    assert torch.equal(model(x), y)


def test_collapse_dtype_and_float64_composition():
    torch.manual_seed(0)
    model = kflo.expand(nn.Sequential(nn.Linear(64, 64)), "kflo:depth=4,width=4")
    perturb(model, 0.5)
    p64 = kflo.collapse(model, dtype=torch.float64)
    p32 = kflo.collapse(model)
    assert p64[0].weight.dtype == torch.float64 and p32[0].weight.dtype == torch.float32
    param = model[0].parametrizations.weight[0]
    exact = torch.linalg.multi_dot([m.double() for m in reversed(param.cascade)] + [param.w1.double()])
    assert torch.equal(p64[0].weight.detach(), exact)
    assert torch.equal(p32[0].weight.detach(), exact.float())


def test_modules_that_read_weight_attributes_directly():
    """nn.MultiheadAttention reads out_proj.weight itself; the composed weight must be what it sees."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    model.eval()
    y0 = model(x)
    kflo.expand(model, "kflo:depth=2,width=2")
    assert {r.name for r in kflo.record(model).plan if r.applied} == {"self_attn.out_proj", "linear1", "linear2"}
    assert rel_err(y0, model(x)) < TOL64
    perturb(model, 0.2)
    plain = kflo.collapse(model)
    assert rel_err(model(x), plain(x)) < TOL64
    with torch.no_grad():  # the fused inference fast path reads the weights too
        assert rel_err(model(x), plain(x)) < TOL64


def test_shared_weights_are_skipped_with_a_reason():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 3))
    model[2].weight = shared.weight
    plan = {r.name: r for r in kflo.plan(model, "kflo")}
    assert not plan["0"].applied and "shared" in plan["0"].reason
    assert not plan["2"].applied
    assert plan["3"].applied


def test_two_recipes_with_the_same_name_on_disjoint_layers(tmp_path):
    model = kflo.create_model("lenet5")
    specs = [{"name": "kflo", "width": 2, "include": ["features.*"]}, {"name": "kflo", "width": 1, "include": ["classifier.*"]}]
    kflo.expand(model, specs)
    widths = {n: m.parametrizations.weight[0].w1.shape[0] / m.parametrizations.weight[0].cascade[-1].shape[0]
              for n, m, _ in kflo.rewritten_layers(model)}
    assert all(w == 2 for n, w in widths.items() if n.startswith("features"))
    assert all(w == 1 for n, w in widths.items() if n.startswith("classifier"))
    perturb(model, 0.1)
    kflo.save(model, tmp_path / "two.safetensors")
    again = kflo.load(tmp_path / "two.safetensors")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), model.eval()(x))
