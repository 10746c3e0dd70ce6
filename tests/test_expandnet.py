"""ExpandNet CL/CK/FC: exact collapse, feature/kernel agreement, parameter counts, SmallNet anchors, recipe
combinations, the nonlinear counterpart (+Init), zoo models and the CLI."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.reparam.expandnet_chain import chain_width, compose

from conftest import move_bn_stats, perturb, rel_err, slow_cases
from recipe_checks import CONV, cli_roundtrip, paddings, zoo_roundtrip

TOL64 = 1e-10  # float64: composing, chaining and collapsing only reorder float64 sums


def width(rate: float, channels: int, groups: int) -> int:
    """The documented rule, written independently: round half up per group, at least 1 per group."""
    return groups * max(1, math.floor(rate * channels / groups + 0.5))


def expected_params(widths: list[int], kernels: list[tuple[int, ...]], groups: int, bias: bool) -> int:
    return sum(widths[i + 1] * (widths[i] // groups) * math.prod(k) + (widths[i + 1] if bias else 0)
               for i, k in enumerate(kernels))


@st.composite
def layer_configs(draw, recipe: str):
    """``(layer kwargs, input shape, rate, spec tail, expected widths, expected link kernels, groups)`` for a random
    layer of ``recipe``: groups, depthwise, stride, dilation, padding (int, "same", "valid"), every padding mode."""
    rate = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 4.0]))
    bias = draw(st.booleans())
    if recipe == "fc":
        m, n, links = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(2, 4))
        widths = [m, width(rate, m, 1)] + [width(rate, n, 1)] * (links - 2) + [n]
        tail = f"classifier=expand,layers={links}"
        return dict(in_features=m, out_features=n, bias=bias), (3, m), rate, tail, widths, [()] * links, 1
    d = draw(st.sampled_from([1, 2, 2, 3]))
    if recipe == "cl":
        kernel = tuple(draw(st.integers(1, 3 if d == 3 else 4)) for _ in range(d))
        if math.prod(kernel) == 1:
            kernel = (2,) + kernel[1:]
    else:
        kernel = tuple(draw(st.sampled_from([1, 3, 5] if d == 3 else [1, 3, 5, 7])) for _ in range(d))
        if max(kernel) <= 3:
            kernel = (5,) + kernel[1:]
    groups = draw(st.sampled_from([1, 1, 2, "depthwise"]))
    if groups == "depthwise":
        cin = draw(st.integers(1, 4))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
    stride, padding, mode = draw(paddings(d, stride))
    stem = draw(st.sampled_from(["keep", "expand"]))
    first = cin if (stem == "keep" and cin == 3) else width(rate, cin, groups)
    inner = width(rate, cout, groups)
    ones = (1,) * d
    if recipe == "cl":
        widths, kernels = [cin, first, inner, cout], [ones, kernel, ones]
    else:
        count = (max(kernel) - 1) // 2
        widths = [cin, first] + [inner] * (count - 2) + [cout]
        kernels = [tuple(3 if i < (k - 1) // 2 else 1 for k in kernel) for i in range(count)]
    size = tuple(k * dd + 3 for k, dd in zip(kernel, dilation))
    kwargs = dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                  dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    return kwargs, (cin, *size), rate, f"stem={stem}", widths, kernels, groups


def build(recipe: str, kwargs: dict) -> nn.Module:
    if recipe == "fc":
        return nn.Linear(**kwargs).double()
    return CONV[len(kwargs["kernel_size"])](**kwargs).double()


def spec_for(recipe: str, rate: float, tail: str, mode: str) -> str:
    return f"expandnet-{recipe}:rate={rate},mode={mode},{tail}"


def check_layer(recipe: str, cfg: tuple, seed: int) -> None:
    kwargs, in_shape, rate, tail, widths, kernels, groups = cfg
    torch.manual_seed(seed)
    layer = build(recipe, kwargs)
    x = torch.randn((2, *in_shape), dtype=torch.float64)
    y0 = layer(x)
    models = {}
    for mode in ("kernel", "feature"):
        model = nn.Sequential(copy.deepcopy(layer))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an inexact start is reported by a warning, checked elsewhere
            kflo.expand(model, spec_for(recipe, rate, tail, mode), seed=seed)
        chain = model[0].parametrizations.weight[0]
        assert chain.widths == widths and chain.kernels == kernels
        assert kflo.record(model).plan[0].params_after == expected_params(widths, kernels, groups, kwargs["bias"])
        assert sum(p.numel() for p in model.parameters()) == kflo.record(model).plan[0].params_after
        assert "weight" not in dict(model[0].named_parameters()), "the original weight must not be kept"
        if chain.exact_start:
            assert rel_err(y0, model(x)) < TOL64
        models[mode] = model
    kernel, feature = models["kernel"], models["feature"]
    assert list(kernel.state_dict()) == list(feature.state_dict()), "both forms must store the same keys"
    perturb(kernel, 0.3, seed=seed)
    feature.load_state_dict(kernel.state_dict(), strict=True)
    # Same factor values: same outputs and the same gradients in both forms (and for the input).
    grads = {}
    for mode, model in models.items():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        (out * probe).sum().backward()
        grads[mode] = (out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()})
    (yk, gk, pk), (yf, gf, pf) = grads["kernel"], grads["feature"]
    assert rel_err(yk, yf) < TOL64 and rel_err(gk, gf) < TOL64
    scale = max(g.abs().max().item() for g in pk.values())
    assert all((pk[n] - pf[n]).abs().max() <= TOL64 * scale for n in pk), "factor gradients differ between the forms"
    assert all(pk[n].abs().sum() > 0 for n in pk if n.endswith("weight")), "every factor must receive a gradient"
    # Collapse: the original class and keys, the same plain layer from either form, equal outputs.
    plain = {mode: kflo.collapse(model) for mode, model in models.items()}
    assert type(plain["kernel"][0]) is type(layer) and type(plain["feature"][0]) is type(layer)
    assert list(plain["kernel"].state_dict()) == ["0." + k for k in layer.state_dict()]
    for k, v in plain["kernel"].state_dict().items():
        assert torch.allclose(v, plain["feature"].state_dict()[k], rtol=0, atol=1e-12)
    assert rel_err(yk, plain["kernel"](x)) < TOL64
    reference = copy.deepcopy(layer)
    reference.load_state_dict({k[2:]: v for k, v in plain["feature"].state_dict().items()}, strict=True)
    assert rel_err(yf, reference(x)) < TOL64


@pytest.mark.slow
@given(cfg=layer_configs("cl"), seed=st.integers(0, 50))
def test_cl_collapse_forms_agree_and_counts(cfg, seed):
    check_layer("cl", cfg, seed)


@given(cfg=layer_configs("ck"), seed=st.integers(0, 50))
def test_ck_collapse_forms_agree_and_counts(cfg, seed):
    check_layer("ck", cfg, seed)


@given(cfg=layer_configs("fc"), seed=st.integers(0, 50))
def test_fc_collapse_forms_agree_and_counts(cfg, seed):
    check_layer("fc", cfg, seed)


def test_widths_round_half_up_at_least_one_and_a_multiple_of_the_groups():
    assert chain_width(2.5, 1, 1) == 3 and chain_width(0.5, 5, 1) == 3  # 2.5 -> 3, not banker's 2
    assert chain_width(0.1, 4, 2) == 2 and chain_width(0.01, 1, 1) == 1
    assert chain_width(1.5, 6, 3) == 9 and chain_width(4, 32, 32) == 128


def test_compose_is_the_chain_of_convolutions():
    torch.manual_seed(0)
    a, b = torch.randn(6, 2, 3, 2, dtype=torch.float64), torch.randn(4, 3, 2, 3, dtype=torch.float64)
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    chained = F.conv2d(F.conv2d(x, a, groups=2), b, groups=2)
    assert rel_err(chained, F.conv2d(x, compose(a, b, 2), groups=2)) < TOL64


@pytest.mark.parametrize("kernel,links", [((1, 7), [(1, 3)] * 3), ((7, 1), [(3, 1)] * 3),
                                          ((5, 7), [(3, 3), (3, 3), (1, 3)]), ((9, 9), [(3, 3)] * 4)])
def test_ck_non_square_kernels_decompose_per_dimension(kernel, links):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 5, kernel, padding=(kernel[0] // 2, kernel[1] // 2), stride=2).double()
    model = kflo.expand(nn.Sequential(layer), "expandnet-ck:init=random")
    chain = model[0].parametrizations.weight[0]
    assert chain.kernels == links and chain.strides[-1] == (2, 2) and set(chain.strides[:-1]) <= {(1, 1)}
    x = torch.randn(2, 4, 13, 12, dtype=torch.float64)
    assert rel_err(model(x), kflo.collapse(model)(x)) < TOL64


def test_skip_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, (4, 5)), nn.Conv2d(4, 4, 1),
                          nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2))
    ck = {r.name: r for r in kflo.plan(model, "expandnet-ck")}
    assert ck["0"].applied and "larger than 3" in ck["1"].reason and "even size 4" in ck["2"].reason
    assert "larger than 3" in ck["3"].reason and "5" not in ck
    cl = {r.name: r for r in kflo.plan(model, "expandnet-cl")}
    assert cl["0"].applied and cl["1"].applied and cl["2"].applied and "1-tap" in cl["3"].reason
    fc = {r.name: r for r in kflo.plan(model, "expandnet-fc")}
    assert fc["5"].applied and "classifier" in fc["6"].reason and "0" not in fc
    assert {r.name for r in kflo.plan(model, "expandnet-fc:classifier=expand") if r.applied} == {"5", "6"}
    # A model whose only Linear layer is its classifier: auto expands it (the FC recipe has nothing else).
    assert [r.applied for r in kflo.plan(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "expandnet-fc")] == [True]
    with pytest.raises(KfloError, match="matches no layer"):
        kflo.plan(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "expandnet-fc:classifier=keep")


@pytest.mark.parametrize("mode", ["kernel", "feature"])
def test_timm_conv2d_same_in_both_forms(mode):
    import timm.layers as tl

    torch.manual_seed(0)
    layer = tl.Conv2dSame(3, 6, 5, stride=2, dilation=2).double()
    x = torch.randn(2, 3, 15, 14, dtype=torch.float64)
    y0 = layer(x)
    for recipe in ("cl", "ck"):
        model = kflo.expand(nn.Sequential(copy.deepcopy(layer)), f"expandnet-{recipe}:mode={mode},stem=expand")
        assert rel_err(y0, model(x)) < TOL64
        perturb(model, 0.3)
        plain = kflo.collapse(model)
        assert type(plain[0]) is tl.Conv2dSame and rel_err(model(x), plain(x)) < TOL64


def test_weight_transforming_subclasses_run_in_kernel_form_only():
    import timm.layers as tl

    torch.manual_seed(0)
    model = nn.Sequential(tl.StdConv2d(4, 6, 3), nn.Conv2d(6, 6, 3)).double()
    rows = kflo.plan(model, "expandnet-cl:mode=feature")
    assert not rows[0].applied and "mode=kernel" in rows[0].reason and rows[1].applied
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    y0 = model(x)
    kflo.expand(model, "expandnet-cl")
    assert all(r.applied for r in kflo.record(model).plan)
    assert rel_err(y0, model(x)) < TOL64
    perturb(model, 0.3)
    assert rel_err(model(x), kflo.collapse(model)(x)) < TOL64


def test_init_random_is_the_papers_and_inexact_preserve_warns():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 7, padding=3)
    x = torch.randn(1, 3, 12, 12)
    random = kflo.expand(nn.Sequential(copy.deepcopy(layer)), "expandnet-cl:init=random", seed=0)
    assert rel_err(layer(x), random(x)) > 1e-2
    first = random[0].parametrizations.weight[0].factors[0].weight
    bound = 1 / math.sqrt(first[0].numel())  # PyTorch's default init of a fresh 1x1 conv: kaiming_uniform(a=sqrt 5)
    assert first.abs().max() <= bound and first.std() > bound / 3
    # The official RGB-stem width (3 -> 3 -> ...) cannot carry an arbitrary 7x7 kernel through chained 3x3s.
    with pytest.warns(UserWarning, match="no exact function-preserving factorisation"):
        kept = kflo.expand(nn.Sequential(copy.deepcopy(layer)), "expandnet-ck")
    assert not kept[0].parametrizations.weight[0].exact_start
    expanded = kflo.expand(nn.Sequential(copy.deepcopy(layer)), "expandnet-ck:stem=expand")
    assert expanded[0].parametrizations.weight[0].exact_start and rel_err(layer(x), expanded(x)) < 1e-5


def test_roles_mark_every_factor():
    model = kflo.expand(nn.Sequential(nn.Conv2d(2, 3, 3)), "expandnet-cl")
    roles = kflo.param_roles(model)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 6 and all(roles[n].kind == "expandnet-factor" and roles[n].weight_decay == "default" for n in names)


# -- SmallNet anchors (paper Table 9, Table S10; DESIGN.md) ----------------------------------------------------------

ANCHORS = [
    (["expandnet-ck:rate=1"], 54_766),
    (["expandnet-ck:rate=4"], 186_982),
    (["expandnet-ck:rate=4,stem=expand"], 189_826),
    (["expandnet-cl:rate=4"], 547_102),
    (["expandnet-ck:rate=4", "expandnet-fc:rate=4"], 1_745_766),
    (["expandnet-cl:rate=4", "expandnet-fc:rate=4"], 2_105_886),
    (["expandnet-ck:rate=4", "expandnet-fc:rate=4,classifier=expand"], 1_772_446),
]


@pytest.mark.parametrize("specs,total", ANCHORS, ids=["+".join(a[0]) for a in ANCHORS])
def test_smallnet_k7_parameter_anchors(specs, total):
    model = kflo.create_model("smallnet_k7")
    assert sum(p.numel() for p in model.parameters()) == 66_186
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kflo.expand(model, specs)
    assert sum(p.numel() for p in model.parameters()) == total


def test_dry_run_prints_the_totals_and_which_recipe_took_which_layer():
    runner = CliRunner()
    r = runner.invoke(app, ["expand", "smallnet_k7", "--recipe", "expandnet-ck", "--recipe", "expandnet-fc", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "66,186 -> 1,745,766" in r.output
    lines = {line.split()[1]: line for line in r.output.splitlines() if re.match(r"^\W+(features|classifier)\.\d", line)}
    assert "expandnet-ck" in lines["features.0"] and "expandnet-fc" in lines["classifier.0"]
    assert "skipped" in lines["classifier.2"]
    for name, total in [("expandnet-ck-r4", "186,982"), ("expandnet-cl-r4", "547,102"), ("expandnet-fc-r4", "1,624,970"),
                        ("expandnet-ck-fc-r4", "1,745,766")]:
        r = runner.invoke(app, ["expand", "smallnet_k7", "--recipe-file", name, "--dry-run"])
        assert r.exit_code == 0 and total in r.output, (name, r.output[-300:])


def test_a_layer_claimed_twice_is_an_error():
    with pytest.raises(KfloError, match="claimed by both recipe 'expandnet-ck' and recipe 'expandnet-cl'"):
        kflo.expand(kflo.create_model("smallnet_k7"), ["expandnet-ck", "expandnet-cl"])
    # Restricting one of them makes the sets disjoint: CK on the 7x7 stem, CL on the rest.
    model = kflo.expand(kflo.create_model("smallnet_k7"), [{"name": "expandnet-ck", "include": ["features.0"], "init": "random"},
                                                           {"name": "expandnet-cl", "exclude": ["features.0"]}])
    assert {r.name: r.recipe for r in kflo.record(model).plan if r.applied} == {
        "features.0": "expandnet-ck", "features.4": "expandnet-cl", "features.8": "expandnet-cl"}


@pytest.mark.parametrize("first,second", [("kernel", "feature"), ("feature", "kernel")])
def test_combination_checkpoint_loads_in_the_other_form_and_collapses_alone(first, second, tmp_path):
    size = (3, 32, 32)
    torch.manual_seed(0)
    model = kflo.create_model("smallnet_k7")
    kflo.expand(model, [f"expandnet-ck:mode={first},stem=expand", f"expandnet-fc:mode={first}"])
    perturb(model, 0.05, seed=1)
    move_bn_stats(model, size)
    path = tmp_path / "ck-fc.safetensors"
    kflo.save(model, path)
    meta = kflo.read_metadata(path)
    assert [r["name"] for r in meta["recipes"]] == ["expandnet-ck", "expandnet-fc"]
    other = kflo.create_model("smallnet_k7")
    kflo.expand(other, [f"expandnet-ck:mode={second},stem=expand", f"expandnet-fc:mode={second}"])
    other.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(4, *size)
    model.eval(), other.eval()
    with torch.no_grad():
        assert rel_err(model(x), other(x)) < 1e-5
    loaded = kflo.load(path)  # the metadata alone rebuilds it
    plain = kflo.collapse(loaded)
    reference = kflo.create_model("smallnet_k7")
    reference.load_state_dict(plain.state_dict(), strict=True)
    report = kflo.verify_equivalence(model, reference.eval(), input_size=size, trials=1)
    assert report.passed, report
    for k, v in kflo.collapse(other).state_dict().items():
        assert torch.allclose(v, plain.state_dict()[k], rtol=1e-5, atol=1e-6)


# -- the nonlinear counterpart and +Init -------------------------------------------------------------------------------

def test_nonlinear_counterpart_runs_activations_and_refuses_to_collapse():
    torch.manual_seed(0)
    model = kflo.expand(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
                        "expandnet-fc:mode=feature,nonlinear=relu,classifier=expand")
    x = torch.randn(5, 4)
    links = model[0].parametrizations.weight[0].factors
    h = F.relu(F.linear(x, links[0].weight, links[0].bias))
    h = F.relu(F.linear(h, links[1].weight, links[1].bias))
    assert rel_err(F.linear(h, links[2].weight, links[2].bias), model[0](x)) < 1e-6
    linear_value = F.linear(x, model[0].weight, model[0].bias)  # .weight is the composed (linear) kernel
    assert rel_err(linear_value, model[0](x)) > 1e-3
    with pytest.raises(KfloError, match=r"nonlinear counterpart.*\+Init.*--init-from-expanded"):
        kflo.collapse(model)
    with pytest.raises(KfloError, match="needs mode=feature"):
        kflo.create_recipe("expandnet-cl:nonlinear=relu")
    with pytest.raises(KfloError, match="init=preserve cannot"):
        kflo.create_recipe("expandnet-cl:mode=feature,nonlinear=relu,init=preserve")


def test_plus_init_transfers_the_nonlinear_factors_to_the_linear_expandnet(tmp_path):
    runner = CliRunner()
    nonlinear, linear, plain = (tmp_path / f"{n}.safetensors" for n in ("nonlinear", "linear", "plain"))
    r = runner.invoke(app, ["expand", "smallnet_k7", "--recipe", "expandnet-ck:mode=feature,nonlinear=relu",
                            "--recipe", "expandnet-fc:mode=feature,nonlinear=relu", "-o", str(nonlinear)])
    assert r.exit_code == 0, r.output
    trained = kflo.load(nonlinear)  # stand-in for training the nonlinear counterpart
    perturb(trained, 0.05, seed=3)
    move_bn_stats(trained, (3, 32, 32))
    kflo.save(trained, nonlinear)
    r = runner.invoke(app, ["collapse", str(nonlinear), "-o", str(plain)])
    assert r.exit_code == 2 and "+Init" in r.output
    r = runner.invoke(app, ["expand", "smallnet_k7", "--init-from-expanded", str(nonlinear), "-o", str(linear)])
    assert r.exit_code == 0, r.output
    source, target = load_file(str(nonlinear)), load_file(str(linear))
    assert list(source) == list(target) and all(torch.equal(source[k], target[k]) for k in source)
    meta = kflo.read_metadata(linear)
    assert all(e["params"]["nonlinear"] == "none" and e["params"]["mode"] == "kernel" for e in meta["recipes"])
    r = runner.invoke(app, ["collapse", str(linear), "-o", str(plain)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify-equivalence", str(linear), str(plain)])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    # Explicit recipes work too, in either form; mismatched widths are a clear error.
    r = runner.invoke(app, ["expand", "smallnet_k7", "--recipe", "expandnet-ck:mode=feature", "--recipe", "expandnet-fc",
                            "--init-from-expanded", str(nonlinear), "-o", str(linear)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["expand", "smallnet_k7", "--recipe", "expandnet-ck:rate=2,init=random", "--recipe", "expandnet-fc",
                            "--init-from-expanded", str(nonlinear), "-o", str(linear)])
    assert r.exit_code == 2 and "does not fit this expansion" in r.output
    # The library's pipeline does the same as the CLI: the linear counterpart starts from every tensor.
    linear_model = kflo.expand_model("smallnet_k7", init_from_expanded=nonlinear)
    assert all(torch.equal(linear_model.state_dict()[k], v) for k, v in source.items())
    assert all(not s.recipe.values.get("nonlinear", "none") != "none" for s in kflo.record(linear_model).selections)


# -- zoo models and the CLI ------------------------------------------------------------------------------------------

ZOO = [
    ("timm:mobilenetv3_small_050", {"num_classes": 5}, (3, 32, 32), "expandnet-cl:rate=2", True),
    ("timm:mobilenetv3_small_050", {"num_classes": 5}, (3, 32, 32), "expandnet-ck:mode=feature", True),
    ("timm:test_convnext", {"num_classes": 5}, (3, 32, 32), "expandnet-ck", True),  # 7x7 depthwise
    ("timm:test_efficientnet", {"num_classes": 5}, (3, 32, 32), "expandnet-cl:mode=feature", True),
    ("timm:tf_mixnet_s", {"num_classes": 5}, (3, 32, 32), "expandnet-ck:init=random", False),  # Conv2dSame 3..11
    ("timm:resnet18", {"num_classes": 5}, (3, 32, 32), "expandnet-fc:layers=2", True),
    ("torchvision:shufflenet_v2_x0_5", {"num_classes": 5}, (3, 32, 32), "expandnet-cl:rate=1,mode=feature", True),
]


@pytest.mark.parametrize("model_id,kwargs,size,spec,exact", slow_cases(ZOO, [f"{z[0]}-{z[3]}" for z in ZOO], {
    "timm:mobilenetv3_small_050-expandnet-cl:rate=2", "timm:mobilenetv3_small_050-expandnet-ck:mode=feature",
    "timm:test_efficientnet-expandnet-cl:mode=feature", "timm:tf_mixnet_s-expandnet-ck:init=random",
    "timm:resnet18-expandnet-fc:layers=2", "torchvision:shufflenet_v2_x0_5-expandnet-cl:rate=1,mode=feature"}))
def test_zoo(model_id, kwargs, size, spec, exact, tmp_path):
    model = zoo_roundtrip(model_id, kwargs, size, spec, tmp_path, exact_start=exact)
    assert sum(r.applied for r in kflo.record(model).plan) >= 1


def test_cli_expand_collapse_verify_with_the_paper_recipe_file(tmp_path):
    plain = cli_roundtrip("smallnet_k7", ["--recipe-file", "expandnet-ck-fc-r4"], tmp_path, "3,32,32")
    kflo.create_model("smallnet_k7").load_state_dict(load_file(str(plain)), strict=True)


def test_nonlinear_links_start_with_he_initialisation():
    """Between ReLUs the links keep the signal's scale (He init), so a deep chain without BatchNorm still trains."""
    torch.manual_seed(0)
    model = kflo.expand(nn.Sequential(nn.Linear(256, 256)),
                        "expandnet-fc:mode=feature,nonlinear=relu,classifier=expand,layers=4,rate=1")
    links = model[0].parametrizations.weight[0].factors
    for link in links:
        assert abs(link.weight.std().item() * math.sqrt(256) / math.sqrt(2) - 1) < 0.05
        assert torch.count_nonzero(link.bias) == 0
    x = torch.randn(512, 256)
    h = x
    for link in links[:-1]:
        h = F.relu(F.linear(h, link.weight, link.bias))
    # He: E[relu(h)^2] stays at about E[x^2] = 1 after every link; PyTorch's default divides it by ~6 per link
    assert 0.6 < h.pow(2).mean().item() < 1.5
    linear = kflo.expand(nn.Sequential(nn.Linear(256, 256)), "expandnet-fc:classifier=expand,init=random")
    bound = 1 / math.sqrt(256)  # the linear ExpandNet keeps PyTorch's default (the paper's initialisation)
    assert all(link.weight.abs().max() <= bound for link in linear[0].parametrizations.weight[0].factors)


@pytest.mark.slow
def test_training_the_nonlinear_counterpart_ends_without_a_collapse_and_says_why(tmp_path):
    model = kflo.expand(kflo.create_model("lenet5", num_classes=10), "expandnet-cl:mode=feature,nonlinear=relu")
    assert "+Init" in kflo.collapse_problem(model)
    assert kflo.collapse_problem(kflo.expand(kflo.create_model("lenet5"), "expandnet-cl")) is None
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "lenet5", "--recipe", "expandnet-cl:mode=feature,nonlinear=relu",
                                 "--data", "digits", "--threads", "1", "--batch-size", "64", "--epochs", "1",
                                 "--train-fraction", "0.3", "-o", str(run)])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "+Init" in r.output
    assert not (run / "collapsed.safetensors").exists() and (run / "best.safetensors").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert "collapsed" not in summary and "+Init" in summary["not_collapsed"]
