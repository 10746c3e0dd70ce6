"""Self-describing safetensors checkpoints: tensors plus the metadata needed to rebuild the model."""

from __future__ import annotations

import json
import math
import os
import pickle  # only for torch.load's UnpicklingError: nothing here unpickles (read_torch_state_dict: weights_only)
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from ._atomic import atomic_path
from .errors import KfloError, is_out_of_memory
from .models import MAX_IMG_SIZE, SOURCES, check_model_kwargs, create_model, default_input_size
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
    check_model_kwargs(rec.model_id, rec.model_kwargs)  # a record attached by hand: the same allow-list
    problem = _structure_problem(meta)
    if problem:
        raise KfloError(f"cannot write a checkpoint that kflo would refuse to load ({problem}); build the model with "
                        "kflo.create_model(NAME, ...) and smaller options")
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
    refuse_non_finite(tensors, path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse to write a file whose floating-point tensors hold NaN or infinity: nobody can use such weights."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise KfloError(f"not writing {path}: tensor '{name}' holds {kind} values (the model diverged, or its "
                            "source file is damaged); lower the learning rate or re-create the source")


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
        _refuse_pickle(p)
        raise KfloError(f"{p} is not a readable safetensors file ({exc}); pass a file written by kflo or safetensors") from None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nesting deeper than Python's JSON parser goes
        raise KfloError(f"{p} has corrupt kflo metadata; re-create it with kflo expand/collapse") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise KfloError(f"{p} has metadata that is not kflo's; re-create it with kflo expand/collapse")
    if meta["format_version"] > FORMAT_VERSION:
        raise KfloError(f"{p} uses checkpoint format {meta['format_version']}, newer than this kflo ({FORMAT_VERSION}); upgrade kflo")
    check_metadata(meta, str(p))
    return meta


def check_metadata(meta: dict[str, Any], origin: str) -> None:
    """Refuse a metadata block whose structure is damaged or whose values are out of bounds, before anything is
    built or allocated from it: the field types, ``input_size`` (:data:`MAX_INPUT_DIMS` entries of at most
    :data:`~kflo_cli.models.MAX_IMG_SIZE`, :data:`MAX_INPUT_VALUES` values in all), ``dtype``, and the model
    arguments against :data:`~kflo_cli.models.MODEL_OPTIONS` (``origin`` names the file in the error)."""
    problem = _structure_problem(meta)
    if problem:
        raise KfloError(f"{origin} has damaged kflo metadata ({problem}); re-create it with kflo expand/collapse")
    check_model_kwargs(meta["model_id"], meta.get("model_kwargs", {}), origin)


#: Bounds of a checkpoint's ``input_size`` (C, H, W or C, T, H, W): what verify-equivalence allocates per sample.
MAX_INPUT_DIMS = 4
MAX_INPUT_VALUES = 2**28
#: Longest name (model id, layer, recipe, glob) a metadata block may hold.
MAX_NAME = 1000


def _structure_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a metadata block (types and bounds), or ``None``."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_name(v: Any) -> bool:
        return isinstance(v, str) and 0 < len(v) <= MAX_NAME and v.isprintable()

    def is_globs(v: Any) -> bool:
        return isinstance(v, list) and all(is_name(g) for g in v)

    if meta.get("kind") not in ("expanded", "plain"):
        return "kind must be 'expanded' or 'plain'"
    model_id = meta.get("model_id")
    if not isinstance(model_id, str):
        return "model_id must be a string"
    if not (is_name(model_id) and model_id.partition(":")[0] in SOURCES and model_id.partition(":")[2]):
        return "model_id must be timm:NAME or torchvision:NAME"
    if not isinstance(meta.get("model_kwargs", {}), dict):
        return "model_kwargs must be a table"
    size = meta.get("input_size")
    if size is not None and not (isinstance(size, list) and size and all(is_int(v) and v > 0 for v in size)):
        return "input_size must be a list of positive integers"
    if size is not None and (len(size) > MAX_INPUT_DIMS or max(size) > MAX_IMG_SIZE
                             or math.prod(size) > MAX_INPUT_VALUES):
        return (f"input_size must have at most {MAX_INPUT_DIMS} entries of at most {MAX_IMG_SIZE} and "
                f"{MAX_INPUT_VALUES:,} values in all")
    dtype = meta.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype.isidentifier() and len(dtype) <= 32
                                  and isinstance(getattr(torch, dtype, None), torch.dtype)
                                  and getattr(torch, dtype).is_floating_point):
        return "dtype must name a floating-point torch dtype such as float32"
    if meta["kind"] == "plain":
        collapsed = meta.get("collapsed_from", [])
        if not isinstance(collapsed, list) or not all(isinstance(r, dict) and is_name(r.get("name"))
                                                      and isinstance(r.get("params", {}), dict) for r in collapsed):
            return "collapsed_from must be a list of {name, params} tables"
        return None
    recipes, layers = meta.get("recipes"), meta.get("layers")
    if not isinstance(recipes, list) or not all(isinstance(r, dict) and is_name(r.get("name"))
                                                 and isinstance(r.get("params", {}), dict)
                                                 and is_globs(r.get("include", [])) and is_globs(r.get("exclude", []))
                                                 for r in recipes):
        return "recipes must be a list of {name, params} tables"
    if not isinstance(layers, list) or not all(isinstance(x, dict) and is_name(x.get("name"))
                                                and is_int(x.get("recipe_index")) and is_name(x.get("type")) and is_name(x.get("recipe"))
                                                and isinstance(x.get("shape"), list)
                                                and all(is_int(d) for d in x["shape"])
                                                for x in layers):
        return "layers must be a list of {name, recipe, recipe_index, type, shape} tables"
    selection = meta.get("selection") or {}
    if not (isinstance(selection, dict) and is_globs(selection.get("include", []))
            and is_globs(selection.get("exclude", []))):
        return "selection must be a table of include/exclude glob lists"
    return None


def pickle_kind(path: str | os.PathLike) -> str | None:
    """What PyTorch pickle checkpoint ``path`` looks like, from its first bytes: ``"zip"`` (``torch.save``'s
    archive, ``PK\\x03\\x04``), ``"legacy"`` (a bare pickle: protocol byte ``0x80`` then 2..5, whose first eight
    bytes read as a safetensors header length would exceed the file), or ``None``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 8 and head[0] == 0x80 and 2 <= head[1] <= 5 and int.from_bytes(head, "little") > size - 8:
        return "legacy"
    return None


def _refuse_pickle(path: Path) -> None:
    """One sentence for a PyTorch pickle checkpoint passed where a safetensors file is expected."""
    kind = pickle_kind(path)
    if kind is not None:
        what = "a torch.save zip archive" if kind == "zip" else "a legacy torch.save pickle"
        raise KfloError(f"{path} is a PyTorch pickle checkpoint ({what}), not safetensors, and kflo never unpickles "
                        f"checkpoints; convert it safely (tensors only) with: kflo convert {path} -o OUT.safetensors")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (never unpickles)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        _refuse_pickle(Path(path))
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


def rebuild(meta: dict[str, Any], origin: str = "the checkpoint") -> nn.Module:
    """The (expanded or plain) model a metadata block describes, with placeholder tensors for a checkpoint's.

    The block is untrusted: :func:`check_metadata` runs first (``origin`` names the file in its errors), and the
    architecture is built without pretrained weights from allow-listed arguments only. The expansion is re-run on
    exactly the recorded layers, recipe index by index, as a rebuild: nothing is initialised from the placeholder
    weights and no value is checked. The record gets the metadata's globs back.
    """
    check_metadata(meta, origin)
    kwargs = check_model_kwargs(meta["model_id"], meta.get("model_kwargs", {}), origin)
    damaged = "the file was edited or is damaged, re-create it with kflo expand/collapse"
    try:
        model = create_model(meta["model_id"], pretrained=False, **kwargs)
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
    model = rebuild(meta, str(path))
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


def load_plain_weights(model: nn.Module, path: str | os.PathLike, *, new_classifier: bool = False,
                       note: Callable[[str], None] | None = None) -> list[str]:
    """Load a plain checkpoint of ``model``'s architecture into it, strictly (``--init-from``).

    With ``new_classifier`` (transfer learning: ``kflo train``/``kflo expand --init-from``), a checkpoint trained for
    another class count is accepted: the tensors whose shapes differ must all be the classifier's (see
    :func:`classifier_mismatch`); they keep ``model``'s own fresh initialisation, everything else is loaded, and
    ``note`` is told. Returns the names of the tensors left at their initialisation (empty when all loaded).
    """
    meta = read_metadata(path)
    if meta is not None and meta["kind"] == "expanded":
        raise KfloError(f"{path} is an expanded kflo checkpoint; collapse it first (kflo collapse) to start from its function, or keep training it with kflo train FILE")
    tensors = load_tensors(path)
    kept: list[str] = []
    if new_classifier:
        found = classifier_mismatch(model, tensors)
        if found is not None:
            kept, theirs, ours = found
            tensors = {**tensors, **{k: v for k, v in model.state_dict().items() if k in kept}}
            if note is not None:
                note(f"{path} was trained for {theirs} classes and this model has {ours}: the classifier "
                     f"({', '.join(kept)}) starts from a fresh initialisation, every other tensor from {path}")
    check_tensors_match(model, tensors, path, OTHER_ARCHITECTURE)
    load_into(model, tensors)
    return kept


def classifier_mismatch(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], int, int] | None:
    """The classifier tensors that differ between ``model`` and a checkpoint for another class count, with the two
    class counts, or None when the shapes do not differ that way.

    A tensor counts as the classifier's when it is the weight or bias of a Linear or Conv module and its shape
    differs only in the first (output) dimension. Every shape mismatch has to be of this kind, with one output size
    on each side (the two class counts), and the model's side has to be its class count when the model knows it
    (its record's ``num_classes``, or timm's ``num_classes`` attribute); anything else is another architecture
    (None).
    """
    from .record import record

    known = record(model).model_kwargs.get("num_classes") or getattr(model, "num_classes", None)
    expected = model.state_dict()
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if not wrong:
        return None
    owners = {f"{name}.{leaf}" for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for leaf in ("weight", "bias")}
    sizes: set[tuple[int, int]] = set()
    for key in wrong:
        mine, other = tuple(expected[key].shape), tuple(tensors[key].shape)
        if key not in owners or not mine or len(mine) != len(other) or mine[1:] != other[1:]:
            return None
        sizes.add((other[0], mine[0]))
    if len(sizes) != 1:
        return None
    theirs, ours = sizes.pop()
    if isinstance(known, int) and ours != known:
        return None
    return wrong, theirs, ours


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a PyTorch pickle checkpoint (``.pt``/``.pth``, zip or legacy), read with
    ``torch.load(weights_only=True)``: torch's restricted unpickler, which rebuilds tensors and plain containers
    and refuses every other global, so a hostile file cannot run code (it can make torch allocate the storage sizes
    it declares). Accepts a dict of name -> tensor, or a dict whose ``state_dict`` or ``model`` entry is one."""
    p = Path(path)
    if not p.is_file():
        raise KfloError(f"{p} {'is a directory' if p.is_dir() else 'does not exist'}; pass a .pt/.pth file written by torch.save")
    fix = "save the weights as a plain state dict (torch.save(model.state_dict(), PATH)) and convert that"
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KfloError(f"{p} holds more than tensors and plain containers ({_refusal(exc)}), and kflo never runs a "
                        f"full unpickle; {fix}") from None
    except (RuntimeError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            zipfile.BadZipFile, SafetensorError) as exc:  # torch.load may try a file as safetensors first
        if is_out_of_memory(exc):
            raise
        raise KfloError(f"{p} is not a checkpoint torch.load can read ({_refusal(exc)}); pass a .pt/.pth file "
                        "written by torch.save") from None

    def tensor_dict(value: Any) -> bool:
        return (isinstance(value, dict) and bool(value)
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))

    state = obj if tensor_dict(obj) else None
    if state is None and isinstance(obj, dict):
        state = next((obj[k] for k in ("state_dict", "model") if tensor_dict(obj.get(k))), None)
    if state is None:
        keys = f" with keys {_short_keys(obj)}" if isinstance(obj, dict) else ""
        raise KfloError(f"{p} holds a {type(obj).__name__}{keys}, not a state dict; kflo convert takes a dict of "
                        "name -> tensor or a dict whose 'state_dict' or 'model' entry is one, so "
                        + fix.replace("save", "save only", 1))
    odd = next((k for k, v in state.items() if v.layout != torch.strided or v.is_quantized), None)
    if odd is not None:
        raise KfloError(f"{p}: tensor '{odd}' is sparse or quantized, which safetensors cannot hold; {fix} with dense tensors")
    # a copy of each tensor (safetensors refuses tensors that share memory, e.g. tied weights)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _refusal(exc: BaseException) -> str:
    """The informative line of a torch.load error (its first line otherwise), shortened."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    useful = [x for x in lines if not x.startswith(("Weights only load failed", "Check the documentation", "Please file"))]
    text = (useful or lines or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _short_keys(value: dict) -> str:
    keys = [repr(k)[:40] for k in list(value)[:5]]
    return "[" + ", ".join(keys) + (", ...]" if len(value) > 5 else "]")


def convert(source: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None,
            num_classes: int | None = None, in_chans: int | None = None) -> int:
    """Convert a PyTorch pickle checkpoint into a safetensors file usable with ``--init-from``, atomically.

    The file is read by :func:`read_torch_state_dict` (``torch.load(weights_only=True)``, never a full unpickle).
    Without ``model`` the tensors are written as they are (a plain safetensors file, no kflo metadata). With
    ``model`` (a name for :func:`~kflo_cli.models.create_model`, with ``num_classes`` / ``in_chans``) the tensors
    must load strictly into that architecture, and the file gets kflo's metadata (:func:`save`).

    Returns:
        The number of tensors written.

    >>> import kflo_cli.checkpoint as ckpt
    >>> ckpt.convert("resnet18.pth", "resnet18.safetensors", model="torchvision:resnet18")  # doctest: +SKIP
    """
    src, out = Path(source), Path(output)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise KfloError(f"-o {out} would overwrite the checkpoint it converts; choose another output path")
    if model is None and (num_classes is not None or in_chans is not None):
        raise KfloError("--num-classes and --in-chans describe the architecture of --model; add --model NAME or drop them")
    tensors = read_torch_state_dict(src)
    refuse_non_finite(tensors, out)
    if model is None:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp))
        return len(tensors)
    net = create_model(model, num_classes=num_classes, in_chans=in_chans)
    check_tensors_match(net, tensors, src, OTHER_ARCHITECTURE)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        net.to(dtypes.pop())
    load_into(net, tensors)
    save(net, out)
    return len(tensors)


__all__ = [
    "FORMAT_VERSION",
    "check_metadata",
    "check_tensors_match",
    "convert",
    "load",
    "load_into",
    "load_plain_weights",
    "load_tensors",
    "model_metadata",
    "parse_dtype",
    "pickle_kind",
    "read_metadata",
    "read_torch_state_dict",
    "rebuild",
    "recorded_specs",
    "save",
]
