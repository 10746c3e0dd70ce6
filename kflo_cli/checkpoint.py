"""Self-describing safetensors checkpoints: tensors plus the metadata needed to rebuild the model."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from ._atomic import atomic_path
from .errors import KfloError
from .models import create_model, default_input_size
from .record import Selection, record, update_record
from .surgery import expand, model_dtype

FORMAT = "kflo"
FORMAT_VERSION = 1
META_KEY = "kflo"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: The dtypes a checkpoint may be written in (``--dtype``).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; one of :data:`DTYPES`."""
    if str(name) not in DTYPES:
        raise KfloError(f"unknown dtype '{name}'; use {', '.join(DTYPES)}")
    return DTYPES[str(name)]


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """The metadata :func:`save` writes for ``model``, from its :class:`~kflo_cli.record.ModelRecord`."""
    rec = record(model)
    if not rec.model_id:
        raise KfloError(
            "cannot record how to rebuild this model; create it with kflo.create_model(NAME, ...) "
            "(or attach a record: kflo.set_record(model, kflo.ModelRecord('timm:resnet18', {...})))"
        )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kflo_version": __version__,
        "kind": "expanded" if rec.expanded else "plain",
        "model_id": rec.model_id,
        "model_kwargs": dict(rec.model_kwargs),
        "input_size": list(default_input_size(model)),
        "dtype": _dtype_name(model_dtype(model)),
    }
    if rec.expanded:
        meta["recipes"] = rec.recipes_metadata()
        meta["selection"] = {"include": list(rec.include), "exclude": list(rec.exclude)}
        meta["layers"] = rec.layers_metadata()
    else:
        meta["collapsed_from"] = [dict(x) for x in rec.collapsed_from]
    return meta


def save(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (expanded or plain) as a self-describing safetensors file, atomically.

    A plain model's file holds exactly the keys, shapes and dtypes of its ``state_dict()``, so it loads with
    ``strict=True`` into the unmodified architecture.

    >>> import kflo_cli as kflo
    >>> kflo.save(kflo.create_model("lenet5"), "/tmp/lenet5.safetensors")
    """
    meta = model_metadata(model)
    if extra:
        meta["extra"] = extra
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The kflo metadata of a safetensors file, or ``None`` for a safetensors file without it."""
    p = Path(path)
    if not p.exists():
        raise KfloError(f"{p} does not exist; check the path")
    if p.is_dir():
        raise KfloError(f"{p} is a directory; pass a .safetensors file")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise KfloError(f"{p} is not a readable safetensors file ({exc}); pass a file written by kflo or safetensors") from None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise KfloError(f"{p} has corrupt kflo metadata; re-create it with kflo expand/collapse") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise KfloError(f"{p} has metadata that is not kflo's; re-create it with kflo expand/collapse")
    if meta["format_version"] > FORMAT_VERSION:
        raise KfloError(f"{p} uses checkpoint format {meta['format_version']}, newer than this kflo ({FORMAT_VERSION}); upgrade kflo")
    problem = _structure_problem(meta)
    if problem:
        raise KfloError(f"{p} has damaged kflo metadata ({problem}); re-create it with kflo expand/collapse")
    return meta


def _structure_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a metadata block, or ``None``."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if meta.get("kind") not in ("expanded", "plain"):
        return "kind must be 'expanded' or 'plain'"
    if not isinstance(meta.get("model_id"), str):
        return "model_id must be a string"
    if not isinstance(meta.get("model_kwargs", {}), dict):
        return "model_kwargs must be a table"
    size = meta.get("input_size")
    if size is not None and not (isinstance(size, list) and size and all(is_int(v) and v > 0 for v in size)):
        return "input_size must be a list of positive integers"
    if meta["kind"] == "plain":
        return None
    recipes, layers = meta.get("recipes"), meta.get("layers")
    if not isinstance(recipes, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                 and isinstance(r.get("params", {}), dict) for r in recipes):
        return "recipes must be a list of {name, params} tables"
    if not isinstance(layers, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str)
                                                and is_int(x.get("recipe_index")) for x in layers):
        return "layers must be a list of {name, recipe_index} tables"
    return None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (never unpickles)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise KfloError(f"{path} is not a readable safetensors file ({exc}); pass a file written by kflo or safetensors") from None


def recorded_specs(meta: dict[str, Any], params: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                   ) -> list[dict[str, Any]]:
    """An expanded checkpoint's recipes as specs that re-create its expansion on exactly the recorded layers,
    recipe index by index; ``params(entry)`` may replace each recipe's parameters (default: the recorded ones)."""
    specs = []
    for index, entry in enumerate(meta["recipes"]):
        layers = [layer["name"] for layer in meta["layers"] if int(layer["recipe_index"]) == index]
        values = params(entry) if params is not None else entry["params"]
        specs.append({"name": entry["name"], **values, "include": layers, "exclude": []})
    return specs


def rebuild(meta: dict[str, Any]) -> nn.Module:
    """The (expanded or plain) model a metadata block describes, with placeholder tensors for a checkpoint's.

    The expansion is re-run on exactly the recorded layers, recipe index by index, as a rebuild: nothing is
    initialised from the placeholder weights and no value is checked. The record gets the metadata's globs back.
    """
    damaged = "the file was edited or is damaged, re-create it with kflo expand/collapse"
    try:
        model = create_model(meta["model_id"], **meta.get("model_kwargs", {}))
    except (TypeError, ValueError) as exc:
        raise KfloError(f"the checkpoint's model arguments {meta.get('model_kwargs')} do not build {meta['model_id']} "
                        f"({exc}); {damaged}") from None
    if meta["kind"] == "plain":
        update_record(model, collapsed_from=tuple(meta.get("collapsed_from", [])))
        return model
    if sorted({int(layer["recipe_index"]) for layer in meta["layers"]}) != list(range(len(meta["recipes"]))):
        raise KfloError("the checkpoint's layer list does not match its recipes; re-create it with kflo expand")
    missing = [x["name"] for x in meta["layers"] if x["name"] not in dict(model.named_modules())]
    if missing:
        raise KfloError(f"the checkpoint lists layers that {meta['model_id']} does not have ({', '.join(missing[:3])}); "
                        f"{damaged}")
    expand(model, recorded_specs(meta), rebuilding=True)
    rec = record(model)
    selections = tuple(Selection(s.recipe, tuple(e.get("include", ())), tuple(e.get("exclude", ())))
                       for s, e in zip(rec.selections, meta["recipes"]))
    chosen = meta.get("selection") or {}
    update_record(model, selections=selections, include=tuple(chosen.get("include", ())),
                  exclude=tuple(chosen.get("exclude", ())))
    return model


#: What a key or shape mismatch means for a file whose own metadata describes the model.
DAMAGED = "its metadata does not match its tensors ({found}); the file was edited or is damaged, re-create it with kflo expand/collapse"
#: ... and for a plain file loaded into a model the user created (``--init-from``, a teacher).
OTHER_ARCHITECTURE = ("it does not fit this model ({found}); it holds another architecture or other arguments, so create the "
                      "model with the name, --num-classes and --in-chans of the run that wrote it")


def check_tensors_match(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                        message: str = DAMAGED) -> None:
    """Raise a clear error if ``tensors`` do not have exactly the model's keys and shapes.

    ``message`` says what a mismatch means here; ``{found}`` becomes the first mismatching keys of each kind.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise KfloError(f"{path}: " + message.format(found="; ".join(parts)))


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a kflo checkpoint (expanded or plain) and return the model it describes, in eval mode.

    >>> import kflo_cli as kflo
    >>> model = kflo.load("/tmp/lenet5.safetensors")
    """
    meta = read_metadata(path)
    if meta is None:
        raise KfloError(f"{path} has no kflo metadata; load it into a model with --init-from or safetensors.torch.load_file")
    model = rebuild(meta)
    tensors = load_tensors(path)
    check_tensors_match(model, tensors, path)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    load_into(model, tensors)
    return model.to(map_location).eval()


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(tensors, strict=True)`` with the model's own module versions attached.

    ``state_dict()`` carries each module's ``_version`` in a ``_metadata`` attribute that safetensors files do not
    keep; most modules ignore its absence, but some refuse it (torchvision's MNASNet raises "version should be set
    to 1 or 2"). The tensors come from the same architecture code, so its current versions are the right ones.
    """
    state = OrderedDict(tensors)
    metadata = getattr(model.state_dict(keep_vars=True), "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def load_plain_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a plain checkpoint of ``model``'s architecture into it, strictly (``--init-from``)."""
    meta = read_metadata(path)
    if meta is not None and meta["kind"] == "expanded":
        raise KfloError(f"{path} is an expanded kflo checkpoint; collapse it first (kflo collapse) to start from its function, or keep training it with kflo train FILE")
    tensors = load_tensors(path)
    check_tensors_match(model, tensors, path, OTHER_ARCHITECTURE)
    load_into(model, tensors)


__all__ = [
    "FORMAT_VERSION",
        "check_tensors_match",
    "load",
    "load_into",
    "load_plain_weights",
    "load_tensors",
    "model_metadata",
    "parse_dtype",
    "read_metadata",
    "rebuild",
    "recorded_specs",
    "save",
]
