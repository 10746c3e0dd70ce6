"""The paper zoo: registered into timm, honours num_classes / in_chans / img_size, matches the papers' counts."""

from __future__ import annotations

import pytest
import timm
import torch

import kflo_cli.zoo as zoo

COUNTS = {
    "lenet5": 61_706,
    "smallnet_k7": 66_186,  # ExpandNets, Table 9
    "wrn28_10": 36_479_194,  # Zagoruyko & Komodakis, 36.5M
    "wrn16_8": 10_961_370,  # 11.0M
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in zoo.ZOO_MODELS if n not in ("wrn28_5", "wrn28_10", "wrn16_8")])
def test_builds_through_timm_and_runs(name):
    model = timm.create_model(name, num_classes=7)
    size = model.pretrained_cfg["input_size"]
    assert model(torch.randn(2, *size)).shape == (2, 7)


@pytest.mark.parametrize("name,count", COUNTS.items())
def test_parameter_counts_match_the_papers(name, count):
    assert n_params(timm.create_model(name, num_classes=10)) == count


def test_smallnet_k3_has_no_padding_and_fc_128():
    model = timm.create_model("smallnet_k3")
    assert model.features[0].padding == (0, 0)
    assert model.classifier[0].in_features == 128


@pytest.mark.parametrize("name,kwargs,size", [
    ("lenet5", {"img_size": 32}, (1, 32, 32)),
    ("lenet5", {"in_chans": 3}, (3, 28, 28)),
    ("smallnet_k7", {"in_chans": 1, "img_size": 28}, (1, 28, 28)),
    ("cifar_quick", {"img_size": 64}, (3, 64, 64)),
    ("wrn28_2", {"in_chans": 1, "img_size": 28}, (1, 28, 28)),
])
def test_in_chans_and_img_size(name, kwargs, size):
    model = timm.create_model(name, num_classes=3, **kwargs)
    assert tuple(model.pretrained_cfg["input_size"]) == size
    assert model(torch.randn(2, *size)).shape == (2, 3)


def test_pretrained_is_refused_and_registration_is_idempotent():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("lenet5", pretrained=True)
    zoo.register_zoo()
    assert set(zoo.ZOO_MODELS) <= set(timm.list_models())
