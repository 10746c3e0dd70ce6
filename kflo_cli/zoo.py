"""The papers' architectures, registered into timm's model registry.

LeNet-5 as in KFLO (Henig & Giryes, Fig. 1c); SmallNet k = 3/5/7/9 as in ExpandNets (Guo, Alvarez & Salzmann);
Cifar-quick and VGG16 with BatchNorm and global average pooling as in ACNet/KFLO; CIFAR wide residual networks
(Zagoruyko & Komodakis) with the wide-dropout block. Importing this module registers them, so
``timm.create_model("smallnet_k7", num_classes=10)`` works. Decisions are in docs/zoo.md.
"""

from __future__ import annotations

from typing import Any, Callable

import timm
import torch
import torch.nn as nn
from timm.models import register_model

ZOO_MODELS = (
    "lenet5", "smallnet_k3", "smallnet_k5", "smallnet_k7", "smallnet_k9", "cifar_quick", "vgg16_gap",
    "wrn16_8", "wrn28_2", "wrn28_5", "wrn28_10",
)


def _flat_features(features: nn.Module, in_chans: int, img_size: int) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, in_chans, img_size, img_size)).numel())


class _ZooNet(nn.Module):
    """``features`` -> flatten -> ``classifier``; carries a timm-style ``pretrained_cfg``."""

    def __init__(self, features: nn.Module, classifier: nn.Module, num_classes: int, in_chans: int, img_size: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size), "num_classes": num_classes}
        self.default_cfg = self.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def lenet5_net(num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> nn.Module:
    """LeNet-5 for 28x28 inputs: conv5x5(6, pad 2)-ReLU-pool, conv5x5(16)-ReLU-pool, FC 120-84-classes."""
    features = nn.Sequential(
        nn.Conv2d(in_chans, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_chans, img_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
    )
    return _ZooNet(features, classifier, num_classes, in_chans, img_size)


def smallnet_net(kernel: int, num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """ExpandNets' SmallNet: three k x k convs (8/16/32) each BN-ReLU-maxpool2, then FC 64 and the classifier.

    k = 3 uses no padding; k = 5, 7, 9 use padding k // 2 (ExpandNets, section 4.1).
    """
    pad = 0 if kernel == 3 else kernel // 2
    layers: list[nn.Module] = []
    chans = [in_chans, 8, 16, 32]
    for cin, cout in zip(chans, chans[1:]):
        layers += [nn.Conv2d(cin, cout, kernel, padding=pad), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    features = nn.Sequential(*layers)
    flat = _flat_features(features, in_chans, img_size)
    classifier = nn.Sequential(nn.Linear(flat, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes))
    return _ZooNet(features, classifier, num_classes, in_chans, img_size)


def cifar_quick_net(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """Caffe's CIFAR-10 quick net with BatchNorm after every conv (ACNet/KFLO): 3 conv5x5 (32/32/64), FC 64."""
    features = nn.Sequential(
        nn.Conv2d(in_chans, 32, 5, padding=2), nn.BatchNorm2d(32), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.AvgPool2d(3, 2, ceil_mode=True),
    )
    flat = _flat_features(features, in_chans, img_size)
    classifier = nn.Sequential(nn.Linear(flat, 64), nn.Linear(64, num_classes))
    return _ZooNet(features, classifier, num_classes, in_chans, img_size)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_gap_net(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """VGG16 with BN after every conv, global average pooling, FC 512 -> 512 -> classes (ACNet/KFLO CIFAR variant)."""
    layers: list[nn.Module] = []
    cin = in_chans
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    layers.append(nn.AdaptiveAvgPool2d(1))
    classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))
    return _ZooNet(nn.Sequential(*layers), classifier, num_classes, in_chans, img_size)


class WideBasic(nn.Module):
    """Pre-activation wide-dropout block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, 1x1 conv shortcut on change."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(self.drop(out))))
        return out + skip


class WideResNet(nn.Module):
    """CIFAR WRN-depth-k: conv3x3 16, three groups of (depth-4)/6 wide blocks (16k, 32k, 64k), BN-ReLU-GAP-FC."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, drop_rate: float = 0.3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBasic(cin, widths[group + 1], stride if i == 0 else 1, drop_rate))
                cin = widths[group + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size), "num_classes": num_classes}
        self.default_cfg = self.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str, build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"no pretrained weights exist for {name}; train it with kflo train or load a checkpoint")
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        return build(**kwargs)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = build.__doc__
    return create


def _builders() -> dict[str, Callable[..., nn.Module]]:
    def smallnet(k: int) -> Callable[..., nn.Module]:
        return lambda **kw: smallnet_net(k, **kw)

    def wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
        return lambda **kw: WideResNet(depth, widen, **kw)

    table: dict[str, Callable[..., nn.Module]] = {
        "lenet5": lenet5_net,
        "cifar_quick": cifar_quick_net,
        "vgg16_gap": vgg16_gap_net,
        "wrn16_8": wrn(16, 8),
        "wrn28_2": wrn(28, 2),
        "wrn28_5": wrn(28, 5),
        "wrn28_10": wrn(28, 10),
    }
    for k in (3, 5, 7, 9):
        table[f"smallnet_k{k}"] = smallnet(k)
    return table


def register_zoo() -> None:
    """Register every zoo model with timm (idempotent)."""
    known = set(timm.list_models())
    for name, build in _builders().items():
        if name not in known:
            register_model(_entrypoint(name, build))


register_zoo()

__all__ = ["ZOO_MODELS", "WideResNet", "register_zoo"]
