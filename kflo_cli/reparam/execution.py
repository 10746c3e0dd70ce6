"""How a factorised layer runs: compose its kernel, or run its input through the factors; ``mode=auto`` chooses.

A recipe whose effective kernel is a product of factors (KFLO, ExpandNet CL/CK/FC) computes the same linear
function in two forms:

* **kernel**: compose the factors into the layer's weight and run the layer's own forward on it. The composition
  costs the same whatever the batch, so it wins when the batch times the output positions is large.
* **feature**: run the input through the factors one after the other (the papers' form). It never builds the
  kernel, so it wins when the layer sees few output positions against its channel counts (the last stage of a
  ResNet on small images: 1x1 feature maps).

``mode=auto`` decides per layer from the input shape it sees (at the first step, and again whenever the shape
changes) with the cost model of :func:`choose_form`: multiply-accumulates of the layer's forward in each form,
the composition counted where it is not paid anyway (a decay on the composed weight composes it every training
step; evaluation inside ``parametrize.cached()`` composes it once for all its batches). Both forms compute the same function; the
tests compare outputs and gradients in float64.

A parametrization that offers the feature form implements the :class:`Factored` methods; the recipe returns
:func:`form_class` from ``forward_class``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .layers import padding_kind

MODES = ("auto", "kernel", "feature")

#: Choose the feature form only when it is estimated to cost at most this fraction of the kernel form's MACs. The
#: kernel form's composition is a few large matrix products, which run near the machine's peak; the feature form
#: runs the layer's input through wider convolutions, often on small maps, which do not: measured per layer
#: (benchmarks/layer_forms.py, docs/performance.md) KFLO's feature form did about 1.6x less work per second than
#: its composition, so it must be estimated that much cheaper to be faster.
FEATURE_MARGIN = 0.6


class Factored(Protocol):
    """What a weight parametrization provides to run in the feature form."""

    #: the composed kernel's shape (the layer's weight shape)
    weight_shape: tuple[int, ...]

    def run_features(self, module: nn.Module, x: torch.Tensor, padding: Any) -> torch.Tensor:
        """The layer's output (bias included) computed through the factors (``padding`` is for the first factor
        only; ``x`` is already padded where the layer pads in a way a convolution cannot)."""

    def feature_macs(self, module: nn.Module, x_shape: tuple[int, ...]) -> float:
        """Multiply-accumulates of one forward in the feature form for an input of ``x_shape``."""

    def composition_macs(self) -> float:
        """Multiply-accumulates of composing the kernel once."""

    def composition_paid(self) -> bool:
        """Whether training composes the kernel every step anyway (a decay on the composed weight)."""


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """``nn.ConvNd``'s output length along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_positions(module: nn.Module, x_shape: tuple[int, ...]) -> int:
    """Output positions per sample of a filtering layer for an input of ``x_shape`` (1 for Linear)."""
    if isinstance(module, nn.Linear):
        return 1
    dims = len(module.kernel_size)
    spatial = x_shape[-dims:]
    padding = module.padding
    out = 1
    for i in range(dims):
        if isinstance(padding, str) or layer_padding(module) == "tf-same":
            length = -(-spatial[i] // module.stride[i]) if padding != "valid" else conv_output_size(
                spatial[i], module.kernel_size[i], module.stride[i], 0, module.dilation[i])
        else:
            length = conv_output_size(spatial[i], module.kernel_size[i], module.stride[i], padding[i],
                                      module.dilation[i])
        out *= max(length, 0)
    return out


def samples(module: nn.Module, x_shape: tuple[int, ...]) -> int:
    """How many independent inputs the layer sees: the batch (times every leading dimension for Linear)."""
    if isinstance(module, nn.Linear):
        return math.prod(x_shape[:-1])
    return x_shape[0] if len(x_shape) == len(module.kernel_size) + 2 else 1


class Crop(NamedTuple):
    """The kernel taps a zero-padded convolution reads real input with, for one input shape: per spatial dimension
    the slice of taps kept, and the padding that gives the cropped kernel the same output positions."""

    taps: tuple[slice, ...]
    padding: tuple[int, ...]

    def kept(self, kernel_size: tuple[int, ...]) -> int:
        """How many of the ``prod(kernel_size)`` taps are kept."""
        return math.prod(len(range(*t.indices(k))) for t, k in zip(self.taps, kernel_size))


def live_taps(module: nn.Module, x_shape: tuple[int, ...]) -> Crop | None:
    """The :class:`Crop` of a convolution whose kernel has taps that only ever read zero padding for inputs of
    ``x_shape`` (a 3x3 convolution with padding 1 on a 1x1 map reads real input with its centre tap only), or None.

    Those taps multiply zeros: dropping them (and lowering the padding by the taps dropped in front) computes the
    same output exactly, with fewer multiply-accumulates in the convolution, its backward and, for a factorised
    kernel, the composition. Only for ``nn.ConvNd``'s own zero padding with numeric padding; the hull of the live
    taps is kept per dimension, and nothing is cropped unless the cropped layer has the same output size.
    """
    if isinstance(module, nn.Linear) or layer_padding(module) != "static" or module.padding_mode != "zeros":
        return None
    if isinstance(module.padding, str):
        return None
    dims = len(module.kernel_size)
    spatial = x_shape[-dims:]
    taps, padding, cropped = [], [], False
    for n, k, s, p, d in zip(spatial, module.kernel_size, module.stride, module.padding, module.dilation):
        o = conv_output_size(n, k, s, p, d)
        if o <= 0:
            return None
        live = [j for j in range(k) if any(0 <= t * s - p + j * d < n for t in range(o))]
        if not live:
            return None
        lo, hi = live[0], live[-1]
        new_p = p - lo * d
        if new_p < 0 or conv_output_size(n, hi - lo + 1, s, new_p, d) != o:
            lo, hi, new_p = 0, k - 1, p
        cropped = cropped or (lo, hi) != (0, k - 1)
        taps.append(slice(lo, hi + 1))
        padding.append(new_p)
    return Crop(tuple(taps), tuple(padding)) if cropped else None


def kernel_macs(module: nn.Module, param: "Factored", x_shape: tuple[int, ...], crop: Crop | None = None) -> float:
    """Multiply-accumulates of the layer's own forward (on its composed kernel) for an input of ``x_shape``."""
    size = math.prod(param.weight_shape)
    if crop is not None:
        size = size // math.prod(module.kernel_size) * crop.kept(module.kernel_size)
    return float(samples(module, x_shape) * output_positions(module, x_shape) * size)


def crops(param: Any) -> bool:
    """Whether a parametrization composes and runs a cropped kernel (:func:`live_taps`): it has ``compose_taps``
    and does not say it cannot (``croppable``, e.g. an ExpandNet chain with biases)."""
    return callable(getattr(param, "compose_taps", None)) and getattr(param, "croppable", True)


def choose_form(module: nn.Module, param: Factored, x_shape: tuple[int, ...], crop: Crop | None = None) -> str:
    """``"kernel"`` or ``"feature"`` for this layer and input shape (see the module docstring); ``crop``: the live
    taps both forms run with (a parametrization with ``compose_taps``)."""
    crop = crop if crops(param) else None
    kernel = kernel_macs(module, param, x_shape, crop)
    training = torch.is_grad_enabled()
    # evaluation inside parametrize.cached() composes once for every batch of the block (kflo train's evaluate);
    # a training step composes every step (its cached() block is one step), unless the composed decay pays for it
    amortized = not training and parametrize._cache_enabled > 0  # noqa: SLF001
    if not amortized and not (training and param.composition_paid()):
        kernel += param.composition_macs(crop) if crop is not None else param.composition_macs()
    feature = param.feature_macs(module, x_shape, crop) if crop is not None else param.feature_macs(module, x_shape)
    return "feature" if feature < FEATURE_MARGIN * kernel else "kernel"


def layer_padding(module: nn.Module) -> str | None:
    """:func:`~kflo_cli.reparam.layers.padding_kind` of the layer's class before it got an execution form."""
    return getattr(type(module), "_kflo_padding", None) or padding_kind(module)


def padded_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The input and the padding to give the first factor, so that the chain pads exactly as the layer would."""
    kind = layer_padding(module)
    if kind == "linear":
        return x, 0
    if kind == "tf-same":
        from timm.layers.padding import pad_same

        return pad_same(x, module.kernel_size, module.stride, module.dilation), 0
    if module.padding_mode == "zeros" and (not isinstance(module.padding, str) or module.padding == "valid"):
        return x, 0 if isinstance(module.padding, str) else module.padding
    pads = module._reversed_padding_repeated_twice
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x, 0


def _form_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    param = self.parametrizations.weight[0]
    mode = type(self)._kflo_mode
    crop = None
    if crops(param):
        shapes = param.__dict__.setdefault("_kflo_crops", {})
        if tuple(x.shape) not in shapes:
            shapes[tuple(x.shape)] = live_taps(self, tuple(x.shape))
        crop = shapes[tuple(x.shape)]
    if mode == "auto":
        key = (tuple(x.shape), torch.is_grad_enabled(), parametrize._cache_enabled > 0)  # noqa: SLF001
        forms = param.__dict__.setdefault("_kflo_forms", {})
        if key not in forms:
            forms[key] = choose_form(self, param, tuple(x.shape), crop)
        form = forms[key]
    else:
        form = mode
    if form == "feature":
        if crop is not None:
            return param.run_features(self, x, crop.padding, crop)
        return param.run_features(self, *padded_input(self, x))
    with parametrize.cached():
        amp = torch.is_autocast_enabled(x.device.type)
        if crop is not None:
            with torch.autocast(x.device.type, enabled=False) if amp else contextlib.nullcontext():
                weight = _cropped_weight(self, param, crop)  # composed in the factors' own precision
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(crop.taps) - 1]
            return conv(x, weight, self.bias, self.stride, crop.padding, self.dilation, self.groups)
        if amp:
            with torch.autocast(x.device.type, enabled=False):  # compose in the factors' own precision
                for name in self.parametrizations:
                    getattr(self, name)
        return type(self)._kflo_base.forward(self, x)


def _cropped_weight(module: nn.Module, param: Any, crop: Crop) -> torch.Tensor:
    """The kernel on the live taps only: sliced from the full composed kernel when that is composed anyway (a decay
    on it in training, or already cached, as for evaluation), else composed for those taps alone
    (``compose_taps``: the composition's cost falls with the taps)."""
    paid = torch.is_grad_enabled() and param.composition_paid()
    if paid or (id(module), "weight") in getattr(parametrize, "_cache", {}):
        return module.weight[(slice(None), slice(None), *crop.taps)]
    return param.compose_taps(crop)


_CLASSES: dict[tuple[type, str], type] = {}


def form_class(cls: type, mode: str) -> type:
    """A subclass of the layer class ``cls`` that runs in ``mode`` (``auto``, ``kernel`` or ``feature``); one class
    per (class, mode), so deep copies and pickling see ordinary classes."""
    key = (cls, mode)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{cls.__name__}{mode.capitalize()}Form", (cls,),
                             {"forward": _form_forward, "_kflo_mode": mode, "_kflo_base": cls,
                              "_kflo_padding": padding_kind(cls)})
    return _CLASSES[key]


def chosen_forms(model: nn.Module) -> dict[str, dict[tuple[int, ...], str]]:
    """Every auto layer's choices so far: layer name -> {input shape: form} (training-mode choices)."""
    out: dict[str, dict[tuple[int, ...], str]] = {}
    for name, module in model.named_modules():
        if getattr(type(module), "_kflo_mode", None) is None or not parametrize.is_parametrized(module):
            continue
        forms = module.parametrizations.weight[0].__dict__.get("_kflo_forms", {})
        out[name] = {shape: form for (shape, grad, _), form in forms.items() if grad}
    return out


__all__ = ["Crop", "FEATURE_MARGIN", "Factored", "MODES", "choose_form", "chosen_forms", "conv_output_size", "crops",
           "form_class", "kernel_macs", "layer_padding", "live_taps", "output_positions", "padded_input", "samples"]
