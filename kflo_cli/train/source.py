"""What a run trains: the model from SOURCE (a name, a plain or an expanded checkpoint), the recipes that expand
it, the data matched to it (channels, image size, classes), and an optional distillation teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KfloError
from .config import TrainConfig


@dataclass
class Prepared:
    """The model to train (already expanded if a recipe applies) and its data."""

    model: nn.Module
    data: Any
    input_size: tuple[int, ...]
    vanilla: bool
    note: str = ""
    #: the (in_chans, img_size) arguments the data was built with (``None`` = the data set's own), for resume.
    data_args: tuple[int | None, int | None] = (None, None)


def is_checkpoint(source: str) -> bool:
    """Whether SOURCE names a checkpoint file rather than a model."""
    return source.endswith(".safetensors") or Path(source).is_file()


def recipe_specs(config: TrainConfig) -> list[Any]:
    """The recipes of the run: each recipe file's ``[[recipe]]`` tables, then each ``--recipe``."""
    from ..recipefile import load_recipe_file

    specs: list[Any] = []
    for ref in config.recipe_file:
        specs.extend(load_recipe_file(ref).recipes)
    specs.extend(config.recipe)
    return specs


def recipe_file_train_defaults(refs: list[str]) -> tuple[dict[str, Any], str]:
    """The recipe files' ``[train]`` tables merged in order (later files win), and where they came from."""
    from ..recipefile import load_recipe_file

    merged: dict[str, Any] = {}
    names = []
    for ref in refs:
        rf = load_recipe_file(ref)
        merged.update(rf.train)
        names.append(rf.path)
    return merged, ", ".join(names) or "recipe file"


def load_data(config: TrainConfig, *, in_chans: int | None = None, img_size: int | None = None) -> Any:
    """The data set of the run through :func:`kflo_cli.data.build_data`, seeded with the run's seed."""
    import torch.distributed as dist

    from ..data import build_data

    def build(download: bool) -> Any:
        return build_data(
            config.data,
            data_dir=config.data_dir,
            download=download,
            val_split=config.val_split,
            train_fraction=config.train_fraction,
            label_noise=config.label_noise,
            seed=config.seed,
            in_chans=in_chans,
            img_size=img_size,
            augment=config.augment,
        )

    if not (config.download and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build(config.download)
    # Under torchrun only rank 0 downloads (one writer per folder); the others read what it fetched.
    if dist.get_rank() == 0:
        try:
            return build(True)
        finally:
            dist.barrier()
    dist.barrier()
    return build(False)


def convert_data(data: Any, in_chans: int | None, img_size: int | None) -> Any:
    """Make ``data`` yield ``in_chans`` x ``img_size`` images in place (what ``build_data`` with those arguments gives)."""
    from ..data import model_input_for

    model_input_for(data, in_chans or data.in_chans, img_size)
    return data


def _accepts(model: nn.Module, in_chans: int, img_size: int, num_classes: int) -> str | None:
    """``None`` if ``model`` maps a (1, C, S, S) batch to ``num_classes`` logits, else why not."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, img_size, img_size))
    except Exception as exc:  # noqa: BLE001  (any failure means: not this input size)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        return f"its output is {type(out).__name__} of shape {getattr(out, 'shape', '?')}, not (batch, classes) logits"
    if out.shape[1] != num_classes:
        return f"it has {out.shape[1]} outputs but the data has {num_classes} classes"
    return None


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def _model_by_name(config: TrainConfig, data: Any, args: tuple[int | None, int | None], injected: bool) -> tuple[nn.Module, Any, tuple[int | None, int | None]]:
    """Build the named model for the data; fall back to the model's own input size when it needs one."""
    from ..models import create_model, default_input_size, resolve_model_id

    name = config.source
    source = resolve_model_id(name).partition(":")[0]
    if source == "torchvision" and data.in_chans != 3:
        if injected or config.in_chans is not None:
            raise KfloError(f"torchvision model '{name}' takes 3 input channels but the data has {data.in_chans}; use a timm model or data with 3 channels")
        args = (3, config.img_size)
        data = convert_data(data, *args)
    classes, chans, size = data.num_classes, data.in_chans, data.img_size
    kw: dict[str, Any] = {"num_classes": classes, "pretrained": config.pretrained}
    if source == "timm":
        kw["in_chans"] = chans

    def build(**extra: Any) -> nn.Module:
        return _seeded(config.seed, lambda: create_model(name, **kw, **extra))

    model = build()
    problem = _accepts(model, chans, size, classes)
    if problem is None:
        return model, data, args
    tried = [f"{chans}x{size}x{size} at its default size ({problem})"]
    try:
        sized = build(img_size=size)
        second = _accepts(sized, chans, size, classes)
    except KfloError as exc:
        second = str(exc)
    if second is None:
        return sized, data, args
    tried.append(f"with img_size={size} ({second})")
    own = default_input_size(model)
    if not injected and config.img_size is None and len(own) == 3 and own[1] == own[2] and own[1] != size:
        args = (args[0], own[1])
        data = convert_data(data, *args)
        if data.in_chans == chans and _accepts(model, chans, own[1], classes) is None:
            return model, data, args
        tried.append(f"data resized to {own[1]}x{own[2]}")
    raise KfloError(
        f"model '{name}' cannot take the {config.data} images ({chans}x{size}x{size}, {classes} classes): "
        f"tried {'; '.join(tried)}; pass --img-size N (and --in-chans C) that the model accepts"
    )


def _model_from_checkpoint(config: TrainConfig, data: Any, args: tuple[int | None, int | None], injected: bool) -> tuple[nn.Module, Any, tuple[int | None, int | None]]:
    from .. import checkpoint

    path = config.source
    meta = checkpoint.read_metadata(path)
    if meta is None:
        raise KfloError(f"{path} has no kflo metadata; pass the model name as SOURCE and this file with --init-from")
    model = checkpoint.load(path).train()
    size = tuple(meta.get("input_size") or ())
    problem = _accepts(model, data.in_chans, data.img_size, data.num_classes)
    if problem is None:
        return model, data, args
    if not injected and len(size) == 3 and (size[0], size[1]) != (data.in_chans, data.img_size):
        args = (size[0], size[1])
        data = convert_data(data, *args)
        problem = _accepts(model, data.in_chans, data.img_size, data.num_classes)
        if problem is None:
            return model, data, args
    raise KfloError(
        f"checkpoint {path} ({meta['model_id']}) does not fit the {config.data} data "
        f"({data.in_chans}x{data.img_size}x{data.img_size}, {data.num_classes} classes): {problem}; "
        "choose matching data or expand the model again with the right --num-classes/--in-chans"
    )


def prepare(config: TrainConfig, data: Any = None) -> Prepared:
    """Build (and expand) the model of ``config`` and the data matched to it.

    Args:
        config: the run's configuration.
        data: a ready :class:`kflo_cli.data.DataBundle` to use instead of ``config.data`` (library use, tests).
    """
    from ..checkpoint import load_plain_weights
    from ..pipeline import expand_model
    from ..surgery import is_expanded

    injected = data is not None
    args = (config.in_chans, config.img_size)
    if data is None:
        data = load_data(config, in_chans=args[0], img_size=args[1])
    specs = recipe_specs(config)
    init_from = list(config.init_from or [])
    notes = []
    if not config.source:
        raise KfloError("no SOURCE; pass a model name (e.g. lenet5) or a checkpoint from kflo expand")
    if is_checkpoint(config.source):
        if config.init:
            raise KfloError("--init applies to a model name; a checkpoint SOURCE already holds its weights")
        if init_from or config.init_from_expanded:
            raise KfloError("--init-from and --init-from-expanded apply to a model name; a checkpoint SOURCE already "
                            "holds its weights")
        model, data, args = _model_from_checkpoint(config, data, args, injected)
        if is_expanded(model):
            if config.recipe:
                raise KfloError(f"{config.source} is already expanded; drop --recipe or pass a plain checkpoint")
            if specs:
                notes.append("SOURCE is already expanded: the recipe files' [train] tables apply, their [[recipe]] "
                             "tables do not")
            specs = []
    else:
        model, data, args = _model_by_name(config, data, args, injected)
        if config.init:
            from ..analysis.init import contracted_init

            spec = config.init.partition(":")[2]
            model = contracted_init(model, spec, seed=config.seed)
            notes.append(f"started from a collapsed, untrained {spec} expansion (--init)")
    if specs or config.init_from_expanded:
        model = expand_model(model, specs, include=config.include, exclude=config.exclude, init_from=init_from,
                             init_from_expanded=config.init_from_expanded, seed=config.seed, note=notes.append)
    elif config.include or config.exclude:
        raise KfloError("--include/--exclude select layers for a recipe; add --recipe or --recipe-file")
    elif len(init_from) > 1:
        raise KfloError("several --init-from networks are stacked by a recipe (kflo); add --recipe kflo:width=N for N "
                        "networks, or pass one --init-from")
    elif init_from:
        load_plain_weights(model, init_from[0], new_classifier=True, note=notes.append)
    vanilla = not is_expanded(model)
    return Prepared(model, data, (data.in_chans, data.img_size, data.img_size), vanilla, "; ".join(notes), args)


class ResizedInput(nn.Module):
    """``module`` applied to its input resized to ``size`` (a teacher trained at another resolution)."""

    def __init__(self, module: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.module = module
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shrink = images.shape[-2] > self.size[0] or images.shape[-1] > self.size[1]
        images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)
        return self.module(images)


def load_teacher(config: TrainConfig, input_size: tuple[int, ...], num_classes: int,
                 note: Callable[[str], None] | None = None) -> nn.Module | None:
    """The distillation teacher, in eval mode and frozen; an expanded teacher is collapsed (same function, faster).

    A teacher that reads the same channels at another resolution gets each batch resized (:class:`ResizedInput`).
    """
    if not config.teacher_checkpoint:
        return None
    from .. import checkpoint
    from ..models import create_model, default_input_size, resolve_model_id
    from ..surgery import collapse, is_expanded

    path = config.teacher_checkpoint
    meta = checkpoint.read_metadata(path)
    if meta is not None:
        if config.teacher and resolve_model_id(config.teacher) != meta["model_id"]:
            raise KfloError(f"--teacher {config.teacher} does not match {path}, which holds {meta['model_id']}; "
                            "drop --teacher (a kflo checkpoint names its own architecture) or pass the right file")
        teacher = checkpoint.load(path)
        if is_expanded(teacher):
            teacher = collapse(teacher)
    else:
        if not config.teacher:
            raise KfloError(f"{path} has no kflo metadata; name its architecture with --teacher MODEL")
        timm_model = resolve_model_id(config.teacher).startswith("timm:")
        teacher = create_model(config.teacher, num_classes=num_classes, in_chans=input_size[0] if timm_model else None)
        checkpoint.load_plain_weights(teacher, path)
    problem = _accepts(teacher, input_size[0], input_size[1], num_classes)
    if problem is not None:
        own = tuple(meta["input_size"]) if meta is not None and meta.get("input_size") else tuple(default_input_size(teacher))
        if (len(own) == 3 and own[0] == input_size[0] and own[1] != input_size[1]
                and _accepts(teacher, own[0], own[1], num_classes) is None):
            # the same images at the teacher's own resolution (e.g. an 8x8 Cifar-quick teacher for a 28x28 student)
            teacher = ResizedInput(teacher, (own[1], own[2]))
            if note is not None:
                note(f"the teacher reads {own[1]}x{own[2]} images: each batch is resized for it (bilinear, antialiased)")
        else:
            raise KfloError(f"the teacher from {path} does not fit the data ({problem}); pass a teacher trained on "
                            "the same data")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = ["Prepared", "is_checkpoint", "load_data", "load_teacher", "prepare", "recipe_file_train_defaults", "recipe_specs"]
