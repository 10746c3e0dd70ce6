"""Weight normalization: w = g * v / ||v|| per output channel (Salimans & Kingma, NeurIPS 2016).

A baseline of the weight compander paper. Every conv and linear weight is split into a direction ``v`` (the
weight's shape) and a length ``g`` (one per output channel, i.e. per row of the kernel flattened to
``out x in/groups*prod(k)``), initialised as ``v = w``, ``g = ||w||``, so expansion is function-preserving.

Why not ``torch.nn.utils.parametrizations.weight_norm``: it computes the same function, but its factors are the
parametrization's *inputs* (``parametrizations.weight.original0`` / ``original1``), while every kflo recipe owns
its factors (``parametrizations.weight.0.*``, the layout checkpoints since kflo 0.1 hold), and it starts a zero row
at ``v = 0, g = 0``, where ``v / ||v||`` is 0/0 and the row never trains again; here a zero row gets a random
direction with ``g = 0``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import LayerContext, ParamRole, WeightRecipe
from .registry import register_recipe


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
        # The decay goes on the weight w (i.e. on g, since ||w|| = |g| per row), as for the compander with fixed a, b.
        return {"v": ParamRole("weightnorm-v", "default", decay_target="composed"),
                "g": ParamRole("weightnorm-g", "default", decay_target="composed")}


@register_recipe
class WeightNorm(WeightRecipe):
    """Weight normalization on every Conv1d/2d/3d and Linear weight."""

    name = "weightnorm"
    description = "Weight normalization: w = g * v / ||v|| per output channel (Salimans & Kingma); a compander-paper baseline"
    params = {}

    def factor_count(self, layer: LayerContext) -> int:
        weight = layer.module.weight
        return weight.numel() + weight.shape[0]

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        return WeightNormParametrization(layer.module.weight.shape)


__all__ = ["WeightNorm", "WeightNormParametrization"]
