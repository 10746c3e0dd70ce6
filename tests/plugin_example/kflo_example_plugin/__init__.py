"""A low-rank delta recipe for kflo: W' = W + U D with a rank-R pair, U starting at zero.

The worked example of kflo's docs/writing-a-recipe.md: a weight-space recipe declared as a ``RecipeSpec`` and
registered through the ``kflo.recipes`` entry-point group. It uses every rule a built-in recipe has: parameter
roles (with the decay on a factor or on the composed weight), step scales for adaptive optimizers, a reason to
skip a layer, and a check that refuses unusable values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kflo_cli.reparam import Param, ParamRole, RecipeSpec


class LowRankDelta(nn.Module):
    """The effective weight ``base + (up @ down)``, reshaped to the layer's weight shape."""

    def __init__(self, weight_shape: torch.Size, rank: int, decay: str) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.decay = decay
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
        # decay=base: the run's weight decay on `base` itself; decay=composed: on the composed weight W' instead
        # (a loss term wd/2 * ||W'||^2 that the trainer adds). The delta factors get none either way.
        target = "parameter" if self.decay == "base" else "composed"
        return {"base": ParamRole("lowrank-base", "default", decay_target=target),
                "down": ParamRole("lowrank-factor", "none"), "up": ParamRole("lowrank-factor", "none")}

    @torch.no_grad()
    def step_scales(self) -> dict[str, torch.Tensor]:
        # Multipliers of an adaptive optimizer's update (here: the delta factors move at half the base's pace).
        return {"down": torch.full_like(self.down, 0.5), "up": torch.full_like(self.up, 0.5)}


def make_parametrization(module: nn.Module, rank: int, decay: str) -> nn.Module:
    """The factory: one parametrization per rewritten layer, from the resolved parameter values."""
    return LowRankDelta(module.weight.shape, rank, decay)


def skip(name: str, module: nn.Module, rank: int, decay: str) -> str | None:
    """Leave layers alone where a rank-R delta would not be low-rank (the recipe does not apply there)."""
    out, fan = module.weight.shape[0], module.weight[0].numel()
    if rank >= min(out, fan):
        return f"rank {rank} is not below min(out, fan) = {min(out, fan)}"
    return None


def check(name: str, module: nn.Module, rank: int, decay: str) -> str | None:
    """Refuse a layer the recipe applies to whose values make the start unusable, naming the fix."""
    if not torch.isfinite(module.weight).all():
        return f"lowrank_delta: layer '{name}' has non-finite weights; start from a finite checkpoint or --exclude '{name}'"
    return None


def _check_rank(value: int) -> str | None:
    return None if value >= 1 else "the rank must be an integer >= 1"


SPEC = RecipeSpec(
    name="lowrank_delta",
    description="Low-rank delta: W' = W + U D with rank R, U = 0 at the start (kflo's plugin example)",
    params={
        "rank": Param(int, 4, "R, the rank of the delta: an integer >= 1", _check_rank),
        "decay": Param(str, "base", "where the run's weight decay goes: base, or composed (W')", choices=("base", "composed")),
    },
    factory=make_parametrization,
    skip=skip,
    check=check,
)
