"""Each recipe's training rules, read from its parameter roles, for kflo's trainer and for users' own loops.

A :class:`~kflo_cli.reparam.ParamRole` is the whole rule of one parameter: how much it decays and whether that
decay applies to the parameter itself or to its layer's composed weight. Nothing here knows a recipe by name.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn

from .errors import KfloError
from .reparam import ORDINARY, ParamRole, Recipe
from .reparam.base import FACTOR_PREFIX
from .surgery import rewritten_layers

T = TypeVar("T")


def param_roles(model: nn.Module) -> dict[str, ParamRole]:
    """Role of every trainable parameter of ``model``, by its full name.

    Parameters of rewritten layers get the role their recipe gives them (e.g. KFLO's ``kflo-w1``: its decay goes on
    the composed kernel; ``kflo-cascade``: a fixed 1e-9); every other parameter is ``ordinary``.

    >>> import kflo_cli as kflo
    >>> m = kflo.expand(kflo.create_model("lenet5"), "kflo")
    >>> kflo.param_roles(m)["features.0.parametrizations.weight.0.w1"].decay_target
    'composed'
    """
    roles = {name: ORDINARY for name, p in model.named_parameters() if p.requires_grad}
    for layer_name, module, recipe in rewritten_layers(model):
        prefix = f"{layer_name}." if layer_name else ""
        for local, role in _named_by_parameter(recipe, layer_name, module, recipe.roles(module), "roles()").items():
            full = prefix + local
            if full in roles:  # frozen parameters keep no role
                roles[full] = role
    return roles


def _named_by_parameter(recipe: Recipe, layer_name: str, module: nn.Module, rules: dict[str, T],
                        hook: str) -> dict[str, T]:
    """``rules`` (a recipe's roles or step scales of one layer), refused when one names no parameter of the layer:
    a misspelt factor name would otherwise silently leave that factor on the ordinary rule."""
    names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    unknown = sorted(set(rules) - names)
    if unknown:
        own = ", ".join(sorted(n.removeprefix(FACTOR_PREFIX) for n in names)) or "none"
        raise KfloError(f"recipe '{recipe.name}' on layer '{layer_name}': {hook} names "
                        f"{', '.join(repr(n.removeprefix(FACTOR_PREFIX)) for n in unknown)}, which is not a parameter "
                        f"of the layer (its parameters: {own}); name the parametrization's own factors")
    return rules


def resolve_decay(role: ParamRole, weight_decay: float) -> float:
    """The number a role's ``weight_decay`` stands for in a run whose weight decay is ``weight_decay``."""
    if role.weight_decay == "none":
        return 0.0
    if role.weight_decay == "default":
        return float(weight_decay)
    return float(role.weight_decay)


def composed_decays(model: nn.Module, weight_decay: float) -> list[tuple[str, nn.Module, str, float]]:
    """``(layer name, layer, recipe name, decay)`` for every rewritten layer whose composed weight is decayed
    (some parameter of it has a role with ``decay_target="composed"``), with a non-zero decay.

    Raises:
        KfloError: one layer's roles ask for two different decays on its composed weight.
    """
    out = []
    for layer_name, module, recipe in rewritten_layers(model):
        wanted = {resolve_decay(role, weight_decay) for role in recipe.roles(module).values()
                  if role.decay_target == "composed"}
        if len(wanted) > 1:
            raise KfloError(f"recipe '{recipe.name}' asks for decays {sorted(wanted)} on the composed weight of layer "
                            f"'{layer_name}'; its roles must agree on one value")
        decay = wanted.pop() if wanted else 0.0
        if decay:
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise KfloError(f"recipe '{recipe.name}' decays the composed weight of layer '{layer_name}', which "
                                "this layer does not expose as .weight; give its roles decay_target='parameter'")
            out.append((layer_name, module, recipe.name, decay))
    return out


def decay_penalty(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """The loss term of every composed-weight decay: ``sum decay / 2 * ||W||^2`` over the layers that have one.

    The 1/2 makes the gradient ``decay * W``, what SGD's ``weight_decay`` does to a plain weight, so a composed
    weight is decayed exactly as hard as the vanilla layer's (the KFLO public code omits it: docs/kflo.md).
    Add it to the loss; give the optimizer the per-parameter decays of :func:`param_roles` (0 for parameters whose
    decay targets the composed weight).
    """
    total = None
    for _, module, _, decay in composed_decays(model, weight_decay):
        term = 0.5 * decay * module.weight.pow(2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def step_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-parameter multipliers of an adaptive optimizer's update (the compander's modified step)."""
    scales = {}
    for layer_name, module, recipe in rewritten_layers(model):
        prefix = f"{layer_name}." if layer_name else ""
        for local, scale in _named_by_parameter(recipe, layer_name, module, recipe.step_scales(module),
                                                "step_scales()").items():
            scales[prefix + local] = scale
    return scales


__all__ = ["composed_decays", "decay_penalty", "param_roles", "resolve_decay", "step_scales"]
