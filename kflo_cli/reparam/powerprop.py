"""Powerpropagation: w = v * |v|^(alpha - 1) (Schwarz et al., NeurIPS 2021), a baseline of the weight compander paper.

Every conv and linear weight becomes ``sign(v) |v|^alpha`` of a new weight ``v = sign(w) |w|^(1/alpha)``, so
expansion is function-preserving. Gradients are scaled by ``alpha |v|^(alpha-1)``: large weights move faster,
small ones barely (the "rich get richer" dynamic that makes the network prunable).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import LayerContext, Param, ParamRole, WeightRecipe
from .registry import register_recipe


class PowerpropParametrization(nn.Module):
    """``forward() = sign(v) * |v|^alpha`` (equal to ``v * |v|^(alpha-1)``, with a zero gradient at ``v = 0``)."""

    def __init__(self, weight_shape: torch.Size, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.v = nn.Parameter(torch.empty(weight_shape))

    def forward(self) -> torch.Tensor:
        # sign * |v|^alpha rather than v * |v|^(alpha-1): the latter's backward is 0 * inf = nan at v = 0
        # for 1 < alpha < 2.
        return torch.sign(self.v) * self.v.abs().pow(self.alpha)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """``v = sign(w) * |w|^(1/alpha)``, computed in float64."""
        w = weight.detach().double()
        self.v.copy_((torch.sign(w) * w.abs().pow(1.0 / self.alpha)).to(self.v.dtype))
        return ()

    @torch.no_grad()
    def slope(self) -> torch.Tensor:
        """``dw/dv = alpha * |v|^(alpha-1)``, elementwise, detached."""
        return self.alpha * self.v.abs().pow(self.alpha - 1.0)

    def step_scales(self) -> dict[str, torch.Tensor]:
        """``alpha |v|^(alpha-1)`` for ``v``: Powerpropagation's modified adaptive step (see docs/recipes.md)."""
        return {"v": self.slope()}

    def roles(self) -> dict[str, ParamRole]:
        # The decay goes on the weight w, not on v, as for the compander with fixed a, b.
        return {"v": ParamRole("powerprop-v", "default", decay_target="composed")}


#: The ceiling of alpha (docs/recipes.md, "Parameter bounds"): alpha is a small exponent (default 2); at 16,
#: |v|^alpha already spans float32's whole range for |v| between about 0.004 and 250.
MAX_ALPHA = 16.0


@register_recipe
class Powerprop(WeightRecipe):
    """Powerpropagation on every Conv1d/2d/3d and Linear weight."""

    name = "powerprop"
    description = "Powerpropagation: w = v*|v|^(alpha-1) (Schwarz et al.); a baseline of the weight compander paper"
    params = {"alpha": Param(float, 2.0, f"the exponent alpha: a number from 1 to {MAX_ALPHA:g} (alpha = 1 is the "
                             "plain weight)", low=1.0, high=MAX_ALPHA)}

    def factor_count(self, layer: LayerContext) -> int:
        return layer.module.weight.numel()

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        return PowerpropParametrization(layer.module.weight.shape, self.values["alpha"])


__all__ = ["MAX_ALPHA", "Powerprop", "PowerpropParametrization"]
