"""Weight normalization: w = g * v / ||v|| per output channel (Salimans & Kingma, NeurIPS 2016).

A baseline of the weight compander paper. Every conv and linear weight is split into a direction ``v`` (the
weight's shape) and a length ``g`` (one per output channel, i.e. per row of the kernel flattened to
``out x in/groups*prod(k)``), initialised as ``v = w``, ``g = ||w||``, so expansion is function-preserving.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import register_recipe
from .base import ParamRole, WeightRecipe, weight_decay_penalty


class WeightNormParametrization(nn.Module):
    """``forward() = g * v / ||v||``, the norm taken over every dimension but the first."""

    def __init__(self, weight_shape: torch.Size) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.empty(weight_shape))
        self.g = nn.Parameter(torch.empty((weight_shape[0],) + (1,) * (len(weight_shape) - 1)))

    def _norm(self) -> torch.Tensor:
        dims = tuple(range(1, self.v.dim()))
        return torch.linalg.vector_norm(self.v, dim=dims, keepdim=True)

    def forward(self) -> torch.Tensor:
        return self.g * (self.v / self._norm())

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """``v = w``, ``g = ||w||`` per row. A zero row gets a random direction and ``g = 0``.

        A zero ``v`` would make ``v / ||v||`` undefined, and a zero ``g`` with a zero ``v`` would never receive a
        gradient; a random unit direction with ``g = 0`` keeps the row's weight exactly zero and trainable.
        """
        w = weight.detach().to(self.v.dtype)
        norms = torch.linalg.vector_norm(w.double(), dim=tuple(range(1, w.dim())), keepdim=True)
        dead = (norms == 0).expand_as(w)
        self.v.copy_(torch.where(dead, torch.randn_like(w), w))
        self.g.copy_(norms.to(self.g.dtype))
        return ()

    def roles(self) -> dict[str, ParamRole]:
        # Decay goes on the weight w through the recipe's penalty, as for the compander with fixed a, b.
        return {"v": ParamRole("weightnorm-v", "none"), "g": ParamRole("weightnorm-g", "none")}


@register_recipe
class WeightNorm(WeightRecipe):
    """Weight normalization on every Conv1d/2d/3d and Linear weight."""

    name = "weightnorm"
    description = "Weight normalization: w = g * v / ||v|| per output channel (Salimans & Kingma); a compander-paper baseline"
    params = {}

    def make_parametrization(self, name: str, module: nn.Module) -> nn.Module:
        return WeightNormParametrization(module.weight.shape)

    def penalty(self, module: nn.Module, weight_decay: float) -> torch.Tensor | None:
        """``weight_decay / 2 * ||w||^2`` on the effective weight, i.e. ``weight_decay / 2 * ||g||^2``."""
        return weight_decay_penalty(module, weight_decay)


__all__ = ["WeightNorm", "WeightNormParametrization"]
