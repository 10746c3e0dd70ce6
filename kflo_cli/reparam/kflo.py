"""KFLO: Kernel Filtering Linear Over-parameterization (Henig & Giryes).

The effective kernel of a filtering layer, flattened to ``(out, in/groups * prod(kernel))``, is the product
``W_B ... W_2 W_1`` of a filtered kernel ``W_1`` (``R x F`` with ``R = round(rho * out)``) and a linear
cascade of pointwise maps (``R x R`` ... ``out x R``). The layer's own forward runs on the composed kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import KfloError
from .base import LayerContext, Param, ParamRole, WeightRecipe
from .layers import round_half_up
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
        roles = {"w1": ParamRole("kflo-w1", "default", decay_target="composed")}
        for i in range(len(self.cascade)):
            roles[f"cascade.{i}"] = ParamRole("kflo-cascade", CASCADE_DECAY)
        return roles


def _check_depth(v: int) -> str | None:
    return None if v >= 2 else "the linear depth multiplier B must be an integer >= 2"


def _check_width(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "the width multiplier rho must be a number > 0"


@register_recipe
class Kflo(WeightRecipe):
    """KFLO BxRHO on every Conv1d/2d/3d and Linear layer (including timm's weight-reading subclasses)."""

    name = "kflo"
    description = "Kernel Filtering Linear Over-parameterization: W' = W_B...W_2 W_1 (Henig & Giryes)"
    params = {
        "depth": Param(int, 2, "B, the linear depth multiplier: an integer >= 2", _check_depth),
        "width": Param(float, 4.0, "rho, the width multiplier: a number > 0", _check_width),
    }

    stacks_weights = True

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        return KfloParametrization(layer.module.weight.shape, self.values["depth"], self.values["width"])

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


__all__ = ["CASCADE_DECAY", "Kflo", "KfloParametrization", "kflo_width"]
