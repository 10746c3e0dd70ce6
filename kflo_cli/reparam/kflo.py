"""KFLO: Kernel Filtering Linear Over-parameterization (Henig & Giryes).

The effective kernel of a filtering layer, flattened to ``(out, in/groups * prod(kernel))``, is the product
``W_B ... W_2 W_1`` of a filtered kernel ``W_1`` (``R x F`` with ``R = round(rho * out)``) and a linear
cascade of pointwise maps (``R x R`` ... ``out x R``). The layer runs either on the composed kernel or through the
factors (``mode``; :mod:`kflo_cli.reparam.execution`), the same function.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KfloError
from .base import LayerContext, Param, ParamRole, Shorthand, WeightRecipe
from .execution import MODES, Crop, form_class, layer_padding, output_positions, samples
from .layers import padding_kind, round_half_up
from .registry import register_recipe

#: Weight decay the paper puts on the cascade W_2..W_B.
CASCADE_DECAY = 1e-9


def kflo_width(out_features: int, width: float) -> int:
    """The cascade width ``round(rho * out)``, halves rounded up, at least 1."""
    return max(1, round_half_up(width * out_features))


class KfloParametrization(nn.Module):
    """Holds ``w1`` (R x F) and ``cascade`` (B-1 matrices); ``forward()`` returns the layer-shaped kernel."""

    def __init__(self, weight_shape: torch.Size, depth: int, width: float) -> None:
        super().__init__()
        out = weight_shape[0]
        fan = math.prod(weight_shape[1:])
        rows = kflo_width(out, width)
        self.weight_shape = tuple(weight_shape)
        self.w1 = nn.Parameter(torch.empty(rows, fan))
        shapes = [(rows, rows)] * (depth - 2) + [(out, rows)]
        self.cascade = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])
        self.exact_start = True
        #: the paper's rule: the run's decay on the composed kernel (set False by ``decay=factors``)
        self.decay_composed = True

    def composed_matrix(self) -> torch.Tensor:
        """The product ``W_B ... W_1`` as an ``out x F`` matrix (multiplied in the cheapest order)."""
        mats = [m for m in reversed(self.cascade)] + [self.w1]
        return torch.linalg.multi_dot(mats)

    def forward(self) -> torch.Tensor:
        return self.composed_matrix().reshape(self.weight_shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """Initialise the factors so that the composed kernel equals ``weight`` (function-preserving start).

        With ``R >= out``: ``W_1 = [W; random rows]``, cascade ``[I | 0]``. With ``F <= R < out``:
        ``W_1 = [I; 0]`` and the last cascade matrix ``[W | 0]``. With ``R < min(out, F)`` no exact
        factorisation exists in general: the start is the best rank-R approximation (truncated SVD) and
        ``exact_start`` is set to False.
        """
        out, rows = self.cascade[-1].shape
        fan = self.w1.shape[1]
        w = weight.reshape(out, fan).to(self.w1.dtype)
        for m in self.cascade[:-1]:
            m.copy_(torch.eye(rows, dtype=m.dtype, device=m.device))
        last = self.cascade[-1]
        self.exact_start = True
        if rows >= out:
            bound = 1.0 / math.sqrt(fan)
            self.w1.uniform_(-bound, bound)
            self.w1[:out].copy_(w)
            last.zero_()
            last[:, :out].copy_(torch.eye(out, dtype=last.dtype, device=last.device))
        elif rows >= fan:
            self.w1.zero_()
            self.w1[:fan].copy_(torch.eye(fan, dtype=w.dtype, device=w.device))
            last.zero_()
            last[:, :fan].copy_(w)
        else:
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            root = s[:rows].sqrt()
            self.w1.copy_((root[:, None] * vh[:rows]).to(w.dtype))
            last.copy_((u[:, :rows] * root[None, :]).to(w.dtype))
            # exact iff the discarded singular values vanish (matrix_rank's default tolerance, without a second SVD)
            tol = s.max() * max(w.shape) * torch.finfo(torch.float64).eps
            self.exact_start = bool((s[rows:] <= tol).all())
        return ()

    def roles(self) -> dict[str, ParamRole]:
        # The paper: the vanilla decay on the composed kernel W' (none on W_1 itself), 1e-9 on the cascade.
        # decay=factors: the vanilla decay on W_1 itself (no composition needed for it), the cascade as before.
        target = "composed" if self.decay_composed else "parameter"
        roles = {"w1": ParamRole("kflo-w1", "default", decay_target=target)}
        for i in range(len(self.cascade)):
            roles[f"cascade.{i}"] = ParamRole("kflo-cascade", CASCADE_DECAY)
        return roles

    # -- the execution forms (kflo_cli.reparam.execution.Factored) --------------------------------------------

    def feature_supported(self, module: nn.Module) -> bool:
        """The feature form runs W_1 as a convolution with R output channels: not for grouped convolutions (each
        row of W' reads one group, a row of W_1 would read them all) nor layers whose forward is their own."""
        return getattr(module, "groups", 1) == 1 and layer_padding(module) is not None

    def run_features(self, module: nn.Module, x: torch.Tensor, padding: object, crop: Crop | None = None) -> torch.Tensor:
        """W_1 as a layer with R outputs (on the live taps only, with ``crop``), then each cascade matrix as a
        pointwise map; the layer's bias last."""
        bias = module.bias
        last = len(self.cascade) - 1
        if isinstance(module, nn.Linear):
            y = F.linear(x, self.w1)
            for i, m in enumerate(self.cascade):
                y = F.linear(y, m, bias if i == last else None)
            return y
        dims = len(self.weight_shape) - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        w1 = self.w1.view(self.w1.shape[0], *self.weight_shape[1:])
        if crop is not None:
            w1 = w1[(slice(None), slice(None), *crop.taps)]
        y = conv(x, w1, None, module.stride, padding, module.dilation)
        ones = (1,) * dims
        for i, m in enumerate(self.cascade):
            y = conv(y, m.view(*m.shape, *ones), bias if i == last else None)
        return y

    def _fan(self, crop: Crop | None) -> int:
        """F, the columns of W_1 a forward uses: all, or those of the live taps."""
        fan = self.w1.shape[1]
        if crop is None:
            return fan
        kernel = self.weight_shape[2:]
        return fan // math.prod(kernel) * crop.kept(kernel)

    def feature_macs(self, module: nn.Module, x_shape: tuple[int, ...], crop: Crop | None = None) -> float:
        if not self.feature_supported(module):
            return math.inf
        per_position = self.w1.shape[0] * self._fan(crop) + sum(m.numel() for m in self.cascade)
        return float(samples(module, x_shape) * output_positions(module, x_shape) * per_position)

    def composition_macs(self, crop: Crop | None = None) -> float:
        """The cascade's product (``(B-2) out R^2``), then times W_1 (``out R F``; F of the live taps with ``crop``)."""
        out, rows = self.cascade[-1].shape
        return float((len(self.cascade) - 1) * out * rows * rows + out * rows * self._fan(crop))

    def compose_taps(self, crop: Crop) -> torch.Tensor:
        """The composed kernel on the live taps only: ``W_B ... W_2 (W_1 restricted to their columns)``, the
        kernel's slice ``W'[:, :, taps]`` at a fraction of the composition's cost."""
        rows = self.w1.shape[0]
        w1 = self.w1.view(rows, *self.weight_shape[1:])[(slice(None), slice(None), *crop.taps)]
        shape = w1.shape[1:]
        mats = [m for m in reversed(self.cascade)] + [w1.reshape(rows, -1)]
        return torch.linalg.multi_dot(mats).reshape(self.weight_shape[0], *shape)

    def composition_paid(self) -> bool:
        return self.decay_composed


#: Bounds of B and rho (docs/recipes.md, "Parameter bounds"): the paper uses B = 2, 3 and rho = 1 to 4 (rho = the
#: number of networks for transfer learning). At either ceiling, with the other parameter at its default, the
#: factors of a 512 x 512 x 3 x 3 convolution stay below 2^31 elements.
MAX_DEPTH = 16
MAX_WIDTH = 64.0

_SHORTHAND = re.compile(r"\s*(\d+)\s*[xX]\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_shorthand(text: str) -> dict[str, str] | None:
    """The papers' "KFLO BxRHO": ``2x4`` is ``depth=2,width=4`` (B, the linear depth multiplier, comes first);
    ``None`` when ``text`` is not of that form."""
    match = _SHORTHAND.fullmatch(text)
    return None if match is None else {"depth": match.group(1), "width": match.group(2)}


@register_recipe
class Kflo(WeightRecipe):
    """KFLO BxRHO on every Conv1d/2d/3d and Linear layer (including timm's weight-reading subclasses)."""

    name = "kflo"
    description = "Kernel Filtering Linear Over-parameterization: W' = W_B...W_2 W_1 (Henig & Giryes)"
    params = {
        "depth": Param(int, 2, f"B, the linear depth multiplier: an integer from 2 to {MAX_DEPTH}", low=2, high=MAX_DEPTH),
        "width": Param(float, 4.0, f"rho, the width multiplier: a number > 0 and at most {MAX_WIDTH:g}", low=0.0,
                       high=MAX_WIDTH, low_open=True),
        "mode": Param(str, "auto", "how the layer runs: kernel (compose W' and run the layer on it), feature (W_1 as a "
                      "layer with R outputs, then the cascade as pointwise maps: the paper's form) or auto (the "
                      "cheaper of the two for the input shape each layer sees; docs/performance.md)", choices=MODES),
        "decay": Param(str, "composed", "where the run's weight decay goes: composed (on W', the paper's rule; "
                       "training then composes W' every step) or factors (on W_1; the cascade keeps 1e-9)",
                       choices=("composed", "factors")),
    }
    shorthand = Shorthand("BxRHO", "depth=B,width=RHO", "2x4", parse_shorthand)
    size_params = ("depth", "width")

    stacks_weights = True

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        param = KfloParametrization(layer.module.weight.shape, self.values["depth"], self.values["width"])
        param.decay_composed = self.values["decay"] == "composed"
        return param

    def forward_class(self, layer: LayerContext) -> type | None:
        mode = self.values["mode"]
        if padding_kind(layer.module) is None:
            return None  # a forward of its own (timm's StdConv2d): it runs on the composed kernel
        if getattr(layer.module, "groups", 1) != 1:
            mode = "kernel"  # a row of W_1 would read every group: the kernel form only
        # the kernel form too runs through execution.py: it crops taps that only read padding (live_taps)
        return form_class(type(layer.module), mode)

    def factor_count(self, layer: LayerContext) -> int:
        """``R*F + (B-2)*R^2 + out*R``, the elements of W_1, the middle matrices and W_B."""
        shape = layer.module.weight.shape
        out, fan = shape[0], math.prod(shape[1:])
        rows = kflo_width(out, self.values["width"])
        return rows * fan + (self.values["depth"] - 2) * rows * rows + out * rows

    def initialize(self, layer: LayerContext, parametrization: nn.Module) -> str | None:
        super().initialize(layer, parametrization)
        if parametrization.exact_start:
            return None
        out, rows = parametrization.cascade[-1].shape
        needed = min(out, parametrization.w1.shape[1])
        return (f"kflo: layer '{layer.name}' keeps only a rank-{rows} approximation of its kernel (width="
                f"{self.values['width']:g} gives R={rows} < min(out, fan-in) = {needed}), so the expansion does not "
                f"preserve its function; raise width to {needed / out:.3g} or more to preserve it")

    @torch.no_grad()
    def stack_weights(self, layer: LayerContext, weights: list[torch.Tensor]) -> None:
        """KFLO transfer learning (paper section 4.1): the i-th further network's kernel fills rows
        ``out*i .. out*(i+1)`` of W_1. The layer was expanded from the first network, so W_1's first ``out`` rows
        hold its kernel and the cascade is ``[I | 0]``: the start still reproduces the first network exactly.
        Needs ``R >= out * (1 + len(weights))``, i.e. rho at least the number of networks."""
        param = self.parametrization(layer.module)
        out = param.cascade[-1].shape[0]
        needed = out * (1 + len(weights))
        if param.w1.shape[0] < needed:
            raise KfloError(
                f"layer '{layer.name}': W_1 has {param.w1.shape[0]} rows but {1 + len(weights)} networks need {needed}; "
                f"use width >= {1 + len(weights)} (rho = number of pretrained networks)"
            )
        for i, weight in enumerate(weights, start=1):
            param.w1[out * i : out * (i + 1)].copy_(weight.reshape(out, -1).to(param.w1.dtype))


__all__ = ["CASCADE_DECAY", "MAX_DEPTH", "MAX_WIDTH", "Kflo", "KfloParametrization", "kflo_width", "parse_shorthand"]
