"""The one record kflo keeps on a model: how to rebuild it, how it was expanded, and how to restore each layer.

Every model kflo builds, expands, collapses or loads carries one frozen :class:`ModelRecord` under one attribute,
read through :func:`record` and replaced (never mutated) through :func:`set_record`. Checkpoint metadata is
written from it (:meth:`ModelRecord.to_metadata`) and read back into it (:meth:`ModelRecord.from_metadata`).

>>> import kflo_cli as kflo
>>> m = kflo.expand(kflo.create_model("lenet5"), "kflo")
>>> rec = kflo.record(m)
>>> rec.model_id, rec.expanded, [layer.name for layer in rec.layers][:2]
('timm:lenet5', True, ['features.0', 'features.3'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import torch.nn as nn

from .reparam.base import Recipe

#: The one attribute a model's record lives under.
RECORD_ATTR = "_kflo_record"


@dataclass(frozen=True)
class Selection:
    """A recipe with its own include/exclude globs (fnmatch over module names)."""

    recipe: Recipe
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.recipe.name, "params": dict(self.recipe.values), "include": list(self.include),
                "exclude": list(self.exclude)}


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class LayerRecord:
    """What an expanded layer needs to be found, trained by its recipe's rules, and restored on collapse."""

    name: str
    recipe_index: int
    #: the layer's class before expansion (collapse restores it)
    original_class: type
    #: the layer's parameter names in their original order (collapse restores the ``state_dict()`` key order)
    param_order: tuple[str, ...]
    shape: tuple[int, ...] = ()

    @property
    def type(self) -> str:
        return self.original_class.__name__


@dataclass(frozen=True)
class ModelRecord:
    """Everything kflo knows about a model, in one immutable value.

    Attributes:
        model_id: ``"timm:resnet18"``; ``create_model(model_id, **model_kwargs)`` rebuilds the architecture
            (``None`` for a model kflo did not build: it can be expanded and collapsed, not saved).
        model_kwargs: the constructor's keyword arguments.
        selections: the recipes of the expansion, in order, with their own globs (empty for a plain model).
        include, exclude: the expansion's global globs.
        plan: one row per layer any recipe considered.
        layers: the rewritten layers.
        collapsed_from: for a collapsed model, the recipes it was collapsed from (metadata form).
    """

    model_id: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    selections: tuple[Selection, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    plan: tuple[LayerPlan, ...] = ()
    layers: tuple[LayerRecord, ...] = ()
    collapsed_from: tuple[Mapping[str, Any], ...] = ()

    @property
    def expanded(self) -> bool:
        return bool(self.layers)

    def recipe_of(self, layer: LayerRecord) -> Recipe:
        return self.selections[layer.recipe_index].recipe

    def recipes_metadata(self) -> list[dict[str, Any]]:
        return [s.as_metadata() for s in self.selections]

    def layers_metadata(self) -> list[dict[str, Any]]:
        return [{"name": x.name, "recipe": self.recipe_of(x).name, "recipe_index": x.recipe_index, "type": x.type,
                 "shape": list(x.shape)} for x in self.layers]


def record(model: nn.Module) -> ModelRecord:
    """The record of ``model`` (an empty one for a model kflo has not touched)."""
    rec = model.__dict__.get(RECORD_ATTR)
    return rec if isinstance(rec, ModelRecord) else ModelRecord()


def set_record(model: nn.Module, rec: ModelRecord) -> nn.Module:
    """Attach ``rec`` to ``model`` (replacing any earlier record) and return the model."""
    if not isinstance(rec, ModelRecord):
        raise TypeError(f"expected a ModelRecord, got {type(rec).__name__}")
    model.__dict__[RECORD_ATTR] = rec
    return model


def update_record(model: nn.Module, **changes: Any) -> ModelRecord:
    """Replace some fields of ``model``'s record; return the new record."""
    rec = replace(record(model), **changes)
    set_record(model, rec)
    return rec


def expanded_roots(model: nn.Module) -> Iterator[tuple[str, nn.Module, ModelRecord]]:
    """``(prefix, module, record)`` for ``model`` and every submodule that carries an expansion record (a model
    wrapped by DDP, an EMA copy or a user's container still finds its expanded layers)."""
    for prefix, module in model.named_modules():
        rec = module.__dict__.get(RECORD_ATTR)
        if isinstance(rec, ModelRecord) and rec.layers:
            yield prefix, module, rec


__all__ = ["LayerPlan", "LayerRecord", "ModelRecord", "RECORD_ATTR", "Selection", "expanded_roots", "record",
           "set_record", "update_record"]
