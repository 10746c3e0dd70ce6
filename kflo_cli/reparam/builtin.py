"""The built-in recipe modules; importing one registers its recipes. Add a new built-in recipe module here."""

import importlib

BUILTIN_RECIPE_MODULES = (
    "kflo_cli.reparam.kflo",
    "kflo_cli.reparam.doconv",
    "kflo_cli.reparam.acnet",
    "kflo_cli.reparam.compander",
    "kflo_cli.reparam.powerprop",
    "kflo_cli.reparam.weightnorm",
    "kflo_cli.reparam.expandnet",
)


def load_builtin_recipes() -> None:
    """Import the built-in recipe modules (idempotent)."""
    for module in BUILTIN_RECIPE_MODULES:
        importlib.import_module(module)
