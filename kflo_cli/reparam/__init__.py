"""Recipe registry: register, list, get and create recipes; parse ``NAME:key=value,...`` specs.

Built-in recipes register themselves on import of their module. Third-party recipes come through the
``kflo.recipes`` entry-point group (see docs/writing-a-recipe.md).
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import KfloError
from .base import (
    ORDINARY,
    RECIPE_ATTR,
    LayerPlan,
    Param,
    ParamRole,
    Recipe,
    WeightRecipe,
    round_half_up,
)

_REGISTRY: dict[str, type[Recipe]] = {}
_PLUGINS_LOADED = False
#: Problems met while loading plugins, as (entry point, message); `kflo recipes` reports them.
PLUGIN_ERRORS: list[tuple[str, str]] = []

ENTRY_POINT_GROUP = "kflo.recipes"


def register_recipe(cls: type[Recipe], *, source: str = "built-in", replace: bool = False) -> type[Recipe]:
    """Register a recipe class under ``cls.name``. Usable as a decorator.

    Raises:
        KfloError: the name is empty or already registered (unless ``replace``).
    """
    if not isinstance(cls, type) or not issubclass(cls, Recipe):
        raise KfloError(f"{cls!r} is not a Recipe subclass; derive recipes from kflo_cli.reparam.Recipe")
    if not cls.name:
        raise KfloError(f"recipe class {cls.__name__} has no name; set the class attribute `name`")
    if cls.name in _REGISTRY and not replace and _REGISTRY[cls.name] is not cls:
        raise KfloError(f"a recipe named '{cls.name}' is already registered ({_REGISTRY[cls.name].source})")
    cls.source = source
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from .._builtin_recipes import load_builtin_recipes

    load_builtin_recipes()
    _load_plugins()


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj = obj()
            if not (isinstance(obj, type) and issubclass(obj, Recipe)):
                raise TypeError(f"resolves to {obj!r}, not a Recipe subclass")
            register_recipe(obj, source=f"plugin: {ep.value}")
        except Exception as exc:  # a broken plugin must never break the CLI
            PLUGIN_ERRORS.append((ep.name, f"{type(exc).__name__}: {exc}"))


def list_recipes() -> list[type[Recipe]]:
    """All registered recipe classes, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``; unknown names raise with close matches."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"did you mean: {', '.join(close)}?" if close else f"known recipes: {', '.join(sorted(_REGISTRY))}"
        raise KfloError(f"unknown recipe '{name}'; {hint} (`kflo recipes` lists them)") from None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME`` or ``NAME:key=value,key=value`` into the name and a dict of raw values.

    >>> parse_spec("kflo:depth=3,width=2")
    ('kflo', {'depth': '3', 'width': '2'})
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise KfloError(f"recipe spec '{spec}' has no name; write NAME or NAME:key=value,key=value")
    values: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise KfloError(f"recipe spec '{spec}': '{item}' is not key=value; write NAME:key=value,key=value")
            if key.strip() in values:
                raise KfloError(f"recipe spec '{spec}' sets '{key.strip()}' twice; give each parameter once")
            values[key.strip()] = value.strip()
    return name, values


def create_recipe(spec: str | dict[str, Any] | Recipe) -> Recipe:
    """Build a recipe instance from a spec string, a dict (``{"name": ..., **params}``) or an instance."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        values = dict(spec)
        name = values.pop("name", None)
        if not name:
            raise KfloError(f"recipe entry {spec} has no 'name'; add name = \"kflo\" (or another recipe)")
        values.pop("include", None)
        values.pop("exclude", None)
        return get_recipe(str(name))(**values)
    name, values = parse_spec(spec)
    return get_recipe(name)(**values)


__all__ = [
    "ENTRY_POINT_GROUP",
    "LayerPlan",
    "ORDINARY",
    "PLUGIN_ERRORS",
    "Param",
    "ParamRole",
    "RECIPE_ATTR",
    "Recipe",
    "WeightRecipe",
    "create_recipe",
    "get_recipe",
    "list_recipes",
    "parse_spec",
    "register_recipe",
    "round_half_up",
]
