"""Weight compander: w = Psi(v) = a * f(v / b), f in {arctan, arsinh, erf} (Cakaj, Mehnert & Yang).

Every conv and linear weight (not biases, not norm layers) becomes ``Psi(v)`` of a new weight ``v`` initialised
with the inverse ``v = b * f^-1(w / a)``, so expansion is function-preserving. ``a`` and ``b`` are fixed
hyperparameters or learned: one pair per layer ("fine") or one pair for the whole network ("coarse"). ``a=auto``
picks each layer's a from its weights (the coarse pair: one for the whole network); see docs/recipes.md.
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
#: ``a=auto``'s margin: each layer's largest weight keeps at least this fraction of Psi's slope at 0, so it still
#: trains at half speed or more (for arctan: |w|/a <= pi/4).
AUTO_SLOPE_RATIO = 0.5
#: ``a=auto`` never goes below the paper's a (1.0, ResNet18 on CIFAR-10): a sets the regularisation's strength (the
#: bound a*pi/2 and the slope a/b at 0), so auto only raises it for the layers that need more.
AUTO_FLOOR = 1.0
#: Bounds of a and b (docs/recipes.md, "Parameter bounds"): the paper uses 0.5 to 1.0 and its learned values
#: stayed below 12; within these bounds v = b * f^-1(w / a) and Psi'(v) stay far inside float32's range.
MIN_SCALE, MAX_SCALE = 1e-3, 1e3


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
    #: the largest |f(t)| at which f'(t) >= AUTO_SLOPE_RATIO * f'(0) (``a=auto``'s margin).
    auto_ratio: float


def _ratio_at_slope(fn: str, s: float) -> float:
    """The |f(t)| at which f'(t) = s * f'(0): arctan ``acos(sqrt(s))``, arsinh ``acosh(1/s)``, erf
    ``erf(sqrt(ln(1/s)))``."""
    if fn == "arctan":
        return math.acos(math.sqrt(s))
    if fn == "arsinh":
        return math.acosh(1.0 / s)
    return math.erf(math.sqrt(math.log(1.0 / s)))


COMPANDERS = {
    "arctan": Compander("arctan", torch.atan, torch.tan, lambda t: 1.0 / (1.0 + t * t),
                        _ratio_at_slope("arctan", MIN_SLOPE_RATIO), _ratio_at_slope("arctan", AUTO_SLOPE_RATIO)),
    "arsinh": Compander("arsinh", torch.asinh, torch.sinh, lambda t: torch.rsqrt(1.0 + t * t),
                        _ratio_at_slope("arsinh", MIN_SLOPE_RATIO), _ratio_at_slope("arsinh", AUTO_SLOPE_RATIO)),
    "erf": Compander("erf", torch.erf, torch.erfinv, lambda t: (2.0 / math.sqrt(math.pi)) * torch.exp(-t * t),
                     _ratio_at_slope("erf", MIN_SLOPE_RATIO), _ratio_at_slope("erf", AUTO_SLOPE_RATIO)),
}


def _ceil_cent(x: float) -> float:
    """``x`` rounded up to 0.01 (a value people can type)."""
    return math.ceil(100.0 * x) / 100.0


def smallest_workable_a(max_abs_weight: float, fn: str) -> float:
    """The smallest ``a`` (rounded up to 0.01) for which weights up to ``max_abs_weight`` are representable."""
    return _ceil_cent(max_abs_weight / COMPANDERS[fn].max_ratio)


def auto_a(max_abs_weight: float, fn: str) -> float:
    """``a=auto`` for a layer whose weights reach ``max_abs_weight``: the smallest ``a`` (rounded up to 0.01) at
    which they keep :data:`AUTO_SLOPE_RATIO` of Psi's slope at 0, and at least :data:`AUTO_FLOOR`."""
    return max(AUTO_FLOOR, _ceil_cent(max_abs_weight / COMPANDERS[fn].auto_ratio))


class _FixedCompand(torch.autograd.Function):
    """``a * f(v / b)`` for fixed ``a`` and ``b``, saving only ``v`` for backward (the gradient
    ``a / b * f'(v / b)`` is recomputed there), instead of autograd's intermediates: one weight-sized tensor less
    per layer in a training step's peak memory (docs/performance.md)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, a: float | torch.Tensor, b: float, fn: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, a if isinstance(a, torch.Tensor) else None)
        ctx.scale, ctx.b, ctx.fn = a, b, fn
        return a * COMPANDERS[fn].f(v / b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        v, a = ctx.saved_tensors
        a = ctx.scale if a is None else a
        return grad * (a / ctx.b) * COMPANDERS[ctx.fn].slope(v / ctx.b), None, None, None


class CompanderParametrization(nn.Module):
    """``forward() = a * f(v / b)``.

    ``a`` and ``b`` are Python floats (fixed), this layer's own scalar parameters ("fine"), or scalar
    parameters shared with every other layer of the network ("coarse"). A fixed ``a`` given as a tensor (what
    ``a=auto`` chose for this layer) becomes a buffer, saved with the factors (``<layer>.parametrizations.weight.0.a``),
    so a checkpoint rebuilds the same function.
    """

    def __init__(self, weight_shape: torch.Size, fn: str, a: float | torch.Tensor, b: float | nn.Parameter) -> None:
        super().__init__()
        self.fn = fn
        self.v = nn.Parameter(torch.empty(weight_shape))
        self.learnable = isinstance(a, nn.Parameter)
        if isinstance(a, torch.Tensor) and not self.learnable:
            self.register_buffer("a", a.detach().clone())
        else:
            self.a = a
        self.b = b

    def forward(self) -> torch.Tensor:
        if not self.learnable and not isinstance(self.b, torch.Tensor):  # fixed a and b: the lean autograd form
            return _FixedCompand.apply(self.v, self.a, float(self.b), self.fn)
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


@register_recipe
class WeightCompander(WeightRecipe):
    """Weight compander on every Conv1d/2d/3d and Linear weight."""

    name = "compander"
    description = "Weight compander: w = a*f(v/b), f = arctan | arsinh | erf, fixed or learnable a, b (Cakaj et al.)"
    params = {
        "a": Param(float, 1.0, f"scale a: a number from {MIN_SCALE:g} to {MAX_SCALE:g}, or auto: per layer, the smallest a "
                   f">= {AUTO_FLOOR:g} at which the layer's largest weight keeps {AUTO_SLOPE_RATIO:.0%} of Psi's slope "
                   "(initial value when learnable; the paper: 1.0 for ResNet18 on CIFAR-10)",
                   low=MIN_SCALE, high=MAX_SCALE, keywords=("auto",)),
        "b": Param(float, 0.6, f"stretch b: a number from {MIN_SCALE:g} to {MAX_SCALE:g} (initial value when learnable; the "
                   "paper: 0.6 for ResNet18 on CIFAR-10)", low=MIN_SCALE, high=MAX_SCALE),
        "fn": Param(str, "arctan", "the function f: arctan, arsinh or erf", choices=tuple(COMPANDERS)),
        "learnable": Param(
            str, "none", "none (fixed a, b), coarse (one learned pair per network), fine (one per layer)",
            choices=("none", "coarse", "fine"),
        ),
    }

    def factor_count(self, layer: LayerContext) -> int:
        return layer.module.weight.numel() + 2

    def _spec_with(self, a: str) -> str:
        """This recipe's spec with ``a`` replaced, naming only the other values that differ from the defaults."""
        others = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.values.items()
                  if k != "a" and v != self.params[k].default]
        return f"{self.name}:" + ",".join([f"a={a}", *others])

    def check(self, layer: LayerContext) -> str | None:
        """Weights too close to the bound of f cannot be represented as Psi(v): name the ``a`` that works, as the
        ``--recipe`` to type. With ``a=auto``, record the network-wide value (the coarse pair starts there)."""
        problem = super().check(layer)
        if problem:
            return problem
        a, fn = self.values["a"], self.values["fn"]
        largest = _largest_weight(layer.module)
        if math.isinf(largest):
            return f"compander: layer '{layer.name}' has non-finite weights (nan or inf); start from a finite checkpoint"
        if a == "auto":
            chosen = auto_a(largest, fn)
            if chosen > MAX_SCALE:
                return (f"compander: layer '{layer.name}' has weights up to |w| = {largest:.4g}, so a=auto would need "
                        f"a = {chosen:g}, beyond the largest a ({MAX_SCALE:g}); --exclude '{layer.name}'")
            layer.shared["auto_a"] = max(layer.shared.get("auto_a", AUTO_FLOOR), chosen)
            return None
        if largest / a <= COMPANDERS[fn].max_ratio:
            return None
        # Name what works for the whole model too, so that one retry suffices.
        worst, worst_name = max((w, n) for n, m in layer.model.named_modules()
                                if n and self.considers(m) and weight_space_problem(m) is None
                                for w in (_largest_weight(m),) if math.isfinite(w))
        here = smallest_workable_a(largest, fn)
        best = smallest_workable_a(max(worst, largest), fn)
        whole = f" and a >= {best:g} for every layer (the largest weight is in '{worst_name}')" if worst > largest else ""
        return (
            f"compander: layer '{layer.name}' has weights up to |w| = {largest:.4g}, beyond what {fn} with a={a:g} "
            f"represents (|w|/a must stay <= {COMPANDERS[fn].max_ratio:.4g}, where Psi' keeps "
            f"{MIN_SLOPE_RATIO:.1%} of its slope at 0); use a >= {here:g} for this layer{whole}: "
            f"--recipe {self._spec_with(f'{best:g}')} or --recipe {self._spec_with('auto')} (an a per layer), "
            f"or --exclude '{layer.name}'"
        )

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        a, b, mode = self.values["a"], self.values["b"], self.values["learnable"]
        weight = layer.module.weight
        if a == "auto":
            if layer.rebuilding:
                a = AUTO_FLOOR  # a placeholder: the checkpoint's tensor (buffer or parameter) replaces it
            elif mode == "coarse":
                a = layer.shared.get("auto_a") or auto_a(_largest_weight(layer.module), self.values["fn"])
            else:
                a = auto_a(_largest_weight(layer.module), self.values["fn"])
            if mode == "none":  # a buffer, so the checkpoint records the value chosen for this layer
                a = torch.tensor(a, dtype=weight.dtype, device=weight.device)
        if mode == "none":
            pair: tuple = (a, b)
        elif mode == "coarse" and "pair" in layer.shared:
            pair = layer.shared["pair"]  # one learned (a, b) for the whole network, owned by its first layer
        else:
            pair = tuple(nn.Parameter(torch.tensor(x, dtype=weight.dtype, device=weight.device)) for x in (a, b))
            layer.shared["pair"] = pair
        return CompanderParametrization(weight.shape, self.values["fn"], *pair)


__all__ = ["AUTO_FLOOR", "AUTO_SLOPE_RATIO", "COMPANDERS", "MAX_SCALE", "MIN_SCALE", "MIN_SLOPE_RATIO", "Compander",
           "CompanderParametrization", "WeightCompander", "auto_a", "smallest_workable_a"]
