"""Weight compander, Powerpropagation and weight normalization: exact start and collapse, the compander's refusal,
learnable (a, b) sharing, weight-decay roles and the modified adaptive step's scales, zoo and CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import kflo_cli as kflo
from kflo_cli.errors import KfloError
from kflo_cli.reparam.compander import COMPANDERS, MIN_SLOPE_RATIO, CompanderParametrization, smallest_workable_a

from conftest import perturb, rel_err, slow_cases
from recipe_checks import cli_roundtrip, conv_configs, layer_roundtrip, zoo_roundtrip

TOL64 = 1e-10
V = "parametrizations.weight.0.v"


@st.composite
def filter_layers(draw):
    """A random Linear or Conv1d/2d/3d (float64) and an input for it."""
    if draw(st.booleans()):
        fin, fout = draw(st.integers(1, 10)), draw(st.integers(1, 10))
        return nn.Linear(fin, fout, bias=draw(st.booleans())).double(), (fin,)
    cls, kwargs, in_shape = draw(conv_configs())
    return cls(**kwargs).double(), in_shape


PSI = {"arctan": torch.atan, "arsinh": torch.asinh, "erf": torch.erf}


@given(layer_input=filter_layers(), fn=st.sampled_from(list(COMPANDERS)), learnable=st.sampled_from(["none", "fine", "coarse"]),
       a=st.sampled_from([0.5, 0.7, 1.0, 1.5]), b=st.sampled_from([0.5, 0.6, 1.0, 2.0]), seed=st.integers(0, 50))
def test_compander_layer(layer_input, fn, learnable, a, b, seed):
    torch.manual_seed(seed)
    layer, in_shape = layer_input
    with torch.no_grad():  # weights of every size, some beyond what small a can represent
        layer.weight.mul_(2.0)
    x = torch.randn((2, *in_shape), dtype=torch.float64)
    spec = f"compander:a={a},b={b},fn={fn},learnable={learnable}"
    largest = layer.weight.detach().abs().max().item()
    if largest / a > COMPANDERS[fn].max_ratio:
        workable = smallest_workable_a(largest, fn)
        with pytest.raises(KfloError, match=rf"layer '0' has weights up to .* use a >= {workable:g} for this layer: --recipe "
                                            rf"compander:a={workable:g}.* or --recipe compander:a=auto.* \(an a per layer\), "
                                            r"or --exclude '0'"):
            kflo.expand(nn.Sequential(layer), spec)
        a = workable
        spec = f"compander:a={a},b={b},fn={fn},learnable={learnable}"
    numel = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    wrapper = layer_roundtrip(layer, spec, x, tol=1e-9, seed=seed)
    expanded = wrapper[0]
    inner = expanded.parametrizations.weight[0]
    assert sum(p.numel() for p in expanded.parameters()) == numel + (2 if learnable != "none" else 0)
    # The effective weight is a * f(v / b), with the recipe's a and b (learned ones start there).
    a_, b_ = (p.item() if isinstance(p, torch.Tensor) else p for p in (inner.a, inner.b))
    assert torch.allclose(expanded.weight, a_ * PSI[fn](inner.v / b_), rtol=0, atol=1e-12)
    # Psi'(v) is the derivative autograd sees.
    v = inner.v.detach().clone().requires_grad_(True)
    (a_ * PSI[fn](v / b_)).sum().backward()
    assert torch.allclose(kflo.step_scales(wrapper)[f"0.{V}"], v.grad, rtol=1e-9, atol=1e-15)


def test_refusal_uses_the_slope_criterion_and_the_smallest_a_works():
    for fn, comp in COMPANDERS.items():
        t = comp.inverse(torch.tensor(comp.max_ratio, dtype=torch.float64))
        ratio = comp.slope(t) / comp.slope(torch.zeros((), dtype=torch.float64))
        assert math.isclose(ratio.item(), MIN_SLOPE_RATIO, rel_tol=1e-9), fn
    assert math.isclose(COMPANDERS["arctan"].max_ratio, 1.5391683, rel_tol=1e-6)  # 0.98 * pi/2
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(0.1)
        layer.weight[1, 2] = -1.2
    with pytest.raises(KfloError, match=r"compander: layer 'fc' has weights up to \|w\| = 1.2, beyond what arctan "
                                        r"with a=0.5 represents .* use a >= 0.78 for this layer: --recipe compander:a=0.78 "
                                        r"or --recipe compander:a=auto \(an a per layer\), or --exclude 'fc'"):
        kflo.expand(nn.ModuleDict({"fc": layer}), "compander:a=0.5")
    kflo.expand(nn.ModuleDict({"fc": layer}), "compander:a=0.78")
    two = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        two[0].weight.fill_(1.0)
        two[1].weight.fill_(3.0)
    with pytest.raises(KfloError, match=r"layer '0' .* use a >= 0.65 for this layer and a >= 1.95 for every layer "
                                        r"\(the largest weight is in '1'\): --recipe compander:a=1.95 or --recipe "
                                        r"compander:a=auto \(an a per layer\), or --exclude '0'"):
        kflo.expand(two, "compander:a=0.5")


def test_only_conv_and_linear_weights_are_rewritten():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))
    kflo.expand(model, "compander")
    assert [r.name for r in kflo.record(model).plan if r.applied] == ["0", "4"]
    assert {r.name for r in kflo.record(model).plan} == {"0", "4"}
    names = dict(model.named_parameters())
    assert "0.bias" in names and "4.bias" in names and "1.weight" in names and "3.weight" in names


def test_fixed_compander_decays_psi_of_v_not_v():
    torch.manual_seed(0)
    model = kflo.expand(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "compander:a=1.0,b=0.6")
    roles = kflo.param_roles(model)
    # v itself is not decayed: its role puts the run's decay on the weight Psi(v) (a loss term)
    assert roles[f"0.{V}"].decay_target == "composed" and roles[f"0.{V}"].kind == "compander-v"
    assert roles["0.bias"].weight_decay == "default"
    wd = 1e-2
    penalty = kflo.decay_penalty(model, wd)
    assert torch.allclose(penalty, 0.5 * wd * (model[0].weight.pow(2).sum() + model[1].weight.pow(2).sum()))
    penalty.backward()
    inner = model[0].parametrizations.weight[0]
    # d/dv (wd/2 ||Psi(v)||^2) = wd * Psi(v) * Psi'(v): SGD's weight decay on w, carried to v by the chain rule.
    assert torch.allclose(inner.v.grad, wd * model[0].weight.detach() * inner.slope())


@pytest.mark.parametrize("mode", ["fine", "coarse"])
def test_learnable_compander_roles(mode):
    model = kflo.expand(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), f"compander:learnable={mode},a=0.5,b=1.0")
    roles = kflo.param_roles(model)
    assert roles[f"0.{V}"].weight_decay == "default" and roles[f"0.{V}"].decay_target == "parameter"
    assert roles["0.parametrizations.weight.0.a"] == kflo.ParamRole("compander-a", "none")
    assert roles["0.parametrizations.weight.0.b"] == kflo.ParamRole("compander-b", "none")
    assert kflo.decay_penalty(model, 1e-2).item() == 0.0
    a_names = [n for n, _ in model.named_parameters() if n.endswith(".a")]
    assert len(a_names) == (2 if mode == "fine" else 1)


def test_coarse_pair_is_shared_saved_and_rebuilt(tmp_path):
    torch.manual_seed(0)
    model = kflo.create_model("lenet5")
    kflo.expand(model, "compander:learnable=coarse,a=0.9,b=0.7")
    inners = [m.parametrizations.weight[0] for _, m, _ in kflo.rewritten_layers(model)]
    assert len(inners) == 5 and all(i.a is inners[0].a and i.b is inners[0].b for i in inners)
    assert sum(p.numel() for p in model.parameters()) == 61706 + 2
    with torch.no_grad():
        inners[0].a.fill_(1.3)  # one learned pair moves every layer
        inners[0].b.fill_(0.4)
    perturb(model, 0.1)
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "coarse.safetensors"
    kflo.save(model, path)
    again = kflo.load(path)
    again_inners = [m.parametrizations.weight[0] for _, m, _ in kflo.rewritten_layers(again)]
    assert all(i.a is again_inners[0].a for i in again_inners) and again_inners[-1].a.item() == inners[0].a.item()
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    plain = kflo.collapse(model)
    assert set(plain.state_dict()) == set(kflo.create_model("lenet5").state_dict())
    assert rel_err(model(x), plain(x)) < 1e-5
    # Gradients reach the shared pair from every layer.
    model.train()
    model(x).pow(2).sum().backward()
    assert inners[0].a.grad is not None and inners[0].a.grad.abs() > 0


def test_step_scales_turn_v_grad_into_the_gradient_of_the_weight():
    """The documented contract: v.grad / step_scale == dL/dw, the input of the modified adaptive step."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    plain = nn.Linear(5, 3).double()
    model = kflo.expand(nn.Sequential(layer), "compander:fn=erf,a=0.8,b=0.9")
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    x = torch.randn(7, 5, dtype=torch.float64)
    model(x).sin().sum().backward()
    plain(x).sin().sum().backward()
    scale = kflo.step_scales(model)[f"0.{V}"]
    assert torch.allclose(layer.parametrizations.weight[0].v.grad / scale, plain.weight.grad, rtol=1e-10)


# -- Powerpropagation -------------------------------------------------------------------------------------------

@given(layer_input=filter_layers(), alpha=st.sampled_from([1.0, 1.5, 2.0, 3.0]), seed=st.integers(0, 50))
def test_powerprop_layer(layer_input, alpha, seed):
    torch.manual_seed(seed)
    layer, in_shape = layer_input
    numel = sum(p.numel() for p in layer.parameters())
    x = torch.randn((2, *in_shape), dtype=torch.float64)
    wrapper = layer_roundtrip(layer, f"powerprop:alpha={alpha}", x, tol=1e-9, seed=seed)
    expanded = wrapper[0]
    inner = expanded.parametrizations.weight[0]
    assert sum(p.numel() for p in expanded.parameters()) == numel
    v = inner.v.detach()
    assert torch.allclose(expanded.weight, v * v.abs().pow(alpha - 1), atol=1e-14)
    scale = kflo.step_scales(wrapper)[f"0.{V}"]
    assert torch.allclose(scale, alpha * v.abs().pow(alpha - 1))


def test_powerprop_zero_weights_have_finite_gradients_and_roles():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0].zero_()
    model = kflo.expand(nn.Sequential(layer), "powerprop:alpha=1.5")
    model(torch.randn(4, 3)).sum().backward()
    grad = layer.parametrizations.weight[0].v.grad
    assert torch.isfinite(grad).all() and torch.all(grad[0] == 0)
    assert kflo.param_roles(model)[f"0.{V}"] == kflo.ParamRole("powerprop-v", "default", decay_target="composed")
    assert torch.allclose(kflo.decay_penalty(model, 0.1), 0.05 * layer.weight.pow(2).sum())
    with pytest.raises(KfloError, match="alpha=0.5 is out of range; use a number from 1 to 16"):
        kflo.create_recipe("powerprop:alpha=0.5")


# -- weight normalization ---------------------------------------------------------------------------------------

@given(layer_input=filter_layers(), seed=st.integers(0, 50))
def test_weightnorm_layer(layer_input, seed):
    torch.manual_seed(seed)
    layer, in_shape = layer_input
    numel = sum(p.numel() for p in layer.parameters())
    out = layer.weight.shape[0]
    x = torch.randn((2, *in_shape), dtype=torch.float64)
    wrapper = layer_roundtrip(layer, "weightnorm", x, tol=1e-9, seed=seed)
    expanded = wrapper[0]
    inner = expanded.parametrizations.weight[0]
    assert sum(p.numel() for p in expanded.parameters()) == numel + out
    rows = expanded.weight.detach().reshape(out, -1)
    assert torch.allclose(rows.norm(dim=1), inner.g.detach().reshape(out).abs(), rtol=1e-10)
    assert kflo.step_scales(wrapper) == {}


def test_weightnorm_zero_rows_stay_zero_and_trainable():
    layer = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        layer.weight[1].zero_()
    x = torch.randn(2, 2, 5, 5)
    y0 = layer(x)
    model = kflo.expand(nn.Sequential(layer), "weightnorm")
    assert torch.equal(layer.weight[1], torch.zeros_like(layer.weight[1])) and rel_err(y0, model(x)) < 1e-6
    model(x).pow(2).sum().backward()
    inner = layer.parametrizations.weight[0]
    assert torch.isfinite(inner.v.grad).all() and inner.g.grad[1].abs().sum() > 0
    roles = kflo.param_roles(model)
    assert roles["0.parametrizations.weight.0.g"].decay_target == "composed"
    assert torch.allclose(kflo.decay_penalty(model, 0.1), 0.05 * inner.g.pow(2).sum())


def test_timm_weight_reading_subclasses():
    import timm.layers as tl

    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for spec in ("compander", "powerprop", "weightnorm"):
        for cls in (tl.Conv2dSame, tl.StdConv2d):
            layer_roundtrip(cls(3, 4, 3, stride=2).double(), spec, x, tol=1e-9)


ZOO = [
    ("timm:resnet18", {"num_classes": 5}, (3, 32, 32), "compander"),
    ("timm:convnext_atto", {"num_classes": 5}, (3, 32, 32), "compander:learnable=coarse"),
    ("timm:test_efficientnet", {"num_classes": 5}, (3, 32, 32), "compander:learnable=fine,a=1.5,b=1.0"),
    ("timm:test_convnext", {"num_classes": 5}, (3, 32, 32), "compander:learnable=fine,a=0.7,b=1.0,fn=erf"),
    ("timm:test_vit", {"num_classes": 5}, None, "compander:fn=arsinh"),
    ("torchvision:mobilenet_v3_small", {"num_classes": 5}, (3, 32, 32), "powerprop:alpha=2"),
    ("timm:test_resnet", {"num_classes": 5}, (3, 32, 32), "weightnorm"),
    ("torchvision:squeezenet1_1", {"num_classes": 5}, (3, 64, 64), "weightnorm"),
]


@pytest.mark.parametrize("model_id,kwargs,size,spec",
                         slow_cases(ZOO, [f"{z[0]}-{z[3]}" for z in ZOO], {"timm:resnet18-compander"}))
def test_zoo(model_id, kwargs, size, spec, tmp_path):
    if size is None:
        size = kflo.default_input_size(kflo.create_model(model_id, **kwargs))
    zoo_roundtrip(model_id, kwargs, size, spec, tmp_path)


def test_fresh_efficientnet_needs_a_larger_a_and_the_suggested_one_works():
    """EfficientNet's fan-out initialisation gives its squeeze-excite 1x1 convs weights near 2 > pi/2."""
    torch.manual_seed(0)
    model = kflo.create_model("timm:test_efficientnet", num_classes=5)
    largest, name = max((m.weight.abs().max().item(), n) for n, m in model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear)))
    workable = smallest_workable_a(largest, "arctan")
    with pytest.raises(KfloError, match=r"compander: layer '.*' has weights up to") as refused:
        kflo.expand(model, "compander")
    # The message names what works for the whole model, so one retry suffices.
    assert f"a >= {workable:g}" in str(refused.value) and f"'{name}'" in str(refused.value)
    kflo.expand(model, f"compander:a={workable}")


def test_rebuilding_a_checkpoint_skips_the_refusal(tmp_path):
    """Loading re-runs expand on a fresh model whose random weights are placeholders: they must not be refused.

    Here the trained weights fit a = 1 but the architecture's fresh initialisation does not.
    """
    torch.manual_seed(0)
    model = kflo.create_model("timm:test_efficientnet", num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    kflo.expand(model, "compander")
    perturb(model, 0.05)
    path = tmp_path / "c.safetensors"
    kflo.save(model, path)
    layers = [r.name for r in kflo.record(model).plan if r.applied]
    fresh = kflo.create_model("timm:test_efficientnet", num_classes=5)
    spec = {"name": "compander", **kflo.create_recipe("compander").values, "include": layers}
    with pytest.raises(KfloError, match="beyond what arctan with a=1 represents"):
        kflo.expand(fresh, spec)
    fresh = kflo.create_model("timm:test_efficientnet", num_classes=5)
    kflo.expand(fresh, spec, rebuilding=True)  # what checkpoint loading does
    fresh.load_state_dict(load_file(str(path)), strict=True)
    loaded = kflo.load(path)  # and the public loader itself
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    inner = CompanderParametrization((2,), "arctan", 1.0, 0.6)
    with pytest.raises(KfloError, match="use a >= 1.3"):
        inner.right_inverse(torch.tensor([2.0, 0.1]))


@pytest.mark.parametrize("recipe_file", ["compander", "compander-learnable-fine", "powerprop", "weightnorm"])
def test_cli_recipe_files(recipe_file, tmp_path):
    cli_roundtrip("lenet5", ["--recipe-file", recipe_file], tmp_path, "1,28,28")


@pytest.mark.parametrize("fn", ["arctan", "arsinh", "erf"])
@pytest.mark.parametrize("a", [1.0, "auto"])
def test_fixed_compander_backward_is_the_derivative(fn, a):
    """Fixed a and b run through a custom autograd function that saves only v (less memory): its gradient is
    checked against finite differences and against autograd through a * f(v / b), in float64."""
    from kflo_cli.reparam.compander import COMPANDERS, CompanderParametrization

    torch.manual_seed(0)
    scale = torch.tensor(1.7, dtype=torch.float64) if a == "auto" else a  # a=auto gives each layer a buffer
    p = CompanderParametrization(torch.Size([4, 3, 3, 3]), fn, scale, 0.6).double()
    with torch.no_grad():
        p.v.copy_(0.3 * torch.randn_like(p.v))
    assert torch.autograd.gradcheck(lambda v: type(p).forward(_with_v(p, v)), (p.v.detach().clone().requires_grad_(),))
    v = p.v.detach().clone().requires_grad_()
    want = torch.autograd.grad((scale * COMPANDERS[fn].f(v / 0.6)).pow(2).sum(), v)[0]
    got = torch.autograd.grad(p().pow(2).sum(), p.v)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _with_v(p, v):
    """``p`` seen with ``v`` in place of its parameter (for gradcheck's perturbed inputs)."""
    class View:
        learnable, fn, a, b = p.learnable, p.fn, p.a, p.b
    view = View()
    view.v = v
    return view
