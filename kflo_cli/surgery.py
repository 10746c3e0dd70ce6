"""Planning, expanding and collapsing: walks any model's modules and hands each eligible layer to a recipe.

The model's :class:`~kflo_cli.record.ModelRecord` says what was done: :func:`expand` writes it, :func:`collapse`
and :func:`rewritten_layers` read it. Nothing is stored on the layers themselves.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import KfloError, is_out_of_memory
from .record import LayerPlan, LayerRecord, ModelRecord, Selection, expanded_roots, record, set_record
from .reparam import LayerContext, Recipe, create_recipe
from .reparam.dataflow import tensors_in


def as_selections(recipes: Any) -> list[Selection]:
    """Normalise one spec, a list of specs, dicts (with optional include/exclude) or Selections."""
    if isinstance(recipes, (str, dict, Recipe, Selection)):
        recipes = [recipes]
    out = []
    for item in recipes:
        if isinstance(item, Selection):
            out.append(item)
        elif isinstance(item, dict):
            name = item.get("name", "?")
            out.append(Selection(create_recipe(item), tuple(_globs(item.get("include"), f"{name}: include")),
                                 tuple(_globs(item.get("exclude"), f"{name}: exclude"))))
        else:
            out.append(Selection(create_recipe(item)))
    if not out:
        raise KfloError("no recipe given; pass --recipe NAME[:key=value,...] or --recipe-file FILE")
    return out


def _globs(value: Any, what: str) -> list[str]:
    """A recipe's include/exclude: a list of fnmatch globs (one glob alone is taken as a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise KfloError(f"{what} = {value!r} is not a list of module-name globs; write e.g. [\"layer1.*\", \"fc\"]")


def _check_globs(model: nn.Module, include: Sequence[str], exclude: Sequence[str], selections: list[Selection]) -> None:
    """An include glob that names no module at all is a typo: refuse it. An exclude glob that names nothing only
    warns (a recipe file written for a family of models may exclude what one of them lacks)."""
    names = [n for n, _ in model.named_modules() if n]
    sources = [("--include", include, "--exclude", exclude)]
    sources += [(f"{s.recipe.name}'s include", s.include, f"{s.recipe.name}'s exclude", s.exclude) for s in selections]
    for inc_label, inc, exc_label, exc in sources:
        for glob in inc:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise KfloError(f"{inc_label} '{glob}' matches no module of this model (e.g. {', '.join(names[:3])}); "
                                "fix the glob (`kflo expand MODEL --recipe ... --dry-run` lists the layers)")
        for glob in exc:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                warnings.warn(f"{exc_label} '{glob}' matches no module of this model, so it excludes nothing")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    w = getattr(module, "weight", None)
    return tuple(w.shape) if isinstance(w, torch.Tensor) else ()


def plan(model: nn.Module, recipes: Any, *, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[LayerPlan]:
    """Decide which recipe rewrites which layer, without changing the model.

    Recipes are tried in order; each takes the eligible layers matched by the global and its own globs.
    A layer eligible for two recipes is an error (restrict one with include/exclude), and so is a layer a recipe
    applies to but cannot expand with its parameter values (:meth:`Recipe.check`).

    Returns:
        One :class:`LayerPlan` per layer any recipe considered, in module order (``params_after`` is filled by
        :func:`expand`).
    """
    selections = as_selections(recipes)
    return _plan(model, selections, _globs(include, "include"), _globs(exclude, "exclude"),
                 [{} for _ in selections], rebuilding=False)


def _plan(model: nn.Module, selections: list[Selection], include: list[str], exclude: list[str],
          shared: list[dict[str, Any]], *, rebuilding: bool) -> list[LayerPlan]:
    _check_globs(model, include, exclude, selections)
    counts = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    rows: dict[str, LayerPlan] = {}
    claimed: dict[str, str] = {}
    for index, sel in enumerate(selections):
        recipe = sel.recipe
        hits = 0
        for name, module in model.named_modules():
            if not name or not recipe.considers(module):
                continue
            layer = LayerContext(name, module, model, rebuilding, shared[index])
            if include and not _matches(name, include):
                reason = "not matched by --include"
            elif _matches(name, exclude):
                reason = "excluded by --exclude"
            elif sel.include and not _matches(name, sel.include):
                reason = f"not matched by {recipe.name}'s include"
            elif _matches(name, sel.exclude):
                reason = f"excluded by {recipe.name}'s exclude"
            elif any(counts[id(p)] > 1 for p in module.parameters(recurse=False)):
                reason = "a parameter is shared with another module"
            else:
                reason = recipe.skip_reason(layer)
            if reason is None:
                if name in claimed:
                    raise KfloError(
                        f"layer '{name}' is claimed by both recipe '{claimed[name]}' and recipe '{recipe.name}'; "
                        "restrict one of them with include/exclude globs"
                    )
                problem = None if rebuilding else recipe.check(layer)
                if problem:
                    raise KfloError(problem)
                claimed[name] = recipe.name
                hits += 1
            row = rows.get(name)
            if row is None or (reason is None and not row.applied):
                before = _own_params(module)
                rows[name] = LayerPlan(
                    name=name,
                    type=parametrize.type_before_parametrizations(module).__name__,
                    shape=_weight_shape(module),
                    recipe=recipe.name if reason is None else None,
                    applied=reason is None,
                    reason=reason or "",
                    params_before=before,
                    params_after=before,
                    recipe_index=index if reason is None else -1,
                )
        if hits == 0:
            exc = KfloError(
                f"recipe '{recipe.name}' matches no layer of this model; check --include/--exclude "
                "or choose a recipe that applies to its layers (`kflo expand ... --dry-run` shows why each was skipped)"
            )
            exc.plan = _in_module_order(model, rows)  # type: ignore[attr-defined]  # --dry-run prints it
            raise exc
    return _in_module_order(model, rows)


def _in_module_order(model: nn.Module, rows: dict[str, LayerPlan]) -> list[LayerPlan]:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(rows.values(), key=lambda r: order[r.name])


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_state(module: nn.Module) -> dict[str, Any]:
    """What :func:`expand` needs to undo a layer's rewrite: the module's attributes, with its dictionaries
    (``_parameters``, ``_modules``, hooks ...) copied, since parametrize and the recipes change them in place."""
    return {k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(module).items()}


def _expand_one(recipe: Recipe, layer: LayerContext) -> nn.Module:
    """``recipe.expand_layer(layer)``; a recipe that crashes (a plugin's factory returning nothing, a forward that
    raises) is one sentence naming the recipe and the layer (``--debug`` shows the traceback)."""
    try:
        return recipe.expand_layer(layer)
    except KfloError:
        raise
    except Exception as exc:  # noqa: BLE001  (any recipe code may fail; name it)
        if is_out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise KfloError(f"recipe '{recipe.name}' failed on layer '{layer.name}' ({type(exc).__name__}: {first}); "
                        f"this is a bug in the recipe ({recipe.source}): fix it or --exclude '{layer.name}'") from exc


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    # manual_seed seeds every device, so every CUDA device's state must be restored afterwards too
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def expand(
    model: nn.Module,
    recipes: Any,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    seed: int | None = None,
    rebuilding: bool = False,
) -> nn.Module:
    """Rewrite ``model``'s layers in place with one or more recipes and return it.

    Args:
        model: any ``nn.Module`` (for self-describing checkpoints, one from :func:`kflo_cli.create_model`).
        recipes: a spec ``"kflo:depth=2,width=4"``, a recipe instance, a dict, or a list of those.
        include: fnmatch globs over module names; only matching layers are rewritten.
        exclude: fnmatch globs; matching layers are left alone.
        seed: seeds the random parts of the initialisation (e.g. KFLO's extra W_1 rows).
        rebuilding: only rebuild the structure, because a checkpoint's tensors replace every value next: nothing
            is initialised from the current weights and no value is checked (:func:`kflo_cli.load` uses it).

    The expanded model computes the same function as before (see each recipe for exceptions). What was done is
    in its record: ``kflo.record(model).plan`` and ``.layers``.

    >>> import kflo_cli as kflo
    >>> m = kflo.expand(kflo.create_model("lenet5"), "kflo:depth=2,width=4")
    >>> sorted({row.recipe for row in kflo.record(m).plan if row.applied})
    ['kflo']
    """
    rec = record(model)
    if rec.expanded:
        raise KfloError("this model is already expanded; collapse it first or expand the original model")
    selections = as_selections(recipes)
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    shared: list[dict[str, Any]] = [{} for _ in selections]
    rows = _plan(model, selections, include, exclude, shared, rebuilding=rebuilding)
    layers = []
    undo: list[tuple[str, nn.Module, type, dict[str, Any]]] = []
    try:
        with _seeded(seed):
            for i, row in enumerate(rows):
                if not row.applied:
                    continue
                module = model.get_submodule(row.name)
                layers.append(LayerRecord(row.name, row.recipe_index, parametrize.type_before_parametrizations(module),
                                          tuple(module._parameters), row.shape))
                undo.append((row.name, module, type(module), _module_state(module)))
                layer = LayerContext(row.name, module, model, rebuilding, shared[row.recipe_index])
                new = _expand_one(selections[row.recipe_index].recipe, layer)
                if new is not module:
                    _set_submodule(model, row.name, new)
                rows[i] = replace(row, params_after=_own_params(new))
    except BaseException:
        # A recipe failed on a later layer (a plugin's wrong shape, an exception, out of memory): put the layers
        # already rewritten back, so the caller's model is left as it was, not half expanded without a record.
        for name, module, cls, state in reversed(undo):
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(state)
            if model.get_submodule(name) is not module:
                _set_submodule(model, name, module)
        raise
    set_record(model, replace(rec, selections=tuple(selections), include=tuple(include), exclude=tuple(exclude),
                              plan=tuple(rows), layers=tuple(layers)))
    return model


def rewritten_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Recipe]]:
    """Yield ``(name, module, recipe)`` for every layer a recipe rewrote (also inside wrappers such as DDP)."""
    for prefix, root, rec in expanded_roots(model):
        for layer in rec.layers:
            name = f"{prefix}.{layer.name}" if prefix else layer.name
            yield name, root.get_submodule(layer.name), rec.recipe_of(layer)


def is_expanded(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is rewritten by a recipe."""
    return next(expanded_roots(model), None) is not None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def collapse_problem(model: nn.Module) -> str | None:
    """Why :func:`collapse` would refuse this expanded model (the first layer no single layer can compute, with
    what to do instead), or ``None`` when it collapses."""
    for _, root, rec in expanded_roots(model):
        for layer in rec.layers:
            problem = rec.recipe_of(layer).collapse_problem(LayerContext(layer.name, root.get_submodule(layer.name), root))
            if problem:
                return problem
    return None


def supports_float64(device: torch.device) -> bool:
    """Whether ``device`` computes in float64 (Apple's MPS does not; kflo then composes on the CPU)."""
    return device.type != "mps"


def copy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for collapse and verification that does not depend on the model being deep-copyable.

    Some models keep tensors computed in a forward pass in ordinary attributes (timm's LeViT and EfficientViT cache
    attention biases in eval mode). After a forward with gradients enabled those are non-leaf tensors, which
    ``copy.deepcopy`` refuses; the copy gets them detached (they are caches: the same values, no history). A model
    that still cannot be deep-copied (an attribute holding a lock, a file, a generator) is rebuilt from its record
    instead: the architecture built afresh, the recorded expansion re-run, the model's tensors loaded.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            for tensor in tensors_in(value):
                if tensor.grad_fn is not None:
                    memo[id(tensor)] = tensor.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except (RuntimeError, TypeError) as exc:
        if not record(model).model_id:
            raise KfloError(f"cannot copy this model ({type(exc).__name__}: {exc}); build it with kflo.create_model so "
                            "kflo can rebuild it from its record, or make it deep-copyable") from None
        from .checkpoint import load_into, model_metadata, rebuild

        fresh = rebuild(model_metadata(model))
        first = next((p for p in model.parameters()), None)
        if first is not None:
            fresh.to(device=first.device, dtype=model_dtype(model))
        load_into(fresh, model.state_dict())
        return fresh.train(model.training)


def collapse(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Return a plain copy of an expanded model: the original architecture, with composed weights.

    Composition runs in float64; the result is then cast to ``dtype`` (default: the expanded model's dtype).
    The input model is not modified.

    >>> import kflo_cli as kflo
    >>> plain = kflo.collapse(kflo.expand(kflo.create_model("lenet5"), "kflo"))
    >>> kflo.is_expanded(plain)
    False
    """
    if not is_expanded(model):
        raise KfloError("this model has no expanded layers, so there is nothing to collapse; it is already plain")
    problem = collapse_problem(model)
    if problem:
        raise KfloError(problem)
    target = dtype or model_dtype(model)
    plain = copy_model(model)
    home = next((p.device for p in plain.parameters()), torch.device("cpu"))
    if not supports_float64(home):
        plain.cpu()  # compose in float64 on the CPU, then move back
    for _, root, rec in list(expanded_roots(plain)):
        for layer in rec.layers:
            module = root.get_submodule(layer.name)
            new = rec.recipe_of(layer).collapse_layer(LayerContext(layer.name, module, root), layer)
            if new is not module:
                _set_submodule(root, layer.name, new)
        set_record(root, ModelRecord(rec.model_id, rec.model_kwargs, collapsed_from=tuple(rec.recipes_metadata())))
    plain.to(device=home, dtype=target)
    return plain


__all__ = ["as_selections", "collapse", "collapse_problem", "copy_model", "expand", "is_expanded", "model_dtype", "plan",
           "rewritten_layers", "supports_float64"]
