"""The paper zoo: registered into timm, honours num_classes / in_chans / img_size, matches the papers' counts."""

from __future__ import annotations

import importlib
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import kflo_cli.zoo as zoo

# Parameter counts for 10 classes at the default input size.
COUNTS = {
    "lenet5": 61_706,  # 156 + 2,416 + 48,120 + 10,164 + 850
    "smallnet_k3": 15_050,  # ExpandNets SmallNet 3x3, no padding: FC 128 -> 64
    "smallnet_k5": 50_250,
    "smallnet_k7": 66_186,  # ExpandNets, Table 9
    "smallnet_k9": 87_434,
    "cifar_quick": 145_834,  # Caffe layout + BN; FC 1,024 -> 64
    "vgg16_gap": 14_986_698,  # 14,719,818 (13 conv + BN) + 262,656 (FC 512) + 5,130
    "wrn16_8": 10_961_370,  # Zagoruyko & Komodakis: 11.0M
    "wrn28_2": 1_467_610,
    "wrn28_5": 9_132_634,
    "wrn28_10": 36_479_194,  # Zagoruyko & Komodakis: 36.5M
}
# Too slow for a 2-core CI budget; their parameter count is still tested.
NO_FORWARD = ("wrn28_5", "wrn28_10")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_models_lists_every_registered_name():
    assert set(COUNTS) == set(zoo.ZOO_MODELS)
    assert set(zoo.ZOO_MODELS) <= set(timm.list_models())


@pytest.mark.parametrize("name,count", COUNTS.items())
def test_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: counting WRN-28-10 costs nothing
        model = timm.create_model(name, num_classes=10)
    assert n_params(model) == count


@pytest.mark.parametrize("name", [n for n in zoo.ZOO_MODELS if n not in NO_FORWARD])
def test_builds_through_timm_and_runs_at_the_default_size(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    assert model.num_classes == 7
    assert model.pretrained_cfg is model.default_cfg
    assert model.pretrained_cfg["num_classes"] == 7 and model.pretrained_cfg["architecture"] == name
    size = model.pretrained_cfg["input_size"]
    assert size == ((1, 28, 28) if name == "lenet5" else (3, 32, 32))
    assert model(torch.randn(2, *size)).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, *size)).shape == (1, 7)


def test_construction_leaves_batchnorm_statistics_untouched():
    model = timm.create_model("smallnet_k7")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3
    assert all(int(bn.num_batches_tracked) == 0 and bool((bn.running_mean == 0).all()) for bn in bns)


@pytest.mark.parametrize("kernel", [3, 5, 7, 9])
def test_smallnet_padding_and_flatten(kernel):
    model = timm.create_model(f"smallnet_k{kernel}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 16), (16, 32)]
    pad = 0 if kernel == 3 else kernel // 2
    assert all(c.kernel_size == (kernel, kernel) and c.padding == (pad, pad) and c.bias is not None for c in convs)
    assert model.classifier[0].in_features == (128 if kernel == 3 else 512)


@pytest.mark.parametrize("name,kwargs,size,flat", [
    ("lenet5", {"img_size": 32}, (1, 32, 32), 16 * 6 * 6),
    ("lenet5", {"in_chans": 3}, (3, 28, 28), 16 * 5 * 5),
    ("smallnet_k7", {"in_chans": 1, "img_size": 28}, (1, 28, 28), 32 * 3 * 3),
    ("smallnet_k3", {"img_size": (40, 48)}, (3, 40, 48), 32 * 3 * 4),
    ("cifar_quick", {"img_size": 64}, (3, 64, 64), 64 * 8 * 8),
    ("vgg16_gap", {"in_chans": 1, "img_size": 64}, (1, 64, 64), 512),
    ("wrn28_2", {"in_chans": 1, "img_size": 28}, (1, 28, 28), 128),
])
def test_in_chans_and_img_size(name, kwargs, size, flat):
    model = timm.create_model(name, num_classes=3, **kwargs)
    assert model.pretrained_cfg["input_size"] == size
    head = model.fc if name.startswith("wrn") else model.classifier[0]
    assert head.in_features == flat
    assert model(torch.randn(2, *size)).shape == (2, 3)


def test_wide_resnet_options_and_layout():
    model = timm.create_model("wrn28_2", drop_rate=0.1)
    blocks = list(model.blocks)
    assert len(blocks) == 12 and all(b.drop.p == 0.1 for b in blocks)
    assert [i for i, b in enumerate(blocks) if b.shortcut is not None] == [0, 4, 8]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert timm.create_model("wrn16_8").blocks[0].drop.p == 0.3


def test_cifar_quick_keeps_caffes_pooled_sizes():
    features = timm.create_model("cifar_quick").features.eval()
    sizes = [m for m in features if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert all(p.ceil_mode for p in sizes)
    assert features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 4, 4)


def test_timm_arguments_are_handled():
    model = timm.create_model("wrn28_2", pretrained_cfg_overlay={"mean": (0.5, 0.5, 0.5)}, dtype=torch.float64)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert next(model.parameters()).dtype == torch.float64
    config = timm.data.resolve_model_data_config(timm.create_model("smallnet_k7"))
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0


@pytest.mark.parametrize("call,error,match", [
    (lambda: timm.create_model("lenet5", pretrained=True), ValueError, "no pretrained weights"),
    (lambda: timm.create_model("smallnet_k7.imagenet"), ValueError, "no pretrained tags"),
    (lambda: timm.create_model("lenet5", drop_rate=0.1), TypeError, "lenet5 does not take drop_rate"),
    (lambda: timm.create_model("vgg16_gap", img_size=28), ValueError, "too small"),
    (lambda: timm.create_model("lenet5", img_size=(28, 28, 28)), ValueError, "int or \\(height, width\\)"),
])
def test_errors_are_clear(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_registration_is_idempotent_across_reloads():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over
        zoo.register_zoo()
        again = importlib.reload(zoo)
        again.register_zoo()
    assert again.ZOO_MODELS == zoo.ZOO_MODELS
    assert timm.create_model("smallnet_k7").num_classes == 10
