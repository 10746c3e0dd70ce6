"""The resolved configuration of a training run: built-in defaults < recipe file ``[train]`` table < command line.

Every option of ``kflo train`` is a field of :class:`TrainConfig`. The resolved configuration is written to
``RUN_DIR/config.json`` and is what ``--resume`` continues with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KfloError

OPTIMIZERS = ("sgd", "adamw")
#: Optimisers whose update is adaptive (per-coordinate normalised); the compander's modified step applies to them.
ADAPTIVE_OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "multistep", "constant")
DECAY_ON = ("factors", "composed")
COLLAPSE_FROM = ("last", "best", "ema")
DEVICES = ("auto", "cpu", "cuda")

CONFIG_FILE = "config.json"


@dataclass
class TrainConfig:
    """Every setting of a training run. Field docs double as the ``--help`` of ``kflo train``.

    ``source`` is a model name (fresh model), or a kflo checkpoint (expanded or plain). ``recipe`` and
    ``recipe_file`` expand a model name or a plain checkpoint on the fly; without them a model name trains vanilla.
    """

    # -- model -----------------------------------------------------------------------------------------------
    source: str = ""
    recipe: list[str] = field(default_factory=list)
    recipe_file: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    init_from: str | None = None
    pretrained: bool = False
    # -- data ------------------------------------------------------------------------------------------------
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_split: float = 0.0
    train_fraction: float = 1.0
    label_noise: float = 0.0
    augment: bool = True
    in_chans: int | None = None
    img_size: int | None = None
    num_workers: int = 0
    threads: int | None = None
    # -- optimisation ----------------------------------------------------------------------------------------
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 5e-4
    decay_on: str = "factors"
    decay_norm_bias: bool = False
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    device: str = "auto"
    ema: float | None = None
    # -- distillation ----------------------------------------------------------------------------------------
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    # -- end of run ------------------------------------------------------------------------------------------
    collapse_from: str = "last"
    verify_rtol: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`KfloError` naming the first invalid setting and what is allowed."""
        checks: list[tuple[bool, str]] = [
            (self.optimizer in OPTIMIZERS, f"--optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}"),
            (self.decay_on in DECAY_ON, f"--decay-on '{self.decay_on}' is not one of {', '.join(DECAY_ON)}"),
            (self.collapse_from in COLLAPSE_FROM, f"--collapse-from '{self.collapse_from}' is not one of {', '.join(COLLAPSE_FROM)}"),
            (self.device in DEVICES or self.device.startswith("cuda:"), f"--device '{self.device}' is not auto, cpu, cuda or cuda:N"),
            (self.epochs >= 1, f"--epochs {self.epochs} must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size} must be at least 1"),
            (self.num_workers >= 0, f"--num-workers {self.num_workers} must be 0 or more"),
            (self.threads is None or self.threads >= 1, f"--threads {self.threads} must be at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr {self.lr} must be a number > 0"),
            (0 <= self.momentum < 1, f"--momentum {self.momentum} must be in [0, 1)"),
            (not (self.nesterov and self.momentum == 0), "--nesterov needs --momentum > 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas {self.betas} must be two numbers in [0, 1)"),
            (self.eps > 0, f"eps {self.eps} must be > 0"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0"),
            (self.gamma > 0, f"--gamma {self.gamma} must be > 0"),
            (all(m >= 1 for m in self.milestones), f"--milestones {self.milestones} must be epochs >= 1"),
            (list(self.milestones) == sorted(self.milestones), f"--milestones {self.milestones} must be increasing"),
            (self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs} must be >= 0"),
            (0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr]"),
            (self.grad_clip is None or self.grad_clip > 0, f"--grad-clip {self.grad_clip} must be > 0"),
            (self.ema is None or 0 < self.ema < 1, f"--ema {self.ema} must be a decay in (0, 1), e.g. 0.999"),
            (0 <= self.val_split < 1, f"--val-split {self.val_split} must be in [0, 1)"),
            (0 < self.train_fraction <= 1, f"--train-fraction {self.train_fraction} must be in (0, 1]"),
            (0 <= self.label_noise <= 1, f"--label-noise {self.label_noise} must be in [0, 1]"),
            (0 <= self.kd_alpha <= 1, f"--kd-alpha {self.kd_alpha} must be in [0, 1]"),
            (self.kd_temperature > 0, f"--kd-temperature {self.kd_temperature} must be > 0"),
            (self.verify_rtol is None or self.verify_rtol > 0, f"verify_rtol {self.verify_rtol} must be > 0"),
            (self.collapse_from != "ema" or self.ema is not None, "--collapse-from ema needs --ema DECAY"),
            (not (self.teacher and not self.teacher_checkpoint), "--teacher needs --teacher-checkpoint FILE (the trained teacher's weights)"),
        ]
        for ok, message in checks:
            if not ok:
                raise KfloError(message)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: Options that only a command line may set (a recipe file's [train] table describes how to train, not what).
NOT_IN_RECIPE_FILE = ("source", "recipe", "recipe_file", "include", "exclude", "init_from")


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert ``value`` to the type of field ``name`` (TOML and JSON give ints for floats, lists for tuples)."""
    annotation = FIELDS[name].type
    text = annotation if isinstance(annotation, str) else repr(annotation)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise KfloError(f"{where}: {name} cannot be empty; give a value")
    bad = KfloError(f"{where}: {name} = {value!r} is not a valid {text.replace(' | None', '')}; fix the value")
    base = text.replace(" | None", "")
    if base == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise bad
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # no option means anything by inf or nan
            said = f"--{name.replace('_', '-')} {value}" if where == "command line" else f"{where}: {name} = {value}"
            raise KfloError(f"{said} is not a finite number; give a finite value")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if base.startswith("list["):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise bad
        inner = base[len("list[") : -1]
        try:
            if inner == "int":
                if not all(not isinstance(v, bool) and float(v) == int(v) for v in value):
                    raise ValueError
                return [int(v) for v in value]
            if inner == "float":
                if not all(math.isfinite(float(v)) for v in value):
                    raise ValueError
                return [float(v) for v in value]
            return [str(v) for v in value]
        except (TypeError, ValueError):
            raise bad from None
    raise bad


def _normalise_key(key: str) -> str:
    return key.replace("-", "_")


def resolve_config(overrides: dict[str, Any], file_defaults: dict[str, Any] | None = None, *, file_name: str = "recipe file") -> TrainConfig:
    """Merge built-in defaults, a recipe file's ``[train]`` table and command-line overrides (in that order).

    Args:
        overrides: options given on the command line (``None`` values mean "not given" and are ignored).
        file_defaults: the recipe files' merged ``[train]`` tables.
        file_name: where ``file_defaults`` came from, for error messages.

    >>> resolve_config({"lr": 0.1}, {"lr": 0.2, "epochs": 3}).lr
    0.1
    """
    values: dict[str, Any] = {}
    from_file: set[str] = set()
    for key, value in (file_defaults or {}).items():
        name = _normalise_key(key)
        if name not in FIELDS or name in NOT_IN_RECIPE_FILE:
            allowed = ", ".join(n for n in FIELDS if n not in NOT_IN_RECIPE_FILE)
            raise KfloError(f"{file_name}: [train] has no option '{key}'; allowed: {allowed}")
        values[name] = _coerce(name, value, f"{file_name} [train]")
        from_file.add(name)
    for key, value in overrides.items():
        if value is None:
            continue
        name = _normalise_key(key)
        if name not in FIELDS:
            raise KfloError(f"unknown training option '{key}'")
        values[name] = _coerce(name, value, "command line")
        from_file.discard(name)
    config = TrainConfig(**values)
    try:
        config.validate()
    except KfloError as exc:  # name the file when the bad value came from it, not from a flag
        for name in from_file:
            flag = "--" + name.replace("_", "-")
            if str(exc).startswith(flag + " "):
                raise KfloError(f"{file_name} [train]: {name} = {values[name]!r} is invalid ({exc}); fix the file "
                                f"or override it with {flag}") from None
        raise
    return config


def config_from_dict(data: dict[str, Any], where: str) -> TrainConfig:
    """Rebuild a configuration saved with :meth:`TrainConfig.to_dict` (unknown keys are an error)."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise KfloError(f"{where} has unknown settings {', '.join(unknown)}; it was written by a newer kflo, upgrade kflo")
    config = TrainConfig(**{k: _coerce(k, v, where) for k, v in data.items()})
    config.validate()
    return config


def load_config(run_dir: str | Path) -> TrainConfig:
    """Read ``RUN_DIR/config.json``."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise KfloError(f"{run_dir} has no {CONFIG_FILE}, so it is not a kflo run directory; pass the -o directory of a kflo train run")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KfloError(f"{path} is damaged (not JSON); start a new run with -o") from None
    return config_from_dict(data, str(path))


def check_resume_overrides(saved: TrainConfig, overrides: dict[str, Any]) -> None:
    """Refuse command-line options that would change a resumed run (it would no longer be the same run)."""
    changed = []
    for key, value in overrides.items():
        name = _normalise_key(key)
        if value is None or name not in FIELDS:
            continue
        if _coerce(name, value, "command line") != getattr(saved, name):
            changed.append(name)
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise KfloError(f"--resume continues the saved run unchanged, but {flags} differ from its config.json; drop them or start a new run with -o")


__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "COLLAPSE_FROM",
    "CONFIG_FILE",
    "DECAY_ON",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "check_resume_overrides",
    "config_from_dict",
    "load_config",
    "resolve_config",
]
