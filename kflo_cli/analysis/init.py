"""The "contracted initialisation" baseline of ExpandNets (Guo, Alvarez & Salzmann, NeurIPS 2020), section 5.3,
hypothesis 1: "the standard initialization of our ExpandNets is in fact equivalent to a non-standard
initialization of the compact network", so the compact network is trained from an *untrained* expansion,
algebraically collapsed. If that baseline matched the trained expansion, the expansion's gain would be an
initialisation effect rather than over-parameterisation.

What "untrained expansion" means per recipe (kflo's defaults start an expansion from the compact weights, i.e.
function-preserving, and the collapse of such a start *is* the vanilla initialisation, a useless baseline):

- ``expandnet-cl``, ``expandnet-ck``, ``expandnet-fc``: ``init=random``, the paper's own start: every link
  initialised as a fresh layer of its shape (PyTorch's default Conv/Linear initialisation, weights and biases;
  the composed bias is collapsed too). ``init=auto`` is turned into ``init=random``; ``init=preserve`` and the
  nonlinear counterpart (``nonlinear=...``, which does not collapse) are refused.
- ``kflo``: the recipe has only the function-preserving start (``W_1 = [W; random rows]``, cascade ``[I | 0]``),
  so the factors are drawn afresh as the layers they would be if trained from scratch: ``W_1`` (R x F) as a new
  layer with F inputs and R outputs, each cascade matrix (out x R or R x R) as a new 1x1 layer with R inputs,
  all with PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform(a=sqrt(5))``), drawn in
  layer order, ``W_1`` first, from a generator seeded with ``seed``. The layer's bias is not a factor and keeps
  the compact model's initialisation.
- other recipes (DO-Conv, ACNet, compander, Powerpropagation, weight normalisation) start function-preserving and
  have no fresh-layer start: refused with one sentence.

Layers no recipe rewrites (and all biases and BatchNorm parameters outside rewritten layers) keep the compact
model's own initialisation, drawn with ``torch.manual_seed(seed)`` exactly as ``kflo expand`` / ``kflo train``
build the model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import KfloError

#: The recipes with a defined untrained expansion (module docstring).
SUPPORTED = ("expandnet-cl", "expandnet-ck", "expandnet-fc", "kflo")


def _untrained_selections(spec: Any) -> list[Any]:
    """The spec's selections with each recipe set to its untrained (fresh-layer) start."""
    from dataclasses import replace

    from ..surgery import as_selections

    out = []
    for sel in as_selections(spec):
        recipe = sel.recipe
        if recipe.name not in SUPPORTED:
            raise KfloError(f"recipe '{recipe.name}' starts from the compact weights (its expansion preserves the "
                            "function), so its untrained collapse is the vanilla initialisation; contracted "
                            f"initialisation is defined for {', '.join(SUPPORTED)}")
        if recipe.name.startswith("expandnet"):
            values = dict(recipe.values)
            if values.get("nonlinear", "none") != "none":
                raise KfloError(f"{recipe.name}: nonlinear={values['nonlinear']} is the nonlinear counterpart, which "
                                "does not collapse; drop nonlinear for a contracted initialisation")
            if values.get("init") == "preserve":
                raise KfloError(f"{recipe.name}: init=preserve starts from the compact weights, so its collapse is "
                                "the vanilla initialisation; drop init (init=random is used)")
            values["init"] = "random"
            recipe = type(recipe)(**values)
        out.append(replace(sel, recipe=recipe))
    return out


@torch.no_grad()
def fresh_kflo_factors(model: nn.Module, seed: int) -> int:
    """Redraw every KFLO layer's factors of expanded ``model`` as fresh layers (module docstring); returns how many
    layers were redrawn."""
    from ..record import record
    from ..reparam.kflo import KfloParametrization

    generator = torch.Generator().manual_seed(int(seed))
    count = 0
    for layer in record(model).layers:
        module = model.get_submodule(layer.name)
        parametrization = module.parametrizations.weight[0]
        if not isinstance(parametrization, KfloParametrization):
            continue
        for factor in [parametrization.w1, *parametrization.cascade]:
            bound = 1.0 / math.sqrt(factor.shape[1])
            fresh = torch.empty(factor.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
            factor.copy_(fresh.to(factor.dtype))
        parametrization.exact_start = False
        count += 1
    return count


def contracted_init(model_name_or_model: str | nn.Module, spec: Any, seed: int = 0,
                    model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The compact model initialised with a collapsed, untrained expansion (ExpandNets 5.3, hypothesis 1).

    Args:
        model_name_or_model: a model name (built with ``torch.manual_seed(seed)`` and ``model_kwargs``, as
            ``kflo expand`` builds it) or a model built by :func:`kflo_cli.create_model` (copied, not changed).
        spec: the expansion's recipe(s), as :func:`kflo_cli.expand` takes them; see the module docstring for
            what each recipe's untrained start is.
        seed: seeds the model, the recipe's random start and KFLO's fresh factors.
        model_kwargs: constructor arguments for a model name (``num_classes``, ``in_chans``).

    Returns:
        A plain model of the original architecture (its record: the plain model, not "collapsed from", because
        nothing was trained), in the model's dtype.
    """
    from ..pipeline import expand_model
    from ..record import update_record
    from ..surgery import collapse, copy_model

    selections = _untrained_selections(spec)
    if isinstance(model_name_or_model, nn.Module):
        if model_kwargs:
            raise KfloError("model_kwargs apply to a model name; this model is already built")
        net: str | nn.Module = copy_model(model_name_or_model)
    else:
        net = model_name_or_model
    expanded = expand_model(net, selections, model_kwargs=model_kwargs, seed=seed)
    fresh_kflo_factors(expanded, seed)
    plain = collapse(expanded)
    update_record(plain, collapsed_from=())
    return plain


__all__ = ["SUPPORTED", "contracted_init", "fresh_kflo_factors"]
