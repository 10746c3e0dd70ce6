"""A low-rank delta recipe for kflo: W' = W + U D with a rank-R pair, U starting at zero.

The worked example of kflo's docs/writing-a-recipe.md: a weight-space recipe declared as a ``RecipeSpec`` and
registered through the ``kflo.recipes`` entry-point group.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kflo_cli.reparam import Param, ParamRole, RecipeSpec


class LowRankDelta(nn.Module):
    """The effective weight ``base + (up @ down)``, reshaped to the layer's weight shape."""

    def __init__(self, weight_shape: torch.Size, rank: int) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        out, fan = weight_shape[0], math.prod(weight_shape[1:])
        self.base = nn.Parameter(torch.empty(weight_shape))
        self.down = nn.Parameter(torch.empty(rank, fan))
        self.up = nn.Parameter(torch.empty(out, rank))

    def forward(self) -> torch.Tensor:
        return self.base + (self.up @ self.down).reshape(self.weight_shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        # base = W and up = 0 reproduce the layer exactly; a random `down` lets `up` receive gradients.
        self.base.copy_(weight)
        self.down.normal_(0.0, 1.0 / math.sqrt(self.down.shape[1]))
        self.up.zero_()
        return ()

    def roles(self) -> dict[str, ParamRole]:
        # The base takes the run's weight decay; the delta factors none.
        return {"down": ParamRole("lowrank-factor", "none"), "up": ParamRole("lowrank-factor", "none")}


def make_parametrization(module: nn.Module, rank: int) -> nn.Module:
    """The factory: one parametrization per rewritten layer, from the resolved parameter values."""
    return LowRankDelta(module.weight.shape, rank)


def skip(name: str, module: nn.Module, rank: int) -> str | None:
    """Leave layers alone where a rank-R delta would not be low-rank."""
    out, fan = module.weight.shape[0], module.weight[0].numel()
    if rank >= min(out, fan):
        return f"rank {rank} is not below min(out, fan) = {min(out, fan)}"
    return None


def _check_rank(value: int) -> str | None:
    return None if value >= 1 else "the rank must be an integer >= 1"


SPEC = RecipeSpec(
    name="lowrank_delta",
    description="Low-rank delta: W' = W + U D with rank R, U = 0 at the start (kflo's plugin example)",
    params={"rank": Param(int, 4, "R, the rank of the delta: an integer >= 1", _check_rank)},
    factory=make_parametrization,
    skip=skip,
)
