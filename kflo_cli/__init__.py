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
from .pipeline import collapse_to_file, expand_model
from .record import LayerPlan, LayerRecord, ModelRecord, Selection, record, set_record
from .reparam import (
    LayerContext,
    Param,
    ParamRole,
    Recipe,
    RecipeSpec,
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
    "LayerContext",
    "LayerPlan",
    "LayerRecord",
    "ModelRecord",
    "Param",
    "ParamRole",
    "Recipe",
    "RecipeSpec",
    "Selection",
    "WeightRecipe",
    "__version__",
    "collapse",
    "collapse_problem",
    "collapse_to_file",
    "create_model",
    "create_recipe",
    "decay_penalty",
    "default_input_size",
    "expand",
    "expand_model",
    "get_recipe",
    "is_expanded",
    "list_recipes",
    "load",
    "load_plain_weights",
    "param_roles",
    "plan",
    "read_metadata",
    "record",
    "register_recipe",
    "resolve_model_id",
    "rewritten_layers",
    "save",
    "set_record",
    "step_scales",
    "verify_equivalence",
]
