"""The recipe contract: parameters, layer eligibility, expansion, collapse and per-parameter training roles.

A recipe rewrites single layers. Two families exist (see docs/architecture.md):

* weight-space recipes subclass :class:`WeightRecipe`: the layer keeps its class and forward, and its
  ``weight`` becomes a function of the recipe's factors through ``torch.nn.utils.parametrize``;
* structural recipes subclass :class:`Recipe` directly and return a replacement module from
  :meth:`Recipe.expand_layer` and a plain module from :meth:`Recipe.collapse_layer`.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import KfloError

#: Attribute set on every rewritten layer; it holds the recipe instance that rewrote it.
RECIPE_ATTR = "_kflo_recipe"

FILTER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def tensors_in(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model's output: a tensor, or dicts, lists and tuples of them (nested)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from tensors_in(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from tensors_in(v)


def weight_decay_penalty(module: nn.Module, weight_decay: float) -> torch.Tensor | None:
    """``weight_decay / 2 * ||W||^2`` on a layer's composed (effective) weight, or ``None`` when the decay is 0.

    The 1/2 makes its gradient ``weight_decay * W``, exactly what SGD's ``weight_decay`` does to a plain weight.
    Recipes whose rules decay the effective weight return it from :meth:`Recipe.penalty`.
    """
    if weight_decay == 0:
        return None
    return 0.5 * weight_decay * module.weight.pow(2).sum()


def _timm_class(name: str) -> type | None:
    try:
        import timm.layers as layers
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return getattr(layers, name, None)


def padding_kind(module: nn.Module) -> str | None:
    """How a filtering layer pads its input, for recipes that run convolutions of their own in its place:
    ``"static"`` (``nn.ConvNd``'s own rules), ``"tf-same"`` (timm's ``Conv2dSame``), ``"linear"``, or ``None`` for a
    subclass whose forward may do anything with its weight (e.g. timm's ``StdConv2d`` standardises it)."""
    cls = type(module)
    if isinstance(module, nn.Linear):
        return "linear" if cls.forward is nn.Linear.forward or cls is _timm_class("Linear") else None
    if cls is _timm_class("Conv2dSame"):
        return "tf-same"
    base = next(b for b in CONV_TYPES if isinstance(module, b))
    if cls.forward is base.forward and cls._conv_forward is base._conv_forward:
        return "static"
    return None


_REBUILDING: ContextVar[bool] = ContextVar("kflo_rebuilding", default=False)


@contextlib.contextmanager
def rebuilding() -> Iterator[None]:
    """Mark an expansion that only rebuilds a checkpoint's structure (``kflo_cli.checkpoint`` loading).

    The layers' weights are then placeholders that ``load_state_dict`` overwrites next, so recipes skip checks
    on their values: the compander's refusal of unrepresentable weights must not reject a fresh model's random
    initialisation when the checkpoint's own factors are about to replace it.
    """
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


def is_rebuilding() -> bool:
    """Whether the current expansion runs inside :func:`rebuilding`."""
    return _REBUILDING.get()


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (``round_half_up(4.5) == 5``), unlike Python's banker's round."""
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Param:
    """One recipe parameter: its type, default, help text and an optional check.

    ``check`` returns an error string (what is wrong and what is allowed) or ``None`` when the value is valid.
    """

    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None

    def parse(self, recipe: str, name: str, raw: Any) -> Any:
        """Convert ``raw`` (a string from the CLI or a TOML value) and validate it."""
        try:
            if isinstance(raw, bool) and self.type is not bool:  # TOML's true is not the number 1
                raise ValueError(raw)
            if self.type is bool and isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value: Any = low in ("1", "true", "yes", "on")
            elif self.type is int and isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError(raw)
                value = int(raw)
            elif self.type is int and isinstance(raw, str):
                as_float = float(raw)
                if not as_float.is_integer():
                    raise ValueError(raw)
                value = int(as_float)
            else:
                value = self.type(raw)
            if self.type is int and abs(value) >= 2**31:
                raise ValueError(raw)
        except (TypeError, ValueError, OverflowError):
            raise KfloError(
                f"recipe '{recipe}': parameter {name}={raw!r} is not a valid {self.type.__name__}; {self.help}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise KfloError(f"recipe '{recipe}': {name}={value!r} is not one of {', '.join(self.choices)}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise KfloError(f"recipe '{recipe}': {name}={value!r} is invalid: {problem}")
        return value


@dataclass(frozen=True)
class ParamRole:
    """How the trainer treats one parameter.

    Attributes:
        kind: a short tag, e.g. ``"ordinary"``, ``"kflo-w1"``, ``"kflo-cascade"``, ``"expandnet-factor"``.
        weight_decay: ``"default"`` (the run's weight decay), ``"none"``, or a fixed float.
    """

    kind: str
    weight_decay: str | float = "default"


ORDINARY = ParamRole("ordinary", "default")


class Recipe:
    """Base class of all recipes. Subclasses set ``name``, ``description`` and ``params``.

    Instances hold resolved parameter values in ``self.params`` (a dict) and are cheap to create.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    #: where the recipe came from ("built-in" or "plugin: <entry point>"); set by the registry.
    source: ClassVar[str] = "built-in"

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            valid = ", ".join(self.params) or "none"
            raise KfloError(f"recipe '{self.name}' has no parameter {', '.join(unknown)}; its parameters are: {valid}")
        resolved = {}
        for key, spec in self.params.items():
            resolved[key] = spec.parse(self.name, key, values[key]) if key in values else spec.default
        self.values: dict[str, Any] = resolved
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks; raise :class:`KfloError`."""

    def spec(self) -> str:
        """The canonical spec string, e.g. ``kflo:depth=2,width=4.0``."""
        if not self.values:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.values.items())

    def __repr__(self) -> str:
        return f"<recipe {self.spec()}>"

    # -- eligibility and rewriting -------------------------------------------------------------------------
    def skip_reason(self, name: str, module: nn.Module, model: nn.Module) -> str | None:
        """``None`` if this recipe rewrites ``module``, else a short reason shown in the plan.

        Only called for modules for which :meth:`considers` is true.
        """
        raise NotImplementedError

    def considers(self, module: nn.Module) -> bool:
        """Whether ``module`` appears in this recipe's plan at all (applied or skipped with a reason)."""
        return isinstance(module, FILTER_TYPES)

    def expand_layer(self, name: str, module: nn.Module, model: nn.Module) -> nn.Module:
        """Rewrite ``module``; return it (modified in place) or its replacement."""
        raise NotImplementedError

    def collapse_layer(self, name: str, module: nn.Module, model: nn.Module) -> nn.Module:
        """Return the plain module of the original class for an expanded ``module``.

        Composition happens in float64; the result keeps float64 parameters, the caller casts.
        """
        raise NotImplementedError

    def collapse_problem(self, name: str, module: nn.Module) -> str | None:
        """Why this expanded layer cannot be collapsed (e.g. a nonlinear chain), or ``None`` when it can."""
        return None

    # -- training ---------------------------------------------------------------------------------------------
    def roles(self, module: nn.Module) -> dict[str, ParamRole]:
        """Roles of the parameters of an expanded layer, by name relative to the layer. Missing names: ordinary."""
        return {}

    def penalty(self, module: nn.Module, weight_decay: float) -> torch.Tensor | None:
        """An extra loss term for this layer (e.g. decay on the composed weight), or ``None``."""
        return None

    def step_scales(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Per-parameter factors that multiply an adaptive optimizer's update (the compander's Psi'(v))."""
        return {}

    def finalize_collapse(self, plain: nn.Module, names: list[str]) -> None:
        """Model-level work after every layer of this recipe was collapsed (e.g. folding into a later BN)."""


class WeightRecipe(Recipe):
    """A recipe whose layer keeps running its own forward on a weight composed from factors.

    Subclasses implement :meth:`make_parametrization`, returning an ``nn.Module`` whose ``forward()`` (no
    arguments) returns the effective weight and whose ``right_inverse(weight)`` initialises the factors from
    ``weight`` and returns ``()``. The factors are the parametrization's own parameters, so the expanded
    layer holds no copy of the original weight. They live under ``<layer>.parametrizations.weight.0.*``.
    """

    def make_parametrization(self, name: str, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def skip_reason(self, name: str, module: nn.Module, model: nn.Module) -> str | None:
        return weight_space_problem(module)

    def expand_layer(self, name: str, module: nn.Module, model: nn.Module) -> nn.Module:
        weight = module.weight.detach()
        param = self.make_parametrization(name, module)
        param.to(device=weight.device, dtype=weight.dtype)
        order = list(module._parameters)
        parametrize.register_parametrization(module, "weight", param, unsafe=True)
        module._kflo_param_order = order  # restores state-dict key order on collapse
        return module

    def collapse_layer(self, name: str, module: nn.Module, model: nn.Module) -> nn.Module:
        plist = module.parametrizations.weight
        with torch.no_grad():
            plist.to(torch.float64)
            composed = plist().detach().clone()
        return restore_plain(module, parametrize.type_before_parametrizations(module), composed)

    @staticmethod
    def parametrization(module: nn.Module) -> nn.Module:
        """The recipe's parametrization module of an expanded layer."""
        return module.parametrizations.weight[0]

    def roles(self, module: nn.Module) -> dict[str, ParamRole]:
        inner = self.parametrization(module)
        get = getattr(inner, "roles", None)
        local = get() if get is not None else {}
        return {f"parametrizations.weight.0.{k}": v for k, v in local.items()}


def weight_space_problem(module: nn.Module) -> str | None:
    """Why a weight-space recipe cannot rewrite ``module`` (``None`` if it can)."""
    if not isinstance(module, FILTER_TYPES):
        return "not a Conv1d/2d/3d or Linear layer"
    if parametrize.is_parametrized(module):
        return "already parametrized"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return "has no weight parameter"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialised yet"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.numel() == 0:
        return f"its weight {tuple(weight.shape)} is empty"
    return None


def restore_plain(module: nn.Module, cls: type, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """Turn a parametrized layer back into a plain ``cls`` with ordinary ``weight`` (and ``bias``) parameters, in
    the parameter order recorded at expansion (``_kflo_param_order``), so ``state_dict()`` keys keep their order.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the parametrized class, which deep
    copies of the module share, so it would break the expanded model a collapsed copy was made from.
    """
    module.__class__ = cls
    del module.parametrizations
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    order = module.__dict__.pop("_kflo_param_order", None)
    if order is not None:
        module._parameters = OrderedDict((k, module._parameters[k]) for k in order if k in module._parameters)
    return module


@dataclass
class LayerPlan:
    """One row of a plan: a layer, what a recipe does with it, and the parameter counts."""

    name: str
    type: str
    shape: tuple[int, ...]
    recipe: str | None
    applied: bool
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    #: position of the applying recipe in the list given to expand (two recipes may share a name).
    recipe_index: int = -1
