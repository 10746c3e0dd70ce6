"""Model loading by name from timm (first) or torchvision, and the model's default input size."""

from __future__ import annotations

import difflib
from typing import Any

import torch.nn as nn

from .errors import KfloError
from .record import ModelRecord, record, set_record

SOURCES = ("timm", "torchvision")


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
    model = _build(source, bare, kw, pretrained)
    return set_record(model, ModelRecord(model_id, dict(kw)))


def _build(source: str, bare: str, kw: dict[str, Any], pretrained: bool) -> nn.Module:
    try:
        if source == "timm":
            import timm

            return timm.create_model(bare, pretrained=pretrained, **kw)
        import torchvision.models as tvm

        return tvm.get_model(bare, weights="DEFAULT" if pretrained else None, **kw)
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


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The input size (without the batch) a model expects: its timm config if present, else from its first
    convolution: (C, 224, 224) for Conv2d, (C, 16, 112, 112) for Conv3d (video), (C, 224) for Conv1d, with C the
    ``in_chans`` it was built with or that convolution's input channels."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    kwargs = record(model).model_kwargs
    if size:
        size = tuple(int(s) for s in size)
        if "in_chans" in kwargs:
            size = (int(kwargs["in_chans"]),) + size[1:]
        return size
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    chans = int(kwargs.get("in_chans", first.in_channels if first is not None else 3))
    if isinstance(first, nn.Conv3d):  # video models (torchvision's r3d_18, ...): 16 frames of 112 x 112
        return (chans, 16, 112, 112)
    if isinstance(first, nn.Conv1d):
        return (chans, 224)
    return (chans, 224, 224)
