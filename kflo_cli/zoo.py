"""The papers' architectures, registered into timm's model registry.

LeNet-5 as in KFLO (Henig & Giryes, Fig. 1c); SmallNet with 3/5/7/9 kernels as in ExpandNets (Guo, Alvarez &
Salzmann, NeurIPS 2020); Cifar-quick and VGG16, both with BatchNorm after every convolution and VGG16 with a
global-average-pooling head, as in ACNet (Ding et al., ICCV 2019) and KFLO; CIFAR wide residual networks with the
wide-dropout block (Zagoruyko & Komodakis, BMVC 2016). Importing this module registers them, after which
``timm.create_model("smallnet_k7", num_classes=10)`` works. The decisions behind each layout are in docs/zoo.md.

Only standard ``torch.nn`` layers are used, so kflo's surgery (which rewrites ``nn.Conv*`` and ``nn.Linear``
modules) sees every filtering layer.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from timm.models import is_model, model_entrypoint, register_model

ZOO_MODELS: tuple[str, ...] = (
    "lenet5",
    "smallnet_k3",
    "smallnet_k5",
    "smallnet_k7",
    "smallnet_k9",
    "cifar_quick",
    "vgg16_gap",
    "wrn16_8",
    "wrn28_2",
    "wrn28_5",
    "wrn28_10",
)

__all__ = ["ZOO_MODELS", "ZooNet", "WideBasicBlock", "WideResNet", "register_zoo", *ZOO_MODELS]

# Arguments timm's create_model passes to every entrypoint that only matter for pretrained weights.
_WEIGHT_ONLY_KWARGS = ("cache_dir", "pretrained_model_args")

_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class ZooNet(nn.Module):
    """A plain feed-forward classifier: ``features`` -> flatten -> ``classifier``.

    Args:
        features: The convolutional trunk (convolutions, norms, activations, pools).
        classifier: The fully-connected head, fed the flattened trunk output.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images (N, C, H, W) into logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.features(x), 1))


class WideBasicBlock(nn.Module):
    """Pre-activation wide-dropout block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus a shortcut.

    The shortcut is the identity when the shape is kept, otherwise a 1x1 convolution applied to the
    pre-activated input (as in the authors' code, so both paths share the first BN-ReLU).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first convolution and of the shortcut.
        drop_rate: Dropout probability between the two convolutions.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        changes_shape = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update of ``x``."""
        pre = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(self.conv1(pre)))))
        return out + skip


class WideResNet(nn.Module):
    """CIFAR WRN-depth-widen: a 16-channel 3x3 stem, three groups of wide blocks, BN-ReLU, GAP and FC.

    Each group has (depth - 4) / 6 blocks with widths 16k, 32k, 64k and strides 1, 2, 2. Convolutions have
    no bias (a BatchNorm always follows) and start from He (fan-out) initialisation, as in the authors' code.

    Args:
        depth: Total depth, 6n + 4.
        widen: Widening factor k.
        num_classes: Classifier outputs.
        in_chans: Input channels.
        drop_rate: Dropout probability inside every block.

    Raises:
        ValueError: If ``depth`` is not of the form 6n + 4 with n >= 1.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_chans: int, drop_rate: float) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        per_group = (depth - 4) // 6
        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        chs = 16
        for width, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(per_group):
                blocks.append(WideBasicBlock(chs, width, stride if i == 0 else 1, drop_rate))
                chs = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images (N, C, H, W) into logits (N, num_classes)."""
        x = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _flat_features(name: str, make_features: Callable[[], nn.Module], in_chans: int, size: tuple[int, int]) -> int:
    """Number of features the trunk produces for one image, found by a shape-only (meta device) forward.

    A meta forward allocates nothing, draws no random numbers and leaves no BatchNorm statistics behind.

    Raises:
        ValueError: If the image is too small for the trunk's kernels and pools.
    """
    if in_chans < 1:
        raise ValueError(f"{name}: in_chans={in_chans} must be at least 1")
    try:
        with torch.device("meta"):
            return make_features().eval()(torch.empty(1, in_chans, *size)).numel()
    except RuntimeError as exc:
        raise ValueError(f"{name}: img_size {size} is too small for this architecture ({exc})") from None


def _lenet5_features(in_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )


def _build_lenet5(num_classes: int, in_chans: int, img_size: tuple[int, int]) -> ZooNet:
    flat = _flat_features("lenet5", partial(_lenet5_features, in_chans), in_chans, img_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )
    return ZooNet(_lenet5_features(in_chans), classifier)


def _smallnet_features(kernel: int, in_chans: int) -> nn.Sequential:
    padding = 0 if kernel == 3 else kernel // 2
    layers: list[nn.Module] = []
    for cin, cout in ((in_chans, 8), (8, 16), (16, 32)):
        layers += [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def _build_smallnet(kernel: int, num_classes: int, in_chans: int, img_size: tuple[int, int]) -> ZooNet:
    flat = _flat_features(f"smallnet_k{kernel}", partial(_smallnet_features, kernel, in_chans), in_chans, img_size)
    classifier = nn.Sequential(nn.Linear(flat, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes))
    return ZooNet(_smallnet_features(kernel, in_chans), classifier)


def _cifar_quick_features(in_chans: int) -> nn.Sequential:
    # Caffe rounds pooled sizes up; ceil_mode reproduces its 32 -> 16 -> 8 -> 4 geometry and its average-pool
    # divisor (border windows are clipped to the image, no padding is counted).
    return nn.Sequential(
        nn.Conv2d(in_chans, 32, 5, padding=2), nn.BatchNorm2d(32),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.AvgPool2d(3, 2, ceil_mode=True),
    )


def _build_cifar_quick(num_classes: int, in_chans: int, img_size: tuple[int, int]) -> ZooNet:
    flat = _flat_features("cifar_quick", partial(_cifar_quick_features, in_chans), in_chans, img_size)
    classifier = nn.Sequential(nn.Linear(flat, 64), nn.Linear(64, num_classes))
    return ZooNet(_cifar_quick_features(in_chans), classifier)


def _vgg16_features(in_chans: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_chans
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)),
                       nn.ReLU(inplace=True)]
            cin = int(item)
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers)


def _build_vgg16_gap(num_classes: int, in_chans: int, img_size: tuple[int, int]) -> ZooNet:
    flat = _flat_features("vgg16_gap", partial(_vgg16_features, in_chans), in_chans, img_size)
    classifier = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))
    return ZooNet(_vgg16_features(in_chans), classifier)


def _build_wrn(
    depth: int, widen: int, num_classes: int, in_chans: int, img_size: tuple[int, int], drop_rate: float = 0.3,
) -> WideResNet:
    del img_size  # padded 3x3 convolutions and a global pool: every size works, only the config records it
    return WideResNet(depth, widen, num_classes, in_chans, drop_rate)


def _as_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """An ``img_size`` argument (int or (H, W)) as (H, W)."""
    if isinstance(img_size, int):
        return img_size, img_size
    if len(img_size) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {img_size!r}")
    return int(img_size[0]), int(img_size[1])


def _create(
    name: str,
    build: Callable[..., nn.Module],
    pretrained: bool,
    kwargs: dict[str, Any],
    *,
    in_chans: int = 3,
    img_size: int = 32,
) -> nn.Module:
    """Build a zoo model from the arguments timm's ``create_model`` hands an entrypoint.

    Args:
        name: Registered model name.
        build: ``build(num_classes=, in_chans=, img_size=(H, W), **model_kwargs)``.
        pretrained: Must be False: no weights exist for these models.
        kwargs: Everything else the caller or timm passed: ``num_classes`` (default 10), ``in_chans``,
            ``img_size``, model options such as ``drop_rate``, and timm's ``pretrained_cfg``,
            ``pretrained_cfg_overlay`` (merged into the config), ``cache_dir``, ``device`` and ``dtype``.
        in_chans: The architecture's default input channels.
        img_size: The architecture's default input side.

    Returns:
        The model, with ``num_classes`` and a timm-style ``pretrained_cfg`` (aliased as ``default_cfg``).

    Raises:
        ValueError: On ``pretrained=True``, a pretrained tag, or an image too small for the architecture.
        TypeError: On a keyword argument the architecture does not take.
    """
    if pretrained:
        raise ValueError(f"no pretrained weights exist for {name}; train it (kflo train) or load a checkpoint")
    tag = kwargs.pop("pretrained_cfg", None)
    if isinstance(tag, str) and tag:
        raise ValueError(f"{name} has no pretrained tags, got '{name}.{tag}'")
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    for key in _WEIGHT_ONLY_KWARGS:
        kwargs.pop(key, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    num_classes = int(kwargs.pop("num_classes", 10))
    in_chans = int(kwargs.pop("in_chans", in_chans))
    size = _as_size(kwargs.pop("img_size", img_size))
    options = [k for k in inspect.signature(build).parameters if k not in ("num_classes", "in_chans", "img_size")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        takes = ", ".join(["num_classes", "in_chans", "img_size", *options])
        raise TypeError(f"{name} does not take {', '.join(unknown)}; it takes {takes}")

    model = build(num_classes=num_classes, in_chans=in_chans, img_size=size, **kwargs)
    model.num_classes = num_classes
    first_conv, classifier = ("stem", "fc") if isinstance(model, WideResNet) else ("features.0", "classifier")
    model.pretrained_cfg = {
        "architecture": name,
        "input_size": (in_chans, *size),
        "num_classes": num_classes,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": first_conv,
        "classifier": classifier,
        **overlay,
    }
    model.default_cfg = model.pretrained_cfg
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def lenet5(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LeNet-5 (KFLO Fig. 1c) for 1 x 28 x 28 inputs: conv5x5 6 (pad 2), conv5x5 16, FC 120-84-classes."""
    return _create("lenet5", _build_lenet5, pretrained, kwargs, in_chans=1, img_size=28)


def smallnet_k3(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ExpandNets SmallNet with 3x3 kernels and no padding (FC 128 -> 64 on 32 x 32 inputs)."""
    return _create("smallnet_k3", partial(_build_smallnet, 3), pretrained, kwargs)


def smallnet_k5(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ExpandNets SmallNet with 5x5 kernels, padding 2 (FC 512 -> 64 on 32 x 32 inputs)."""
    return _create("smallnet_k5", partial(_build_smallnet, 5), pretrained, kwargs)


def smallnet_k7(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ExpandNets SmallNet with 7x7 kernels, padding 3: 66,186 parameters for CIFAR-10 (paper Table 9)."""
    return _create("smallnet_k7", partial(_build_smallnet, 7), pretrained, kwargs)


def smallnet_k9(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ExpandNets SmallNet with 9x9 kernels, padding 4 (FC 512 -> 64 on 32 x 32 inputs)."""
    return _create("smallnet_k9", partial(_build_smallnet, 9), pretrained, kwargs)


def cifar_quick(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Caffe's CIFAR-10 quick net with BatchNorm after every convolution (ACNet, KFLO)."""
    return _create("cifar_quick", _build_cifar_quick, pretrained, kwargs)


def vgg16_gap(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG16 with BatchNorm, global average pooling and FC 512 -> 512 -> classes (ACNet, KFLO)."""
    return _create("vgg16_gap", _build_vgg16_gap, pretrained, kwargs)


def wrn16_8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-8 with the wide-dropout block (``drop_rate``, default 0.3)."""
    return _create("wrn16_8", partial(_build_wrn, 16, 8), pretrained, kwargs)


def wrn28_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-28-2 with the wide-dropout block (``drop_rate``, default 0.3)."""
    return _create("wrn28_2", partial(_build_wrn, 28, 2), pretrained, kwargs)


def wrn28_5(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-28-5 with the wide-dropout block (``drop_rate``, default 0.3)."""
    return _create("wrn28_5", partial(_build_wrn, 28, 5), pretrained, kwargs)


def wrn28_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-28-10 with the wide-dropout block (``drop_rate``, default 0.3): 36,479,194 parameters for CIFAR-10."""
    return _create("wrn28_10", partial(_build_wrn, 28, 10), pretrained, kwargs)


def register_zoo() -> None:
    """Register every model of :data:`ZOO_MODELS` with timm; calling it again changes nothing.

    A name already registered by this module (also by an earlier import of it, e.g. after
    ``importlib.reload``) is left alone, so no "overwriting" warning is raised. A name taken by some other
    module is registered over, and timm warns about it.

    >>> register_zoo()
    >>> import timm
    >>> timm.create_model("smallnet_k7").num_classes
    10
    """
    for name in ZOO_MODELS:
        if is_model(name) and model_entrypoint(name).__module__ == __name__:
            continue
        register_model(globals()[name])


register_zoo()
