"""Helpers about filtering layers that recipes share: which layers a weight-space recipe can rewrite, how a layer
pads, width rounding, and restoring a plain layer on collapse."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

FILTER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (``round_half_up(4.5) == 5``), unlike Python's banker's round."""
    return int(math.floor(x + 0.5))


def weight_space_problem(module: nn.Module) -> str | None:
    """Why a weight-space recipe cannot rewrite ``module`` (``None`` if it can)."""
    if not isinstance(module, FILTER_TYPES):
        return "not a Conv1d/2d/3d or Linear layer"
    if parametrize.is_parametrized(module):
        return "already parametrized"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return "has no weight parameter"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialised yet"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.numel() == 0:
        return f"its weight {tuple(weight.shape)} is empty"
    return None


def _timm_class(name: str) -> type | None:
    try:
        import timm.layers as layers
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return getattr(layers, name, None)


def padding_kind(layer: nn.Module | type) -> str | None:
    """How a filtering layer (or layer class) pads its input, for recipes that run convolutions of their own in its
    place: ``"static"`` (``nn.ConvNd``'s own rules), ``"tf-same"`` (timm's ``Conv2dSame``), ``"linear"``, or ``None``
    for a subclass whose forward may do anything with its weight (e.g. timm's ``StdConv2d`` standardises it)."""
    cls = layer if isinstance(layer, type) else parametrize.type_before_parametrizations(layer)
    if issubclass(cls, nn.Linear):
        return "linear" if cls.forward is nn.Linear.forward or cls is _timm_class("Linear") else None
    if cls is _timm_class("Conv2dSame"):
        return "tf-same"
    base = next((b for b in CONV_TYPES if issubclass(cls, b)), None)
    if base is not None and cls.forward is base.forward and cls._conv_forward is base._conv_forward:
        return "static"
    return None


def restore_plain(module: nn.Module, cls: type, param_order: Sequence[str], weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> nn.Module:
    """Turn a parametrized layer back into a plain ``cls`` with ordinary ``weight`` (and ``bias``) parameters, in
    ``param_order`` (recorded at expansion), so ``state_dict()`` keys keep the original architecture's order.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the parametrized class, which deep
    copies of the module share, so it would break the expanded model a collapsed copy was made from.
    """
    module.__class__ = cls
    del module.parametrizations
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    module._parameters = OrderedDict((k, module._parameters[k]) for k in param_order if k in module._parameters)
    return module


__all__ = ["CONV_TYPES", "FILTER_TYPES", "padding_kind", "restore_plain", "round_half_up", "weight_space_problem"]
