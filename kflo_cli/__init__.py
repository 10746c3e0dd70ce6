"""kflo: expand any timm/torchvision model with a reparameterization recipe, train it, collapse it back.

>>> import kflo_cli as kflo
>>> model = kflo.expand(kflo.create_model("lenet5"), "kflo:depth=2,width=4")
>>> plain = kflo.collapse(model)
>>> kflo.verify_equivalence(model, plain).passed
True
"""

__version__ = "0.1.0"

from .checkpoint import load, load_plain_weights, read_metadata, save
from .errors import KfloError
from .models import create_model, default_input_size, resolve_model_id
from .reparam import (
    ParamRole,
    Recipe,
    WeightRecipe,
    create_recipe,
    get_recipe,
    list_recipes,
    register_recipe,
)
from .roles import decay_penalty, param_roles, step_scales
from .surgery import collapse, collapse_problem, expand, is_expanded, plan, rewritten_layers
from .verify import EquivalenceReport, verify_equivalence

__all__ = [
    "EquivalenceReport",
    "KfloError",
    "ParamRole",
    "Recipe",
    "WeightRecipe",
    "__version__",
    "collapse",
    "collapse_problem",
    "create_model",
    "create_recipe",
    "decay_penalty",
    "default_input_size",
    "expand",
    "get_recipe",
    "is_expanded",
    "list_recipes",
    "load",
    "load_plain_weights",
    "param_roles",
    "plan",
    "read_metadata",
    "register_recipe",
    "resolve_model_id",
    "rewritten_layers",
    "save",
    "step_scales",
    "verify_equivalence",
]
