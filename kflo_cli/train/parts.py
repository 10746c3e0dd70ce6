"""Set-up of a run: what it is (:class:`Run`: configuration, run directory, processes, data) and the objects it
trains with (:class:`Parts`: model, optimizer, schedule, AMP, EMA, teacher), built by :func:`build_parts`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import KfloError
from .config import TrainConfig
from .distributed import DistContext, wrap
from .ema import ModelEma
from .loader import per_rank_batch, steps_per_epoch
from .optim import GroupSpec, ModifiedAdaptiveStep, Schedule, build_optimizer, build_param_groups
from .source import Prepared, load_teacher


@dataclass(frozen=True)
class Run:
    """What a run is, fixed from start to end: its configuration, directory, process, output and data."""

    config: TrainConfig
    run_dir: Path
    dist: DistContext
    console: Any  # a rich console; quiet on ranks other than 0
    stop: Any  # the signal flag (engine.StopFlag): ``stop.signal`` is set by SIGINT/SIGTERM
    show_progress: bool
    data: Any  # the DataBundle
    input_size: tuple[int, ...]
    vanilla: bool
    data_args: tuple[int | None, int | None]  # the (in_chans, img_size) the data was built with
    steps_per_epoch: int
    #: the run's id (config.json, the state and the checkpoints carry it); None for a run of a kflo without ids
    run_id: str | None = None

    @property
    def num_train(self) -> int:
        return len(self.data.train)


def make_run(config: TrainConfig, run_dir: Path, dist: DistContext, prepared: Prepared, *, console: Any, stop: Any,
             progress: bool, run_id: str | None = None) -> Run:
    """The :class:`Run` of ``prepared``; refuses a batch the training set or the processes cannot take."""
    steps = steps_per_epoch(len(prepared.data.train), config.batch_size)
    per_rank_batch(config.batch_size, dist.world_size)  # refuse a bad split before anything is written
    return Run(config, Path(run_dir), dist, console, stop, progress and dist.is_main and console.is_terminal,
               prepared.data, tuple(prepared.input_size), prepared.vanilla, tuple(prepared.data_args), steps, run_id)


@dataclass
class Parts:
    """The objects a run trains with."""

    model: nn.Module  # the model being trained (expanded or vanilla), on the run's device
    net: nn.Module  # what the forward pass calls: ``model``, or DistributedDataParallel around it
    groups: list[GroupSpec]
    optimizer: torch.optim.Optimizer
    modified_step: ModifiedAdaptiveStep  # hooks on the optimizer (compander, Powerpropagation with AdamW)
    schedule: Schedule
    autocast: Callable[[], ContextManager[Any]]
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None
    teacher: nn.Module | None
    #: (module, tensor name) of every parametrized tensor, composed once per step under ``parametrize.cached()``
    parametrized: list[tuple[nn.Module, str]]


def amp(enabled: bool, device: torch.device) -> tuple[Callable[[], ContextManager[Any]], torch.amp.GradScaler | None]:
    """The autocast context and the GradScaler of ``--amp``: float16 with a scaler on CUDA, bfloat16 on the CPU."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    if device.type == "cpu":
        # bfloat16 has float32's range, so no loss scaling is needed on the CPU.
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
    raise KfloError(f"--amp is not supported on device {device.type}; drop --amp")


def pretouched(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(layer, tensor name) of the parametrized tensors a training step composes up front, outside autocast.

    Layers with an execution form (:mod:`kflo_cli.reparam.execution`) are left out: they compose their kernel
    themselves (in float32) only when the form they run in needs it.
    """
    return [(m, n) for m in model.modules() if parametrize.is_parametrized(m)
            and getattr(type(m), "_kflo_mode", None) is None for n in m.parametrizations]


def build_parts(run: Run, model: nn.Module) -> Parts:
    """Model on the device, parameter groups per recipe role, optimizer, schedule, AMP, EMA and teacher."""
    config, dist = run.config, run.dist
    model = model.to(dist.device).train()
    groups = build_param_groups(model, config)
    optimizer = build_optimizer(groups, config)
    ema = ModelEma(model, config.ema) if config.ema else None  # a copy of the weights before any DDP broadcast
    teacher = load_teacher(config, run.input_size, run.data.num_classes,
                           note=lambda text: run.console.print(f"[yellow]note[/]: {text}"))
    autocast, scaler = amp(config.amp, dist.device)
    net = wrap(model, dist, manual_sync=config.accumulate > 1)
    return Parts(
        model=model,
        net=torch.compile(net) if config.compile else net,
        groups=groups,
        optimizer=optimizer,
        modified_step=ModifiedAdaptiveStep(model, optimizer, groups),
        schedule=Schedule.from_config(config, run.steps_per_epoch),
        autocast=autocast,
        scaler=scaler,
        ema=ema,
        teacher=teacher.to(dist.device) if teacher is not None else None,
        parametrized=pretouched(model),
    )


__all__ = ["Parts", "Run", "amp", "build_parts", "make_run", "pretouched"]
