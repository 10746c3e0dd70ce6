"""The one way from a model name (or model), recipes and initialisation sources to an expanded model, and from an
expanded model to a plain checkpoint file. ``kflo expand``, ``kflo train``, ``kflo quickstart`` and ``kflo collapse``
all go through here, so every feature works in every command.

>>> import kflo_cli as kflo
>>> model = kflo.expand_model("lenet5", "kflo:depth=2,width=4", model_kwargs={"num_classes": 10})
>>> plain = kflo.collapse_to_file(model, "/tmp/plain.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .checkpoint import (
    check_tensors_match,
    load_into,
    load_plain_weights,
    load_tensors,
    read_metadata,
    rebuild,
    recorded_specs,
    save,
)
from .errors import KfloError
from .models import create_model
from .record import record
from .reparam import LayerContext, get_recipe
from .surgery import as_selections, collapse, expand

Note = Callable[[str], None]


def counterpart_specs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The recipes of an expanded checkpoint as specs for the expansion that continues from it
    (``--init-from-expanded``): each recipe's :meth:`~kflo_cli.reparam.Recipe.counterpart_params` (ExpandNets' +Init
    turns the nonlinear counterpart into the linear chain), each on the layers it rewrote."""
    meta = read_metadata(path)
    if meta is None or meta["kind"] != "expanded":
        raise KfloError(f"{path} is not an expanded kflo checkpoint; --init-from-expanded needs one written by "
                        "kflo expand or kflo train (for a plain checkpoint use --init-from)")
    return recorded_specs(meta, lambda entry: get_recipe(entry["name"]).counterpart_params(dict(entry["params"])))


def transfer_tensors(model: nn.Module, path: str | os.PathLike) -> int:
    """Load every tensor of an expanded checkpoint into ``model``, an expansion of the same architecture with the
    same recipes, widths and layers (+Init: the trained nonlinear counterpart starts the linear ExpandNet).

    Returns:
        The number of tensors loaded.
    """
    meta = read_metadata(path)
    own = record(model).model_id
    if meta is not None and own is not None and meta["model_id"] != own:
        raise KfloError(f"{path} holds {meta['model_id']} but this model is {own}; transfer tensors between "
                        "expansions of the same architecture")
    tensors = load_tensors(path)
    names = ", ".join(entry["name"] for entry in (meta or {}).get("recipes", []))
    check_tensors_match(model, tensors, path, (
        "it does not fit this expansion ({found}); expand with the recipes, rate, layers and stem of the run that "
        f"wrote it ({names}), e.g. by omitting --recipe"))
    expected = model.state_dict()
    load_into(model, {k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return len(tensors)


def stack_sources(model: nn.Module, paths: Sequence[str | os.PathLike], note: Note | None = None) -> list[str]:
    """Start the expanded layers of ``model`` from several networks: ``model`` holds the first network's weights
    already; each further plain checkpoint of the same architecture is handed, layer by layer, to the recipes that
    stack weights (KFLO transfer learning, paper section 4.1). Returns the names of the layers that stacked.

    A network trained for another class count has no classifier to give: that layer does not stack (it keeps the
    expansion of its fresh initialisation), and ``note`` is told."""
    rec = record(model)
    states = []
    fresh: set[str] = set()
    for path in paths:
        reference = create_model(rec.model_id, **rec.model_kwargs) if rec.model_id else None
        if reference is None:
            raise KfloError("stacking several --init-from networks needs a model built by kflo.create_model")
        fresh.update(load_plain_weights(reference, path, new_classifier=True, note=note))
        states.append(reference.state_dict())
    done = []
    for layer in rec.layers:
        recipe = rec.recipe_of(layer)
        if not recipe.stacks_weights or f"{layer.name}.weight" in fresh:
            continue
        weights = []
        for i, state in enumerate(states):
            weight = state.get(f"{layer.name}.weight")
            if weight is None:
                raise KfloError(f"--init-from {paths[i]} has no '{layer.name}.weight'; all networks must be of the "
                                "same architecture")
            weights.append(weight)
        recipe.stack_weights(LayerContext(layer.name, model.get_submodule(layer.name), model), weights)
        done.append(layer.name)
    if not done:
        stacking = sorted({rec.recipe_of(x).name for x in rec.layers})
        raise KfloError(f"several --init-from networks need a recipe that stacks them (kflo); {', '.join(stacking) or 'no recipe'} "
                        "cannot, so pass one --init-from or add --recipe kflo:width=N for N networks")
    return done


def expand_model(
    model: str | nn.Module,
    recipes: Any = (),
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    init_from: Sequence[str | os.PathLike] = (),
    init_from_expanded: str | os.PathLike | None = None,
    seed: int | None = 0,
    note: Note | None = None,
) -> nn.Module:
    """Build (or take) a model, start it from the given weights and expand it.

    Args:
        model: a model name (``"resnet18"``, ``"timm:..."``, ``"torchvision:..."``) or a model built by
            :func:`kflo_cli.create_model`.
        recipes: what :func:`kflo_cli.expand` takes; may be empty with ``init_from_expanded`` (the checkpoint's
            recipes, as :func:`counterpart_specs` gives them).
        include, exclude: fnmatch globs over module names.
        model_kwargs: constructor arguments when ``model`` is a name (``num_classes``, ``in_chans``, ...; ``None``
            values are dropped). With ``init_from_expanded`` the checkpoint's ``num_classes`` / ``in_chans`` fill
            those not given.
        pretrained: the library's pretrained weights (a name only).
        init_from: plain checkpoints of the architecture. The first starts the model (strict load); each further
            one is stacked into the expansion by recipes that can (KFLO's W_1, paper 4.1).
        init_from_expanded: an expanded checkpoint whose tensors start this expansion (ExpandNets' +Init).
        seed: seeds model construction (names only) and the random parts of the expansion.
        note: receives one sentence per notable step ("stacked 2 networks ...").

    Returns:
        The expanded model; ``kflo.record(model)`` describes it.
    """
    init_from = list(init_from or [])
    say = note or (lambda text: None)
    if init_from and init_from_expanded is not None:
        raise KfloError("--init-from and --init-from-expanded both set the starting weights; pass only one")
    specs: list[Any] = list(recipes) if isinstance(recipes, (list, tuple)) else [recipes]
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if v is not None}
    if init_from_expanded is not None:
        source_meta = read_metadata(init_from_expanded)
        source_specs = counterpart_specs(init_from_expanded)
        specs = specs or source_specs
        for key in ("num_classes", "in_chans"):
            if isinstance(model, str) and key not in kwargs and key in source_meta.get("model_kwargs", {}):
                kwargs[key] = source_meta["model_kwargs"][key]
    if not specs:
        raise KfloError("no recipe given; pass --recipe NAME[:key=value,...] or --recipe-file FILE (`kflo recipes` lists them)")
    selections = as_selections(specs)
    if isinstance(model, str):
        if seed is not None:
            torch.manual_seed(seed)
        net = create_model(model, pretrained=pretrained, **kwargs)
    else:
        if kwargs or pretrained:
            raise KfloError("model_kwargs and pretrained apply to a model name; this model is already built")
        net = model
    if init_from:  # transfer learning: a checkpoint for another class count starts all but the classifier
        load_plain_weights(net, init_from[0], new_classifier=True, note=say)
    # The transferred tensors replace the start of an --init-from-expanded expansion: expand as a rebuild (no
    # initialisation from the current weights, no warnings or refusals about a start that is thrown away).
    expand(net, selections, include=include, exclude=exclude, seed=seed, rebuilding=init_from_expanded is not None)
    if init_from_expanded is not None:
        count = transfer_tensors(net, init_from_expanded)
        say(f"started from {count} tensors of {init_from_expanded}")
    if len(init_from) > 1:
        stacked = stack_sources(net, init_from[1:], note=say)
        say(f"stacked {len(init_from)} pretrained networks into W_1 of {len(stacked)} layers")
    return net


def collapse_to_file(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     extra: dict[str, Any] | None = None) -> nn.Module:
    """Collapse an expanded model (float64 composition), check that the result has exactly the original
    architecture's keys and shapes, write it atomically to ``path`` and return the plain model.

    The check builds the architecture afresh from the model's record, so a recipe whose collapse leaves a key
    behind is caught before anything is written.
    """
    plain = collapse(model, dtype=dtype)
    save_collapsed(plain, path, extra=extra)
    return plain


def save_collapsed(plain: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> None:
    """Write a model :func:`~kflo_cli.collapse` returned, atomically, after checking it against a freshly built
    architecture (its keys and shapes), so the file loads with ``strict=True`` into the unmodified model. The writer
    of :func:`collapse_to_file`, for callers that verify the collapsed model before it is written."""
    rec = record(plain)
    if rec.model_id:
        reference = create_model(rec.model_id, **rec.model_kwargs).state_dict()
        got = plain.state_dict()
        if set(got) != set(reference) or any(tuple(got[k].shape) != tuple(reference[k].shape) for k in reference):
            raise KfloError(f"collapsing {rec.model_id} did not reproduce the original architecture's keys; this is a "
                            "bug in a recipe, please report it")
    save(plain, path, extra=extra)


__all__ = ["collapse_to_file", "counterpart_specs", "expand_model", "rebuild", "save_collapsed", "stack_sources",
           "transfer_tensors"]
