"""The recipe registry: register, list, get and create recipes; parse ``NAME:key=value,...`` specs; load plugins.

Built-in recipes register themselves on import of their module (listed in :mod:`kflo_cli.reparam.builtin`).
Third-party recipes come through the ``kflo.recipes`` entry-point group (see docs/writing-a-recipe.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import KfloError
from .base import LayerContext, Param, Recipe, Shorthand, WeightRecipe
from .layers import weight_space_problem

_REGISTRY: dict[str, type[Recipe]] = {}
_PLUGINS_LOADED = False
#: Problems met while loading plugins, as (entry point, message); `kflo recipes` reports them.
PLUGIN_ERRORS: list[tuple[str, str]] = []

ENTRY_POINT_GROUP = "kflo.recipes"


def register_recipe(cls: type[Recipe], *, source: str | None = None, replace: bool = False) -> type[Recipe]:
    """Register a recipe class under ``cls.name``. Usable as a decorator.

    ``source`` is what ``kflo recipes`` shows as its origin; by default ``built-in`` for kflo's own recipe modules
    and ``registered by <module>`` for a recipe registered in-process by other code.

    Raises:
        KfloError: the name is empty or already registered (unless ``replace``).
    """
    if not isinstance(cls, type) or not issubclass(cls, Recipe):
        raise KfloError(f"{cls!r} is not a Recipe subclass; derive recipes from kflo_cli.reparam.Recipe")
    if not cls.name:
        raise KfloError(f"recipe class {cls.__name__} has no name; set the class attribute `name`")
    if cls.name in _REGISTRY and not replace and _REGISTRY[cls.name] is not cls:
        raise KfloError(f"a recipe named '{cls.name}' is already registered ({_REGISTRY[cls.name].source})")
    if source is None:
        source = "built-in" if cls.__module__.startswith("kflo_cli.reparam.") else f"registered by {cls.__module__}"
    cls.source = source
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from .builtin import load_builtin_recipes

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
            if callable(obj) and not isinstance(obj, type) and as_spec(obj) is None:
                obj = obj()
            spec = as_spec(obj)
            if spec is not None:
                obj = recipe_from_spec(spec)
            if not (isinstance(obj, type) and issubclass(obj, Recipe)):
                raise TypeError(f"resolves to {obj!r}, neither a recipe spec nor a Recipe subclass")
            register_recipe(obj, source=_plugin_source(ep))
        except Exception as exc:  # a broken plugin must never break the CLI
            PLUGIN_ERRORS.append((ep.name, f"{type(exc).__name__}: {exc}"))


def _plugin_source(ep: Any) -> str:
    """``plugin: <distribution> <version> (<module:attr>)``, or without the distribution when unknown."""
    dist = getattr(ep, "dist", None)
    name = dist.metadata["Name"] if dist is not None else None
    return f"plugin: {name} {dist.version} ({ep.value})" if name else f"plugin: {ep.value}"


@dataclass(frozen=True)
class RecipeSpec:
    """A weight-space recipe declared without subclassing; what a ``kflo.recipes`` entry point may resolve to.

    Attributes:
        name: the recipe's name in specs (``NAME:key=value,...``): no ``:``, ``,``, ``=`` or spaces.
        description: one line for ``kflo recipes``.
        params: parameter name -> :class:`Param` (type, default, help, optional check and choices), or a plain
            bool/int/float/str default.
        factory: ``factory(module, **values) -> nn.Module`` builds one layer's parametrization: its
            ``forward()`` returns the effective weight, its ``right_inverse(weight)`` initialises its own
            parameters from the layer's weight and returns ``()``, and optional ``roles()`` and
            ``step_scales()`` give the training rules (the contract of :meth:`WeightRecipe.make_parametrization`).
        skip: optional ``skip(name, module, **values) -> str | None``, a reason to leave a layer alone
            (called after the generic checks; Conv1d/2d/3d and Linear layers are considered).
        check: optional ``check(name, module, **values) -> str | None``, for a layer the recipe applies to: an
            error sentence naming the fix when the layer's values make the expansion unusable (not called when a
            checkpoint is only being rebuilt).
        shorthand: optional :class:`Shorthand`, a short form of the recipe's values in specs (``NAME:2x4``).

    Entry points may also resolve to any mapping or object with these fields (see :func:`as_spec`).

    Example (``docs/writing-a-recipe.md`` has the complete package)::

        SPEC = RecipeSpec(name="lowrank_delta", description="...", params={"rank": Param(int, 4, "...")},
                          factory=lambda module, rank: LowRankDelta(module.weight.shape, rank))
    """

    name: str
    description: str
    params: Mapping[str, Param]
    factory: Callable[..., Any]
    skip: Callable[..., str | None] | None = None
    check: Callable[..., str | None] | None = None
    shorthand: Shorthand | None = None


_SPEC_FIELDS = ("name", "description", "params", "factory", "skip", "check", "shorthand")


def as_spec(obj: Any) -> RecipeSpec | None:
    """``obj`` as a :class:`RecipeSpec`: a RecipeSpec itself, or any mapping or object with a ``name`` and a
    ``factory`` (and optionally ``description``, ``params``, ``skip``, ``check``, ``shorthand``); ``None`` for
    anything else."""
    if isinstance(obj, RecipeSpec):
        return obj
    if isinstance(obj, type):
        return None
    if isinstance(obj, Mapping):
        fields = {k: obj[k] for k in _SPEC_FIELDS if k in obj}
    else:
        fields = {k: getattr(obj, k) for k in _SPEC_FIELDS if hasattr(obj, k)}
    if "name" not in fields or "factory" not in fields:
        return None
    fields.setdefault("description", "")
    fields.setdefault("params", {})
    return RecipeSpec(**fields)


def _as_param(name: str, value: Any) -> Param:
    """A spec's parameter: a :class:`Param`, or a plain bool/int/float/str default (typed by that value)."""
    if isinstance(value, Param):
        return value
    if isinstance(value, (bool, int, float, str)):
        return Param(type(value), value, f"{type(value).__name__}, default {value!r}")
    raise TypeError(f"parameter '{name}' must be a kflo_cli.reparam.Param or a bool/int/float/str default, got {value!r}")


def recipe_from_spec(spec: RecipeSpec) -> type[Recipe]:
    """The :class:`WeightRecipe` subclass a :class:`RecipeSpec` describes.

    Raises:
        TypeError: a field has the wrong type (the plugin loader reports it and skips the plugin).
    """
    if not isinstance(spec.name, str) or not spec.name or any(c in spec.name for c in ":,= "):
        raise TypeError(f"RecipeSpec name {spec.name!r} must be a non-empty string without ':', ',', '=' or spaces")
    if not isinstance(spec.description, str):
        raise TypeError(f"RecipeSpec '{spec.name}': description must be a string")
    if not isinstance(spec.params, Mapping) or not all(isinstance(k, str) for k in spec.params):
        raise TypeError(f"RecipeSpec '{spec.name}': params must map parameter names to kflo_cli.reparam.Param")
    params = {k: _as_param(k, v) for k, v in spec.params.items()}
    if not callable(spec.factory) or any(f is not None and not callable(f) for f in (spec.skip, spec.check)):
        raise TypeError(f"RecipeSpec '{spec.name}': factory (and skip and check, if given) must be callable")
    if spec.shorthand is not None and not isinstance(spec.shorthand, Shorthand):
        raise TypeError(f"RecipeSpec '{spec.name}': shorthand must be a kflo_cli.reparam.Shorthand")

    def make_parametrization(self: WeightRecipe, layer: LayerContext) -> Any:
        return spec.factory(layer.module, **self.values)

    def skip_reason(self: WeightRecipe, layer: LayerContext) -> str | None:
        problem = weight_space_problem(layer.module)
        if problem is None and spec.skip is not None:
            problem = spec.skip(layer.name, layer.module, **self.values)
        return problem

    def check(self: WeightRecipe, layer: LayerContext) -> str | None:
        problem = WeightRecipe.check(self, layer)
        if problem is None and spec.check is not None:
            problem = spec.check(layer.name, layer.module, **self.values)
        return problem

    attrs = {
        "name": spec.name,
        "description": spec.description,
        "params": params,
        "make_parametrization": make_parametrization,
        "skip_reason": skip_reason,
        "check": check,
        "shorthand": spec.shorthand,
        "__doc__": spec.description,
        "__module__": getattr(spec.factory, "__module__", __name__),
    }
    return type(f"SpecRecipe_{spec.name}", (WeightRecipe,), attrs)


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
        broken = [problem for ep_name, problem in PLUGIN_ERRORS if ep_name == name]
        if broken:
            raise KfloError(f"recipe '{name}' comes from a plugin that failed to load ({broken[0]}); "
                            "fix or reinstall that plugin") from None
        by_lower = {k.lower(): k for k in _REGISTRY}
        close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=5, cutoff=0.5)
        close = [by_lower[c] for c in close]
        hint = f"did you mean: {', '.join(close)}?" if close else f"known recipes: {', '.join(sorted(_REGISTRY))}"
        raise KfloError(f"unknown recipe '{name}'; {hint} (`kflo recipes` lists them)") from None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME``, ``NAME:key=value,key=value`` or ``NAME:SHORTHAND[,key=value...]`` into the name and a dict
    of raw values.

    A first item without ``=`` is the recipe's shorthand, if it declares one (:attr:`Recipe.shorthand`, e.g.
    KFLO's ``BxRHO``); the recipe's own parser turns it into values.

    >>> parse_spec("kflo:depth=3,width=2")
    ('kflo', {'depth': '3', 'width': '2'})
    >>> parse_spec("kflo:2x4")
    ('kflo', {'depth': '2', 'width': '4'})
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise KfloError(f"recipe spec '{spec}' has no name; write NAME or NAME:key=value,key=value")
    values: dict[str, str] = {}
    if rest.strip():
        for position, item in enumerate(rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq and position == 0 and item.strip():
                values.update(_shorthand_values(spec, name, item.strip()))
                continue
            if not eq or not key.strip():
                raise KfloError(f"recipe spec '{spec}': '{item}' is not key=value; write NAME:key=value,key=value")
            if key.strip() in values:
                raise KfloError(f"recipe spec '{spec}' sets '{key.strip()}' twice; give each parameter once")
            values[key.strip()] = value.strip()
    return name, values


def _shorthand_values(spec: str, name: str, item: str) -> dict[str, str]:
    """The values a recipe's shorthand stands for (the first item of a spec that has no ``=``)."""
    short = get_recipe(name).shorthand
    if short is None:
        raise KfloError(f"recipe spec '{spec}': '{item}' is not key=value and recipe '{name}' has no shorthand; "
                        "write NAME:key=value,key=value")
    try:
        values = short.parse(item)
    except Exception as exc:  # noqa: BLE001  (a plugin's parser may fail; say so in one sentence)
        raise KfloError(f"recipe spec '{spec}': the shorthand parser of '{name}' failed on '{item}' "
                        f"({type(exc).__name__}: {exc})") from None
    if values is None:
        raise KfloError(f"recipe spec '{spec}': '{item}' is not key=value nor {short.describe(name)}")
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise KfloError(f"recipe spec '{spec}': the shorthand parser of '{name}' returned {values!r}, not a dict of "
                        "parameter values")
    return {k: v if isinstance(v, str) else str(v) for k, v in values.items()}


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


__all__ = ["ENTRY_POINT_GROUP", "PLUGIN_ERRORS", "RecipeSpec", "as_spec", "create_recipe", "get_recipe", "list_recipes",
           "parse_spec", "recipe_from_spec", "register_recipe"]
