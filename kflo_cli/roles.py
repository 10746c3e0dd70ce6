"""Per-parameter training roles and recipe penalties, for the trainer and for users' own training loops."""

from __future__ import annotations

import torch
import torch.nn as nn

from .reparam import ORDINARY, ParamRole
from .surgery import rewritten_layers


def param_roles(model: nn.Module) -> dict[str, ParamRole]:
    """Role of every trainable parameter of ``model``, by its full name.

    Parameters of rewritten layers get the role their recipe gives them (e.g. KFLO's ``kflo-w1``: no decay;
    ``kflo-cascade``: a fixed 1e-9); every other parameter is ``ordinary``.

    >>> import kflo_cli as kflo
    >>> m = kflo.expand(kflo.create_model("lenet5"), "kflo")
    >>> kflo.param_roles(m)["features.0.parametrizations.weight.0.w1"].weight_decay  # doctest: +SKIP
    'none'
    """
    roles = {name: ORDINARY for name, p in model.named_parameters() if p.requires_grad}
    for layer_name, module, recipe in rewritten_layers(model):
        prefix = f"{layer_name}." if layer_name else ""
        for local, role in recipe.roles(module).items():
            full = prefix + local
            if full in roles:
                roles[full] = role
    return roles


def decay_penalty(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """Sum of the recipes' penalty terms (e.g. KFLO's decay on composed kernels) to add to the loss."""
    total = None
    for _, module, recipe in rewritten_layers(model):
        term = recipe.penalty(module, weight_decay)
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def step_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-parameter multipliers of an adaptive optimizer's update (the compander's modified step)."""
    scales = {}
    for layer_name, module, recipe in rewritten_layers(model):
        prefix = f"{layer_name}." if layer_name else ""
        for local, scale in recipe.step_scales(module).items():
            scales[prefix + local] = scale
    return scales


__all__ = ["decay_penalty", "param_roles", "step_scales"]
