"""Model loading by name from timm (first) or torchvision, and the model's default input size."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from .errors import KfloError
from .record import ModelRecord, record, set_record

SOURCES = ("timm", "torchvision")

# -- the constructor arguments kflo writes into checkpoints (and so reads back from untrusted files) -----------------

#: Bounds of the model options (``--num-classes``, ``--in-chans``, ``--img-size``), also applied to a checkpoint's
#: ``model_kwargs`` and ``input_size`` before anything is built.
MAX_NUM_CLASSES = 1_000_000
MAX_IN_CHANS = 4096
MAX_IMG_SIZE = 16384


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any, limit: int) -> bool:
    return _is_int(value) and 1 <= value <= limit


def _side_or_pair(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_count(v, MAX_IMG_SIZE) for v in value)
    return _count(value, MAX_IMG_SIZE)


def _rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1


@dataclass(frozen=True)
class ModelOption:
    """A constructor argument kflo records in checkpoints: the values it may take, in words and as a test."""

    what: str
    accepts: Callable[[Any], bool]
    flag: str = ""


_NUM_CLASSES = ModelOption(f"an integer from 1 to {MAX_NUM_CLASSES:,}", lambda v: _count(v, MAX_NUM_CLASSES), "--num-classes")
_IN_CHANS = ModelOption(f"an integer from 1 to {MAX_IN_CHANS:,}", lambda v: _count(v, MAX_IN_CHANS), "--in-chans")
_IMG_SIZE = ModelOption(f"an integer from 1 to {MAX_IMG_SIZE:,} or a [height, width] pair of them", _side_or_pair,
                        "--img-size")
_DROP = ModelOption("a number in [0, 1)", _rate)
_FLAG = ModelOption("true or false", lambda v: isinstance(v, bool))

#: The allow-list: per model family, the keyword arguments ``create_model`` passes to the library and records. A
#: checkpoint is untrusted input, and its ``model_kwargs`` reach timm's or torchvision's constructor, where other
#: arguments can load files (``pretrained_cfg_overlay``), download (``pretrained``) or change the built code; so
#: nothing else is ever passed, neither from a file nor from the Python API (kflo never writes what it would refuse).
MODEL_OPTIONS: dict[str, dict[str, ModelOption]] = {
    "timm": {"num_classes": _NUM_CLASSES, "in_chans": _IN_CHANS, "img_size": _IMG_SIZE, "drop_rate": _DROP,
             "drop_path_rate": _DROP},
    # kflo's own architectures (zoo.py, timm-registered): the WRNs' wide-dropout rate is their one option
    "kflo zoo": {"num_classes": _NUM_CLASSES, "in_chans": _IN_CHANS, "img_size": _IMG_SIZE, "drop_rate": _DROP},
    # aux_loss: torchvision's segmentation models with --pretrained get the auxiliary head of their weights, and
    # the record must say so to rebuild that architecture
    "torchvision": {"num_classes": _NUM_CLASSES, "dropout": _DROP, "aux_loss": _FLAG},
}
#: What a refused checkpoint argument means and how to get a good file.
EDITED = "the file was edited or does not come from kflo; re-create it with kflo expand/collapse"


def model_family(model_id: str) -> str:
    """The :data:`MODEL_OPTIONS` key of a canonical ``source:name`` model id."""
    source, _, bare = model_id.partition(":")
    if source == "timm":
        from .zoo import ZOO_MODELS

        return "kflo zoo" if bare in ZOO_MODELS else "timm"
    if source == "torchvision":
        return "torchvision"
    raise KfloError(f"model id '{model_id}' does not start with timm: or torchvision:; use timm:NAME or torchvision:NAME")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_model_kwargs(model_id: str, kwargs: Mapping[str, Any], origin: str | None = None) -> dict[str, Any]:
    """Refuse every constructor argument outside :data:`MODEL_OPTIONS` and every value out of its range.

    Args:
        model_id: the canonical ``source:name``.
        kwargs: the arguments (a checkpoint's ``model_kwargs``, or what :func:`create_model` is about to pass).
        origin: the file they come from (its errors say the file was edited); ``None`` for the API or the CLI
            (its errors name the allowed arguments or the bound).

    Returns:
        A copy of ``kwargs`` (an ``img_size`` pair as a tuple).
    """
    family = model_family(model_id)
    allowed = MODEL_OPTIONS[family]
    if not isinstance(kwargs, Mapping):
        where = origin or "model_kwargs"
        raise KfloError(f"{where}: the model arguments must be a table, got {type(kwargs).__name__}; "
                        f"{EDITED if origin else 'pass keyword arguments'}")
    checked: dict[str, Any] = {}
    for key, value in kwargs.items():
        option = allowed.get(key) if isinstance(key, str) else None
        if option is None:
            if origin is not None:
                raise KfloError(f"{origin} asks the model constructor for {_short(key)}, which kflo never writes: {EDITED}")
            raise KfloError(f"{model_id} cannot be built with {_short(key)}: kflo passes and records only "
                            f"{', '.join(allowed)} for {family} models (so any checkpoint it writes loads back safely); "
                            f"drop that argument")
        if not option.accepts(value):
            if origin is not None:
                raise KfloError(f"{origin} gives the model constructor {key}={_short(value)}, but kflo writes "
                                f"{option.what} there: {EDITED}")
            label = f"{option.flag} ({key})" if option.flag else key
            raise KfloError(f"{label} {_short(value)} is out of range; pass {option.what}")
        checked[key] = tuple(value) if isinstance(value, list) else value
    return checked


def _timm_names() -> list[str]:
    import timm

    from . import zoo  # noqa: F401  (registers the paper architectures into timm)

    return timm.list_models()


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models()


def resolve_model_id(name: str) -> str:
    """Return the canonical ``source:name`` for a model argument.

    A bare name goes to timm if timm knows it, else to torchvision. Unknown names raise :class:`KfloError`
    with up to five close matches.

    >>> resolve_model_id("resnet18")
    'timm:resnet18'
    """
    if ":" in name:
        source, _, bare = name.partition(":")
        if source not in SOURCES:
            raise KfloError(f"unknown model source '{source}' in '{name}'; use timm:NAME or torchvision:NAME")
        known = _timm_names() if source == "timm" else _torchvision_names()
        if bare not in known:
            raise KfloError(_unknown_message(name, bare, {source: known}))
        return f"{source}:{bare}"
    timm_names = _timm_names()
    if name in timm_names:
        return f"timm:{name}"
    tv_names = _torchvision_names()
    if name in tv_names:
        return f"torchvision:{name}"
    raise KfloError(_unknown_message(name, name, {"timm": timm_names, "torchvision": tv_names}))


def _unknown_message(shown: str, bare: str, known: dict[str, list[str]]) -> str:
    """'unknown model' with up to five close matches, qualified by source (both libraries have e.g. resnet18)."""
    pool = sorted({n for names in known.values() for n in names})
    close = difflib.get_close_matches(bare, pool, n=5, cutoff=0.6)
    qualified = [f"{src}:{c}" for c in close for src, names in known.items() if c in set(names)][:5]
    if qualified:
        hint = f"did you mean: {', '.join(qualified)}?"
    else:
        hint = "see timm.list_models() and torchvision.models.list_models() for the names"
    return f"unknown model '{shown}'; {hint}"


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name and remember how it was built (for self-describing checkpoints).

    ``None`` arguments are dropped so the library's own defaults stay in force. The returned model carries
    a :class:`~kflo_cli.record.ModelRecord` with its ``model_id`` and ``model_kwargs``; :func:`kflo_cli.save` writes them.
    Only the arguments of :data:`MODEL_OPTIONS` are accepted, within their bounds (checked before anything is
    built), so every checkpoint kflo writes loads back; without ``pretrained`` nothing is downloaded.

    >>> model = create_model("resnet18", num_classes=10)
    >>> from kflo_cli import record
    >>> record(model).model_id, record(model).model_kwargs
    ('timm:resnet18', {'num_classes': 10})
    """
    model_id = resolve_model_id(name)
    source, _, bare = model_id.partition(":")
    kw: dict[str, Any] = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if in_chans is not None:
        if source == "torchvision":
            raise KfloError(f"torchvision model '{bare}' does not take in_chans; drop --in-chans or use a timm model")
        kw["in_chans"] = int(in_chans)
    kw = check_model_kwargs(model_id, kw)  # before anything is built; only what a checkpoint may hold
    model = _build(source, bare, kw, pretrained)
    if source == "torchvision" and pretrained and getattr(model, "aux_classifier", None) is not None:
        kw.setdefault("aux_loss", True)  # the published weights come with the auxiliary head: record it
    return set_record(model, ModelRecord(model_id, dict(kw)))


def _build(source: str, bare: str, kw: dict[str, Any], pretrained: bool) -> nn.Module:
    # Nothing is downloaded unless pretrained asks for it, and then only after a fast check that the weights are
    # cached or their host reachable (kflo_cli/offline.py; docs/architecture.md, "Offline and local weights").
    from contextlib import nullcontext

    from .offline import match_pretrained_architecture, pretrained_guard, torchvision_build_kwargs

    try:
        with pretrained_guard(source, bare) if pretrained else nullcontext():
            if source == "timm":
                import timm

                return timm.create_model(bare, pretrained=pretrained, **kw)
            import torchvision.models as tvm

            # weights_backbone=None (detection/segmentation builders) is a build detail, not a recorded argument
            call = {**kw, **torchvision_build_kwargs(bare, kw, pretrained)}
            model = tvm.get_model(bare, weights="DEFAULT" if pretrained else None, **call)
            return match_pretrained_architecture(bare, model, call)
    except KfloError:
        raise
    except TypeError as exc:
        raise KfloError(f"model '{source}:{bare}' rejected its arguments {kw}: {exc}; check --num-classes/--in-chans") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise KfloError(
                f"could not load pretrained weights for '{source}:{bare}' ({exc}); "
                "drop --pretrained and use --init-from with a local checkpoint"
            ) from None
        raise KfloError(f"could not build model '{source}:{bare}' with {kw}: {exc}") from None


def _detection_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """A torchvision detection model's working size: its transform resizes every image to ``fixed_size`` (SSD: 300
    or 320 square) or, in eval mode, to a shorter side of ``min_size[-1]`` (320 for the ``_320_fpn`` models, 800 for
    the others), so a square image of that size is what it computes on anyway."""
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        return None
    chans = len(transform.image_mean) if transform.image_mean else 3
    if transform.fixed_size:
        width, height = transform.fixed_size  # torchvision's fixed_size is (width, height)
        return (chans, int(height), int(width))
    side = int(transform.min_size[-1])
    return (chans, side, side)


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The input size (without the batch) a model expects: its timm config if present, a torchvision detection
    model's working size (:func:`_detection_input_size`: 3x320x320 for ``ssdlite320_mobilenet_v3_large`` and
    ``fasterrcnn_mobilenet_v3_large_320_fpn``), else from its first convolution: (C, 224, 224) for Conv2d,
    (C, 16, 112, 112) for Conv3d (video), (C, 224) for Conv1d, with C the ``in_chans`` it was built with or that
    convolution's input channels."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    kwargs = record(model).model_kwargs
    if size:
        size = tuple(int(s) for s in size)
        if "in_chans" in kwargs:
            size = (int(kwargs["in_chans"]),) + size[1:]
        return size
    detection = _detection_input_size(model)
    if detection:
        return detection
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    chans = int(kwargs.get("in_chans", first.in_channels if first is not None else 3))
    if isinstance(first, nn.Conv3d):  # video models (torchvision's r3d_18, ...): 16 frames of 112 x 112
        return (chans, 16, 112, 112)
    if isinstance(first, nn.Conv1d):
        return (chans, 224)
    return (chans, 224, 224)
