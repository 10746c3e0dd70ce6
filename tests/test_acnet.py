"""ACNet recipe: branch layout, BatchNorm folding (eval-mode exact), the bias slot, consumer discovery, zoo and CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import kflo_cli as kflo
from kflo_cli.errors import KfloError
from kflo_cli.reparam.acnet import ACBlock, Consumer, find_bn_consumers, tf_same_pads

from conftest import perturb, rel_err
from recipe_checks import cli_roundtrip, conv_configs, zoo_roundtrip

TOL64 = 1e-10  # float64 models: folding only reorders float64 sums


@torch.no_grad()
def move_stats64(model: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    """Train-mode forwards in float64 so that every BatchNorm's running statistics leave their start."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(3):
        model(torch.randn((4, *shape), generator=gen, dtype=torch.float64) * 1.5 + 0.3)
    model.eval()


def acnet_params(kwargs: dict, affine: bool) -> int:
    k = kwargs["kernel_size"][0]
    per_group = kwargs["in_channels"] // kwargs["groups"]
    out = kwargs["out_channels"]
    bias = out if kwargs["bias"] else 0
    return out * per_group * (k * k + 2 * k) + bias + (6 * out if affine else 0)


@given(
    cfg=conv_configs(dims=(2,), square_odd=True),
    consumer=st.sampled_from(["bn", "bn-nonaffine", "bn-batch-stats", "none"]),
    bn_init=st.sampled_from(["standard", "third", "single"]),
    affine=st.booleans(),
    seed=st.integers(0, 100),
)
def test_acnet_block_folds_exactly_in_eval_mode(cfg, consumer, bn_init, affine, seed):
    _, kwargs, in_shape = cfg
    if not affine:
        bn_init = "standard"
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kwargs)
    layers = [conv]
    if consumer != "none":
        layers.append(nn.BatchNorm2d(kwargs["out_channels"], affine=consumer == "bn",
                                     track_running_stats=consumer != "bn-batch-stats"))
    model = nn.Sequential(*layers).double()
    move_stats64(model, in_shape, seed)
    original_keys = list(model.state_dict())
    x = torch.randn((3, *in_shape), dtype=torch.float64)
    y0 = model(x)
    spec = f"acnet:bn_init={bn_init},affine={str(affine).lower()}"
    if not kwargs["bias"] and consumer == "none":
        reason = kflo.create_recipe(spec).skip_reason(kflo.LayerContext("0", conv, model))
        assert "is not consumed by a BatchNorm alone, so the folded bias has nowhere to go" in reason
        with pytest.raises(KfloError, match="matches no layer"):
            kflo.expand(model, spec)
        return
    kflo.expand(model, spec, seed=seed)
    block = model[0]
    assert isinstance(block, ACBlock) and block.square is conv
    assert sum(p.numel() for p in block.parameters()) == acnet_params(kwargs, affine)
    assert "weight" not in dict(block.named_parameters(recurse=False))
    if bn_init == "single":
        assert rel_err(y0, model(x)) < TOL64, "bn_init=single starts as the k x k branch alone (eval mode)"

    model.train()
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    perturb(model, 0.2, seed=seed)
    move_stats64(model, in_shape, seed + 1)
    plain = kflo.collapse(model)
    assert type(plain[0]) is nn.Conv2d and list(plain.state_dict()) == original_keys
    assert rel_err(model(x), plain(x)) < TOL64


def test_single_init_also_preserves_train_mode_before_a_batchnorm():
    """BN(a*z + c) == BN(z) in train mode for a per-channel positive scale: the consumer BN absorbs the branch BN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    y0 = model.train()(x)
    kflo.expand(model, "acnet:bn_init=single")
    assert rel_err(y0, model.train()(x)) < 1e-4  # only the BatchNorm eps (1e-5) now enters twice


@pytest.mark.parametrize("bn_init,gammas", [("standard", (1, 1, 1)), ("third", (1 / 3,) * 3), ("single", (1, 0, 0))])
def test_bn_inits(bn_init, gammas):
    model = kflo.expand(nn.Sequential(nn.Conv2d(2, 3, 3, bias=True)), f"acnet:bn_init={bn_init}")
    got = tuple(bn.weight.detach() for bn in model[0].bns())
    assert all(torch.all(g == v) for g, v in zip(got, gammas))
    assert all(torch.all(bn.bias.detach() == 0) for bn in model[0].bns())


def test_affine_false_with_a_gamma_init_is_refused():
    with pytest.raises(KfloError, match="affine=false BatchNorms"):
        kflo.create_recipe("acnet:affine=false,bn_init=third")
    with pytest.raises(KfloError, match="not one of standard, third, single"):
        kflo.create_recipe("acnet:bn_init=half")


def test_skip_reasons_for_ineligible_convolutions():
    import timm.layers as tl

    model = nn.Sequential(
        nn.Conv2d(3, 4, (3, 1), bias=True), nn.Conv2d(4, 4, 1, bias=True), nn.Conv2d(4, 4, 2, bias=True),
        tl.StdConv2d(4, 4, 3), nn.Conv1d(4, 4, 3), nn.Conv2d(4, 4, 3, bias=True),
    )
    rows = {r.name: r for r in kflo.plan(model, "acnet")}
    assert "not square" in rows["0"].reason
    assert "1x1 kernel" in rows["1"].reason
    assert "even size" in rows["2"].reason
    assert "has its own forward" in rows["3"].reason
    assert "4" not in rows and rows["5"].applied


class InPlaceBeforeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        y += x  # the BN does not see the convolution's output
        return self.bn(y)


class TwoUses(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class Plain(nn.Module):
    def __init__(self, cin=3):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def skip_reasons(model: nn.Module) -> dict[str, str | None]:
    """The plan's reason per Conv2d (``kflo.plan`` refuses a recipe that applies nowhere, so ask directly)."""
    recipe = kflo.create_recipe("acnet")
    shared: dict = {}  # one expansion: the data flow is analysed once
    return {n: recipe.skip_reason(kflo.LayerContext(n, m, model, shared=shared)) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("model,fragment", [
    (InPlaceBeforeBN(), "not consumed by a BatchNorm alone"),
    (TwoUses(), "not consumed by a BatchNorm alone"),
    (ReusedConv(), "runs 2 times"),
])
def test_unreliable_consumers_are_skipped_with_a_reason(model, fragment):
    reason = skip_reasons(model)["conv"]
    assert fragment in reason and "nowhere to go" in reason


def test_a_batchnorm_shared_by_two_convolutions_is_not_a_fold_target():
    reasons = skip_reasons(SharedBN())
    assert "'bn' after it runs 2 times" in reasons["a"] and "'bn' after it runs 2 times" in reasons["b"]


def test_consumer_discovery_by_forward_and_by_fx_agree():
    model = Plain()
    expected = {"conv": Consumer("bn"), "head": Consumer(None, "its output is not consumed by a BatchNorm alone")}
    assert find_bn_consumers(model, ["conv", "head"], (3, 8, 8)) == expected
    # 5 input channels: the forward at the default (3, 224, 224) fails, so the torch.fx trace decides.
    model5 = Plain(cin=5)
    assert find_bn_consumers(model5, ["conv", "head"]) == expected
    rows = {r.name: r for r in kflo.plan(model5, "acnet")}
    assert rows["conv"].applied and not rows["head"].applied


def test_when_no_data_flow_can_be_followed_the_layer_is_skipped():
    class Branchy(Plain):
        def forward(self, x):
            if x.shape[-1] != 17:  # the dummy forward fails (224-pixel input), and torch.fx cannot trace this
                raise ValueError("expects 17 x 17 crops")
            if x.sum() > 0:  # data-dependent control flow
                x = x * 2
            return super().forward(x)

    assert "data flow could not be followed" in skip_reasons(Branchy(cin=5))["conv"]


def test_bias_goes_into_the_consumer_running_mean():
    torch.manual_seed(0)
    model = Plain().double()
    move_stats64(model, (3, 8, 8), 0)
    kflo.expand(model, "acnet")
    perturb(model, 0.2)
    move_stats64(model, (3, 8, 8), 1)
    kernel, bias = model.conv.fused()
    before = model.bn.running_mean.clone()
    plain = kflo.collapse(model)
    assert plain.conv.bias is None
    assert torch.allclose(plain.bn.running_mean, before - bias, atol=1e-12)
    assert torch.equal(model.bn.running_mean, before), "collapse must not touch the expanded model"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert rel_err(model(x), plain(x)) < TOL64


@pytest.mark.parametrize("size", [(9, 9), (10, 7), (16, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_timm_conv2d_same(size, bias):
    import timm.layers as tl

    torch.manual_seed(0)
    conv = tl.Conv2dSame(3, 4, 3, stride=2, bias=bias)
    model = nn.Sequential(conv, nn.BatchNorm2d(4)).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    assert tf_same_pads(size, (3, 3), (2, 2), (1, 1)) == tuple(tl.padding.pad_same_arg(list(size), [3, 3], [2, 2], [1, 1]))
    kflo.expand(model, "acnet")
    perturb(model, 0.2)
    move_stats64(model, (3, *size), 0)
    plain = kflo.collapse(model)
    assert type(plain[0]) is tl.Conv2dSame
    assert rel_err(model(x), plain(x)) < TOL64


ZOO = [
    ("timm:test_resnet", {"num_classes": 5}, (3, 32, 32)),
    ("torchvision:mobilenet_v3_small", {"num_classes": 5}, (3, 32, 32)),
    ("timm:test_efficientnet", {"num_classes": 5}, (3, 32, 32)),
    ("timm:tf_mobilenetv3_small_minimal_100", {"num_classes": 5}, (3, 33, 33)),  # Conv2dSame, odd size
    ("smallnet_k7", {}, (3, 32, 32)),  # convolutions with biases
]


@pytest.mark.parametrize("model_id,kwargs,size", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_collapsed_checkpoint_loads_strictly(model_id, kwargs, size, tmp_path):
    model = zoo_roundtrip(model_id, kwargs, size, "acnet", tmp_path, exact_start=False)
    # Every square odd convolution of these networks is applied: no layer lost for want of a bias slot.
    assert not [r for r in kflo.record(model).plan if "nowhere to go" in r.reason]
    blocks = [m for _, m, _ in kflo.rewritten_layers(model)]
    assert blocks and all(isinstance(b, ACBlock) for b in blocks)
    if model_id != "smallnet_k7":
        assert all(b.square.bias is None and b.consumer for b in blocks)


def test_zoo_single_init_is_function_preserving(tmp_path):
    zoo_roundtrip("torchvision:resnet18", {"num_classes": 5}, (3, 32, 32), "acnet:bn_init=single", tmp_path)


def test_cli_expand_collapse_verify(tmp_path):
    plain = cli_roundtrip("timm:test_efficientnet", ["--recipe-file", "acnet"], tmp_path, "3,32,32", ["--num-classes", "4"])
    import timm

    timm.create_model("test_efficientnet", num_classes=4).load_state_dict(load_file(str(plain)), strict=True)
