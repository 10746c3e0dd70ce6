"""The recipe contract: parameters, the layer context every hook receives, eligibility, expansion, collapse and
per-parameter training roles.

A recipe rewrites single layers. Two families exist (docs/architecture.md):

* weight-space recipes subclass :class:`WeightRecipe` and only build a parametrization (an ``nn.Module`` whose
  ``forward()`` returns the layer's effective weight from its own factors); the layer keeps its class and forward.
  :class:`WeightRecipe` is the one implementation of weight-space expansion and collapse;
* structural recipes subclass :class:`Recipe` and return a replacement module from :meth:`Recipe.expand_layer`
  and a plain module from :meth:`Recipe.collapse_layer` (ACNet).

Every hook receives a :class:`LayerContext`; no recipe reads ambient state.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import KfloError
from .layers import CONV_TYPES, FILTER_TYPES, restore_plain, weight_space_problem

if TYPE_CHECKING:
    from ..record import LayerRecord


@dataclass(frozen=True)
class LayerContext:
    """What a recipe hook knows about the layer it is asked about.

    Attributes:
        name: the layer's module name in ``model`` (``"layer1.0.conv1"``).
        module: the layer itself.
        model: the whole model (for recipes that look at other layers: ACNet's data flow, ExpandNet's stem).
        rebuilding: ``True`` when the expansion only rebuilds a checkpoint's structure: the layer's weights are
            placeholders that the checkpoint's tensors replace next, so nothing is initialised from them and no
            value is checked (:meth:`Recipe.check` and :meth:`WeightRecipe.initialize` are not called).
        shared: a dictionary that lives for one expansion and one recipe, the same for all of that recipe's layers
            (the compander's network-wide ``a, b``; ACNet's data-flow analysis, computed once).
    """

    name: str
    module: nn.Module
    model: nn.Module
    rebuilding: bool = False
    shared: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _number(x: float) -> str:
    """A bound as people write it: ``64``, ``0.001``, ``1000``."""
    return f"{x:g}"


@dataclass(frozen=True)
class Param:
    """One recipe parameter: its type, default, help text, an optional check, choices and bounds.

    ``check`` returns an error string (what is wrong and what is allowed) or ``None`` when the value is valid.

    Numbers (``int`` and ``float``) should declare their range with ``low`` and ``high`` (inclusive; ``low_open``
    excludes ``low`` itself): :meth:`parse` refuses a value outside it with the range in the message, before any
    recipe code sees the value, so nothing is ever allocated from it. Floats must be finite; ints refuse booleans
    and non-integer numbers. ``keywords`` are words accepted besides numbers (the compander's ``a=auto``); such a
    value is passed on as the lower-case string and skips the range and ``check``.
    """

    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    keywords: tuple[str, ...] = ()

    def allowed(self) -> str:
        """What the range allows, as the end of a sentence: ``an integer from 2 to 16``, ``a number > 0 and at
        most 64``, ``a number from 0.001 to 1000, or auto``; empty when no range is declared."""
        lo, hi = self.low, self.high
        kind = "an integer" if self.type is int else "a number"
        if lo is not None and hi is not None:
            text = (f"{kind} > {_number(lo)} and at most {_number(hi)}" if self.low_open
                    else f"{kind} from {_number(lo)} to {_number(hi)}")
        elif lo is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_number(lo)}"
        elif hi is not None:
            text = f"{kind} <= {_number(hi)}"
        else:
            return ""
        return text + "".join(f", or {k}" for k in self.keywords)

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def parse(self, recipe: str, name: str, raw: Any) -> Any:
        """Convert ``raw`` (a string from the CLI, a TOML value or a checkpoint's JSON value) and validate it.

        Raises:
            KfloError: one sentence naming the recipe, the parameter, the value and what is allowed.
        """
        if self.keywords and isinstance(raw, str) and raw.strip().lower() in self.keywords:
            return raw.strip().lower()
        allowed = self.allowed()
        shown = raw.strip() if isinstance(raw, str) else repr(raw)
        if len(shown) > 40:
            shown = shown[:37] + "..."
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
        except (TypeError, ValueError, OverflowError):
            if isinstance(raw, int) and not isinstance(raw, bool) and allowed:  # an integer too large for a float
                raise KfloError(f"recipe '{recipe}': {name}={shown} is out of range; use {allowed}") from None
            raise KfloError(
                f"recipe '{recipe}': parameter {name}={raw!r} is not a valid {self.type.__name__}; {self.help}"
            ) from None
        if self.type is float and not math.isfinite(value):
            raise KfloError(f"recipe '{recipe}': {name}={shown} is not a finite number; "
                            + (f"use {allowed}" if allowed else self.help))
        if self.type in (int, float) and allowed and not self._in_range(value):
            raise KfloError(f"recipe '{recipe}': {name}={shown} is out of range; use {allowed}")
        if self.type is int and abs(value) >= 2**31:
            raise KfloError(f"recipe '{recipe}': {name}={shown} is out of range; use an integer below 2^31 in size")
        if self.choices is not None and value not in self.choices:
            raise KfloError(f"recipe '{recipe}': {name}={value!r} is not one of {', '.join(self.choices)}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise KfloError(f"recipe '{recipe}': {name}={value!r} is invalid: {problem}")
        return value


@dataclass(frozen=True)
class Shorthand:
    """A recipe's short form in a spec, besides ``key=value`` pairs: KFLO's ``kflo:2x4`` (the papers' "KFLO 2x4")
    for ``depth=2,width=4``.

    It may be the first item after the colon (``kflo:2x4`` or ``kflo:2x4,key=value``); the registry hands the item
    to :attr:`parse` and converts and checks the values it returns like ``key=value`` ones.

    Attributes:
        form: how it is written, e.g. ``BxRHO`` (shown by ``kflo recipes``).
        meaning: what it stands for, e.g. ``depth=B,width=RHO``.
        example: one instance, e.g. ``2x4``.
        parse: ``parse(text) -> {parameter: raw value}``, or ``None`` when ``text`` is not this form.
    """

    form: str
    meaning: str
    example: str
    parse: Callable[[str], dict[str, str] | None]

    def describe(self, recipe: str) -> str:
        """One line for ``kflo recipes`` and messages: ``shorthand kflo:BxRHO = depth=B,width=RHO (e.g. kflo:2x4)``."""
        return f"shorthand {recipe}:{self.form} = {self.meaning} (e.g. {recipe}:{self.example})"


@dataclass(frozen=True)
class ParamRole:
    """How a trainer treats one parameter of an expanded layer: its training rule, complete.

    Attributes:
        kind: a short tag shown in the parameter-group table, e.g. ``"kflo-w1"``, ``"expandnet-factor"``.
        weight_decay: ``"default"`` (the run's weight decay), ``"none"``, or a fixed float.
        decay_target: what that decay applies to. ``"parameter"``: the parameter itself (the optimizer's
            ``weight_decay``). ``"composed"``: the layer's composed weight instead, as the loss term
            ``decay / 2 * ||W||^2`` (its gradient is ``decay * W``, what SGD's weight decay does to a plain
            weight); the parameter itself then gets no decay. KFLO (decay on W' = W_B...W_1), the compander with
            fixed ``a, b`` (decay on Psi(v)) and ExpandNet's ``decay=composed`` use it.
    """

    kind: str
    weight_decay: str | float = "default"
    decay_target: Literal["parameter", "composed"] = "parameter"

    def __post_init__(self) -> None:
        wd = self.weight_decay
        if not (wd in ("default", "none") or (isinstance(wd, (int, float)) and not isinstance(wd, bool) and wd >= 0)):
            raise KfloError(f"parameter role '{self.kind}': weight_decay={wd!r} must be 'default', 'none' or a number >= 0")
        if self.decay_target not in ("parameter", "composed"):
            raise KfloError(f"parameter role '{self.kind}': decay_target={self.decay_target!r} must be 'parameter' or 'composed'")


ORDINARY = ParamRole("ordinary", "default")


class Recipe:
    """Base class of all recipes. Subclasses set ``name``, ``description`` and ``params``.

    Instances hold resolved parameter values in ``self.values`` (a dict) and are cheap to create. They keep no
    per-model state: what one expansion shares between layers lives in :attr:`LayerContext.shared`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    #: where the recipe came from ("built-in" or "plugin: <entry point>"); set by the registry.
    source: ClassVar[str] = "built-in"
    #: whether :meth:`stack_weights` is implemented (KFLO's transfer from several pretrained networks).
    stacks_weights: ClassVar[bool] = False
    #: an optional short form in specs (:class:`Shorthand`, e.g. KFLO's ``kflo:2x4``).
    shorthand: ClassVar[Shorthand | None] = None

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

    # -- eligibility ----------------------------------------------------------------------------------------
    def considers(self, module: nn.Module) -> bool:
        """Whether ``module`` appears in this recipe's plan at all (applied or skipped with a reason)."""
        return isinstance(module, FILTER_TYPES)

    def skip_reason(self, layer: LayerContext) -> str | None:
        """``None`` if this recipe applies to the layer, else a short reason shown by ``--dry-run``.

        Only for layers :meth:`considers` accepts. A reason never raises: a layer the recipe applies to but cannot
        expand with these parameter *values* is :meth:`check`'s answer.
        """
        raise NotImplementedError

    def check(self, layer: LayerContext) -> str | None:
        """For a layer the recipe applies to: ``None``, or an error sentence that names the fix (the parameter value
        or ``--exclude``) when the layer's values make the expansion unusable. Not called when rebuilding."""
        return None

    # -- rewriting ------------------------------------------------------------------------------------------
    def expand_layer(self, layer: LayerContext) -> nn.Module:
        """Rewrite ``layer.module``; return it (modified in place) or its replacement."""
        raise NotImplementedError

    def collapse_layer(self, layer: LayerContext, original: "LayerRecord") -> nn.Module:
        """Return the plain module of ``original.original_class`` for an expanded layer (``layer.model`` is the
        model being collapsed, a copy). Compose in float64; the caller casts."""
        raise NotImplementedError

    def collapse_problem(self, layer: LayerContext) -> str | None:
        """Why this expanded layer cannot be collapsed (e.g. a nonlinear chain), or ``None`` when it can."""
        return None

    def stack_weights(self, layer: LayerContext, weights: list[torch.Tensor]) -> None:
        """Start an expanded layer from several networks: the layer already holds the first one's weight, and
        ``weights`` are the same layer's weights in the others (set :attr:`stacks_weights` when implemented)."""
        raise NotImplementedError

    @classmethod
    def counterpart_params(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The parameters of the recipe that continues from a trained expansion made with ``values``
        (``--init-from-expanded``). Default: the same. ExpandNets' +Init turns a nonlinear chain into the linear one."""
        return dict(values)

    # -- training ---------------------------------------------------------------------------------------------
    def roles(self, module: nn.Module) -> dict[str, ParamRole]:
        """Roles of the parameters of an expanded layer, by name relative to the layer. Missing names: ordinary."""
        return {}

    def step_scales(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Per-parameter factors that multiply an adaptive optimizer's update (the compander's Psi'(v))."""
        return {}


#: The prefix of a weight-space recipe's factors inside its layer (``<layer>.parametrizations.weight.0.<factor>``).
FACTOR_PREFIX = "parametrizations.weight.0."


def _no_initialisation(value: torch.Tensor) -> tuple[()]:
    return ()


def _attach(module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
    """Register ``parametrization`` on ``module.<tensor_name>`` keeping no copy of the original tensor.

    kflo initialises the factors itself (:meth:`WeightRecipe.initialize`) before attaching, so torch must not call
    ``right_inverse`` a second time: a ``right_inverse`` returning ``()`` (no original tensor) shadows the method
    for this one registration. ``unsafe=True`` because the factors' shapes are not the weight's; kflo checks the
    composed shape and dtype itself, before attaching (:meth:`WeightRecipe.expand_layer`).
    """
    parametrization.right_inverse = _no_initialisation  # type: ignore[method-assign]
    try:
        parametrize.register_parametrization(module, tensor_name, parametrization, unsafe=True)
    finally:
        del parametrization.right_inverse


#: The most elements the factors of one layer may hold (8 GiB in float32), unless the layer's weight is itself so
#: large that twice its size is more; checked (:meth:`WeightRecipe.size_problem`) before anything is allocated.
MAX_FACTOR_ELEMENTS = 2**31


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``, or ``None`` when unknown: CUDA's free device memory, the CPU's
    ``MemAvailable`` (Linux); nothing for other devices."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, RuntimeError):
        pass
    return None


def _size(nbytes: int) -> str:
    """``16 GiB``, ``3.2 MiB``, ``900 bytes``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


class WeightRecipe(Recipe):
    """A recipe whose layer keeps running its own forward on a weight composed from factors.

    Subclasses implement :meth:`make_parametrization` (the structure: an ``nn.Module`` whose ``forward()`` takes no
    argument and returns the effective weight) and usually leave the rest to this class: the parametrization's
    ``right_inverse(weight)`` initialises the factors from the layer's weight (:meth:`initialize`); its optional
    ``roles()`` and ``step_scales()`` give the training rules. The factors live under
    ``<layer>.parametrizations.weight.0.*``; the expanded layer holds no copy of the original weight.

    Optional hooks: :meth:`make_bias_parametrization` (a bias composed from the same factors),
    :meth:`forward_class` (run the layer through another forward, e.g. ExpandNet's chain of real convolutions).
    """

    #: the parameters that make this recipe's factors larger (named when a layer's factors would be too large).
    size_params: ClassVar[tuple[str, ...]] = ()

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        raise NotImplementedError

    def factor_count(self, layer: LayerContext) -> int | None:
        """How many elements the tensors :meth:`make_parametrization` would create for ``layer`` hold, computed
        without allocating anything (``None``: unknown, so not checked)."""
        return None

    def size_problem(self, layer: LayerContext) -> str | None:
        """An error sentence when ``layer``'s factors would exceed :data:`MAX_FACTOR_ELEMENTS` (or twice the layer's
        own weight, if that is more) or the memory free on the layer's device; ``None`` otherwise."""
        count = self.factor_count(layer)
        if count is None:
            return None
        weight = layer.module.weight
        limit = max(MAX_FACTOR_ELEMENTS, 2 * weight.numel())
        need = count * weight.element_size()
        free = available_bytes(weight.device) if count <= limit else None
        if count <= limit and (free is None or need <= free):
            return None
        why = (f"more than one layer's factors may hold ({limit:,} elements)" if count > limit
               else f"more than the {_size(free)} free on {weight.device.type}")  # type: ignore[arg-type]
        fix = f"lower {' or '.join(self.size_params)}, or " if self.size_params else ""
        return (f"{self.name}: layer '{layer.name}' would get factors of {count:,} elements ({_size(need)} in "
                f"{str(weight.dtype).removeprefix('torch.')}), {why}; {fix}--exclude '{layer.name}'")

    def check(self, layer: LayerContext) -> str | None:
        """The size check (:meth:`size_problem`); subclasses that add checks call it first."""
        return self.size_problem(layer)

    def make_bias_parametrization(self, layer: LayerContext, weight_parametrization: nn.Module) -> nn.Module | None:
        """A parametrization of the layer's ``bias`` (``None``: the bias stays an ordinary parameter)."""
        return None

    def forward_class(self, layer: LayerContext) -> type | None:
        """A subclass of the layer's class whose ``forward`` replaces the layer's own (``None``: keep it)."""
        return None

    def initialize(self, layer: LayerContext, parametrization: nn.Module) -> str | None:
        """Initialise the factors from the layer's current weight; return a warning sentence when the start does
        not preserve the layer's function (``None`` when it does). Default: ``parametrization.right_inverse``."""
        init = getattr(parametrization, "right_inverse", None)
        if init is None:
            raise KfloError(f"recipe '{self.name}': its parametrization {type(parametrization).__name__} has no "
                            "right_inverse(weight) to initialise the factors from the layer's weight; add one")
        init(layer.module.weight.detach())
        return None

    def skip_reason(self, layer: LayerContext) -> str | None:
        return weight_space_problem(layer.module)

    def expand_layer(self, layer: LayerContext) -> nn.Module:
        module = layer.module
        weight = module.weight
        if layer.rebuilding:  # check() ran at planning otherwise; a checkpoint's recipe must not allocate blindly
            problem = self.size_problem(layer)
            if problem:
                raise KfloError(problem)
        param = self.make_parametrization(layer)
        param.to(device=weight.device, dtype=weight.dtype)
        note = None
        if not layer.rebuilding:
            with torch.no_grad():
                note = self.initialize(layer, param)
        self._check_output(layer, param, weight)
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        bias_param = self.make_bias_parametrization(layer, param) if has_bias else None
        cls = self.forward_class(layer)
        if cls is not None:
            module.__class__ = cls
        _attach(module, "weight", param)
        if bias_param is not None:
            _attach(module, "bias", bias_param)
        if note:
            warnings.warn(note, stacklevel=2)
        return module

    def _check_output(self, layer: LayerContext, param: nn.Module, weight: torch.Tensor) -> None:
        """The parametrization must return a weight of the layer's shape and dtype (checked before attaching)."""
        with torch.no_grad():
            out = param()
        where = f"recipe '{self.name}' on layer '{layer.name}'"
        if not isinstance(out, torch.Tensor):
            raise KfloError(f"{where}: the parametrization's forward() returned {type(out).__name__}, not a tensor; "
                            "it must return the layer's weight")
        if tuple(out.shape) != tuple(weight.shape):
            raise KfloError(f"{where}: the parametrization returns a weight of shape {tuple(out.shape)} but the layer's "
                            f"weight has shape {tuple(weight.shape)}; fix the parametrization's forward()")
        if out.dtype != weight.dtype:
            raise KfloError(f"{where}: the parametrization returns {out.dtype} but the layer's weight is "
                            f"{weight.dtype}; fix the parametrization's forward()")

    def collapse_layer(self, layer: LayerContext, original: "LayerRecord") -> nn.Module:
        module = layer.module
        plists = module.parametrizations
        with torch.no_grad():
            plists.to(torch.float64)
            weight = plists["weight"]().detach().clone()
            bias = plists["bias"]().detach().clone() if "bias" in plists else None
        return restore_plain(module, original.original_class, original.param_order, weight, bias)

    @staticmethod
    def parametrization(module: nn.Module) -> nn.Module:
        """The recipe's parametrization module of an expanded layer."""
        return module.parametrizations.weight[0]

    def roles(self, module: nn.Module) -> dict[str, ParamRole]:
        get = getattr(self.parametrization(module), "roles", None)
        return {FACTOR_PREFIX + k: v for k, v in (get() if get is not None else {}).items()}

    def step_scales(self, module: nn.Module) -> dict[str, torch.Tensor]:
        get = getattr(self.parametrization(module), "step_scales", None)
        return {FACTOR_PREFIX + k: v for k, v in (get() if get is not None else {}).items()}


__all__ = ["CONV_TYPES", "FACTOR_PREFIX", "FILTER_TYPES", "LayerContext", "MAX_FACTOR_ELEMENTS", "ORDINARY", "Param",
           "ParamRole", "Recipe", "Shorthand", "WeightRecipe", "available_bytes"]
