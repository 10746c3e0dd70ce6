"""Recipes: the contract (:mod:`.base`), the registry (:mod:`.registry`), helpers for layers (:mod:`.layers`) and
one module per recipe (``kflo.py``, ``expandnet.py``, ``doconv.py``, ``acnet.py``, ``compander.py``,
``powerprop.py``, ``weightnorm.py``). See docs/architecture.md and docs/writing-a-recipe.md.
"""

from __future__ import annotations

from .base import (
    CONV_TYPES,
    FILTER_TYPES,
    ORDINARY,
    LayerContext,
    Param,
    ParamRole,
    Recipe,
    Shorthand,
    WeightRecipe,
)
from .layers import padding_kind, restore_plain, round_half_up, weight_space_problem
from .registry import (
    ENTRY_POINT_GROUP,
    PLUGIN_ERRORS,
    RecipeSpec,
    as_spec,
    create_recipe,
    get_recipe,
    list_recipes,
    parse_spec,
    recipe_from_spec,
    register_recipe,
)

__all__ = [
    "CONV_TYPES",
    "ENTRY_POINT_GROUP",
    "FILTER_TYPES",
    "LayerContext",
    "ORDINARY",
    "PLUGIN_ERRORS",
    "Param",
    "ParamRole",
    "Recipe",
    "RecipeSpec",
    "Shorthand",
    "WeightRecipe",
    "as_spec",
    "create_recipe",
    "get_recipe",
    "list_recipes",
    "padding_kind",
    "parse_spec",
    "recipe_from_spec",
    "register_recipe",
    "restore_plain",
    "round_half_up",
    "weight_space_problem",
]
