"""Weight compander: w = Psi(v) = a * f(v / b), f in {arctan, arsinh, erf} (Cakaj, Mehnert & Yang).

Every conv and linear weight (not biases, not norm layers) becomes ``Psi(v)`` of a new weight ``v`` initialised
with the inverse ``v = b * f^-1(w / a)``, so expansion is function-preserving. ``a`` and ``b`` are fixed
hyperparameters or learned: one pair per layer ("fine") or one pair for the whole network ("coarse").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import KfloError
from .base import LayerContext, Param, ParamRole, WeightRecipe
from .layers import weight_space_problem
from .registry import register_recipe

#: A weight is representable when Psi keeps at least this fraction of its slope at 0 there. Closer to the
#: bound of f (arctan's pi/2, erf's 1), v = Psi^-1(w) explodes and gradient steps on it shrink by more than
#: 1000x: the weight is frozen in practice. For arctan this allows |w|/a up to 0.98 * pi/2.
MIN_SLOPE_RATIO = 1e-3


@dataclass(frozen=True)
class Compander:
    """One odd S-shaped function f with its inverse, its derivative and the largest usable ``|w| / a``."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    #: f'(t) as a function of t.
    slope: Callable[[torch.Tensor], torch.Tensor]
    #: the largest |f(t)| at which f'(t) >= MIN_SLOPE_RATIO * f'(0).
    max_ratio: float


COMPANDERS = {
    "arctan": Compander(
        "arctan", torch.atan, torch.tan, lambda t: 1.0 / (1.0 + t * t), math.acos(math.sqrt(MIN_SLOPE_RATIO))
    ),
    "arsinh": Compander(
        "arsinh", torch.asinh, torch.sinh, lambda t: torch.rsqrt(1.0 + t * t), math.acosh(1.0 / MIN_SLOPE_RATIO)
    ),
    "erf": Compander(
        "erf",
        torch.erf,
        torch.erfinv,
        lambda t: (2.0 / math.sqrt(math.pi)) * torch.exp(-t * t),
        math.erf(math.sqrt(math.log(1.0 / MIN_SLOPE_RATIO))),
    ),
}


def smallest_workable_a(max_abs_weight: float, fn: str) -> float:
    """The smallest ``a`` (rounded up to 0.01) for which weights up to ``max_abs_weight`` are representable."""
    return math.ceil(100.0 * max_abs_weight / COMPANDERS[fn].max_ratio) / 100.0


class CompanderParametrization(nn.Module):
    """``forward() = a * f(v / b)``.

    ``a`` and ``b`` are Python floats (fixed), this layer's own scalar parameters ("fine"), or scalar
    parameters shared with every other layer of the network ("coarse").
    """

    def __init__(self, weight_shape: torch.Size, fn: str, a: float | nn.Parameter, b: float | nn.Parameter) -> None:
        super().__init__()
        self.fn = fn
        self.v = nn.Parameter(torch.empty(weight_shape))
        self.learnable = isinstance(a, nn.Parameter)
        self.a = a
        self.b = b

    def forward(self) -> torch.Tensor:
        return self.a * COMPANDERS[self.fn].f(self.v / self.b)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """``v = b * f^-1(w / a)``, computed in float64; refuses weights too close to the bound of f."""
        a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (self.a, self.b))
        comp = COMPANDERS[self.fn]
        ratio = weight.detach().double() / a
        largest = ratio.abs().max().item() if ratio.numel() else 0.0
        if not (math.isfinite(largest) and largest <= comp.max_ratio):
            hint = f"use a >= {smallest_workable_a(largest * a, self.fn):g}" if math.isfinite(largest) else "start from finite weights"
            raise KfloError(f"compander: weights up to |w| = {largest * a:.4g} are beyond what {self.fn} "
                            f"with a={a:g} represents; {hint}")
        self.v.copy_((b * comp.inverse(ratio)).to(self.v.dtype))
        return ()

    @torch.no_grad()
    def slope(self) -> torch.Tensor:
        """``Psi'(v) = (a / b) * f'(v / b)``, elementwise, detached."""
        return (self.a / self.b) * COMPANDERS[self.fn].slope(self.v / self.b)

    def step_scales(self) -> dict[str, torch.Tensor]:
        """``Psi'(v)`` for ``v``: the factor of the paper's modified adaptive step (see docs/recipes.md)."""
        return {"v": self.slope()}

    def roles(self) -> dict[str, ParamRole]:
        if not self.learnable:
            # Fixed a, b: the decay goes on the weight Psi(v), not on v (paper III-A2).
            return {"v": ParamRole("compander-v", "default", decay_target="composed")}
        # Learnable a, b: decay on v only, none on a and b (paper III-B).
        return {"v": ParamRole("compander-v", "default"), "a": ParamRole("compander-a", "none"),
                "b": ParamRole("compander-b", "none")}


def _largest_weight(module: nn.Module) -> float:
    """``max |w|`` of a layer's weight (``inf`` if it holds a non-finite value)."""
    weight = module.weight.detach()
    largest = weight.abs().max().item() if weight.numel() else 0.0
    return largest if math.isfinite(largest) else math.inf


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a number > 0"


@register_recipe
class WeightCompander(WeightRecipe):
    """Weight compander on every Conv1d/2d/3d and Linear weight."""

    name = "compander"
    description = "Weight compander: w = a*f(v/b), f = arctan | arsinh | erf, fixed or learnable a, b (Cakaj et al.)"
    params = {
        "a": Param(float, 1.0, "scale a > 0 (initial value when learnable; the paper: 1.0 for ResNet18 on CIFAR-10)", _positive),
        "b": Param(float, 0.6, "stretch b > 0 (initial value when learnable; the paper: 0.6 for ResNet18 on CIFAR-10)", _positive),
        "fn": Param(str, "arctan", "the function f: arctan, arsinh or erf", choices=tuple(COMPANDERS)),
        "learnable": Param(
            str, "none", "none (fixed a, b), coarse (one learned pair per network), fine (one per layer)",
            choices=("none", "coarse", "fine"),
        ),
    }

    def check(self, layer: LayerContext) -> str | None:
        """Weights too close to the bound of f cannot be represented as Psi(v): name the ``a`` that works."""
        a, fn = self.values["a"], self.values["fn"]
        largest = _largest_weight(layer.module)
        if largest / a <= COMPANDERS[fn].max_ratio:
            return None
        if math.isinf(largest):
            return f"compander: layer '{layer.name}' has non-finite weights (nan or inf); start from a finite checkpoint"
        # Name what works for the whole model too, so that one retry suffices.
        worst, worst_name = max((w, n) for n, m in layer.model.named_modules()
                                if n and self.considers(m) and weight_space_problem(m) is None
                                for w in (_largest_weight(m),) if math.isfinite(w))
        whole = f" and a >= {smallest_workable_a(worst, fn):g} for every layer (the largest weight is in '{worst_name}')"
        return (
            f"compander: layer '{layer.name}' has weights up to |w| = {largest:.4g}, beyond what {fn} with a={a:g} "
            f"represents (|w|/a must stay <= {COMPANDERS[fn].max_ratio:.4g}, where Psi' keeps "
            f"{MIN_SLOPE_RATIO:.1%} of its slope at 0); use a >= {smallest_workable_a(largest, fn):g} for this layer"
            f"{whole if worst > largest else ''}, or --exclude '{layer.name}'"
        )

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        a, b, mode = self.values["a"], self.values["b"], self.values["learnable"]
        weight = layer.module.weight
        if mode == "none":
            pair: tuple = (a, b)
        elif mode == "coarse" and "pair" in layer.shared:
            pair = layer.shared["pair"]  # one learned (a, b) for the whole network, owned by its first layer
        else:
            pair = tuple(nn.Parameter(torch.tensor(x, dtype=weight.dtype, device=weight.device)) for x in (a, b))
            layer.shared["pair"] = pair
        return CompanderParametrization(weight.shape, self.values["fn"], *pair)


__all__ = ["COMPANDERS", "MIN_SLOPE_RATIO", "Compander", "CompanderParametrization", "WeightCompander", "smallest_workable_a"]
