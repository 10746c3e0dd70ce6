"""kflo: expand any timm/torchvision model with a reparameterization recipe, train it, collapse it back.

>>> import kflo_cli as kflo
>>> model = kflo.expand(kflo.create_model("lenet5"), "kflo:depth=2,width=4")
>>> plain = kflo.collapse(model)
>>> kflo.verify_equivalence(model, plain).passed
True
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The public API: name -> the submodule that defines it. Imported on first use (PEP 562), so ``import kflo_cli``,
#: ``kflo --help`` and Ctrl-C during start-up do not wait for torch.
_EXPORTS = {
    **dict.fromkeys(("load", "load_plain_weights", "read_metadata", "save"), "checkpoint"),
    "KfloError": "errors",
    **dict.fromkeys(("create_model", "default_input_size", "resolve_model_id"), "models"),
    **dict.fromkeys(("collapse_to_file", "expand_model"), "pipeline"),
    **dict.fromkeys(("LayerPlan", "LayerRecord", "ModelRecord", "Selection", "record", "set_record"), "record"),
    **dict.fromkeys(("LayerContext", "Param", "ParamRole", "Recipe", "RecipeSpec", "WeightRecipe", "create_recipe",
                     "get_recipe", "list_recipes", "register_recipe"), "reparam"),
    **dict.fromkeys(("decay_penalty", "param_roles", "step_scales"), "roles"),
    "param_groups": "train.optim",
    **dict.fromkeys(("collapse", "collapse_problem", "expand", "is_expanded", "plan", "rewritten_layers"), "surgery"),
    **dict.fromkeys(("EquivalenceReport", "verify_equivalence"), "verify"),
    **dict.fromkeys(("BenchResult", "bench"), "bench"),
    **dict.fromkeys(("ExportReport", "export_model"), "export"),
}

if TYPE_CHECKING:  # pragma: no cover - what the names are, for type checkers and editors
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
    from .train.optim import param_groups
    from .verify import EquivalenceReport, verify_equivalence
    from .bench import BenchResult, bench
    from .export import ExportReport, export_model


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # probes such as __path__ or __wrapped__ are not submodules
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule not imported yet (kflo_cli.reparam, kflo_cli.train, ...)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Importing the submodule ``kflo_cli.record`` would set the package attribute ``record`` to the module; the
    public name is the function :func:`kflo_cli.record.record` (as it was when this package imported eagerly)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _ZooWhenTimmLoads:
    """A meta-path finder that registers kflo's model zoo (:mod:`kflo_cli.zoo`) with timm right after timm is
    imported, so ``timm.create_model("lenet5")`` works after ``import kflo_cli`` without making that import pay for
    timm. It removes itself on first use."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "timm":
            return None
        import importlib.util

        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegisterZoo(spec.loader)
        return spec


class _ThenRegisterZoo:
    """timm's own loader, then the zoo's registration (a failure there is a warning, never a broken ``import timm``)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _register_zoo()


def _register_zoo() -> None:
    try:
        importlib.import_module(".zoo", __name__)
    except Exception as exc:  # noqa: BLE001
        import warnings

        warnings.warn(f"kflo could not register its model zoo with timm ({type(exc).__name__}: {exc})", stacklevel=2)


if "timm" in sys.modules:
    _register_zoo()
elif not any(isinstance(f, _ZooWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _ZooWhenTimmLoads())

__all__ = [
    "BenchResult",
    "EquivalenceReport",
    "ExportReport",
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
    "bench",
    "collapse",
    "collapse_problem",
    "collapse_to_file",
    "create_model",
    "create_recipe",
    "decay_penalty",
    "default_input_size",
    "expand",
    "expand_model",
    "export_model",
    "get_recipe",
    "is_expanded",
    "list_recipes",
    "load",
    "load_plain_weights",
    "param_groups",
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
