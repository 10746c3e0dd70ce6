"""The resolved configuration of a training run: built-in defaults < recipe file ``[train]`` table < command line.

:class:`TrainConfig` is the one definition of the options of ``kflo train``: each field carries its help text and
its ``--help`` panel in its metadata (:func:`option`), and :func:`kflo_cli.train.commands.train_options` builds
the command's options from them, so the command line, recipe files' ``[train]`` tables, ``config.json`` and the
Python API cannot drift apart. The resolved configuration is written to ``RUN_DIR/config.json`` and is what
``--resume`` continues with.
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
COLLAPSE_FROM = ("last", "best", "ema")
DEVICES = ("auto", "cpu", "cuda")

CONFIG_FILE = "config.json"
#: What config.json records about the run beside its settings: its id and the fingerprint of what it trains
#: (:func:`kflo_cli.train.run_dir.check_identity` checks them against the state file on ``--resume``).
IDENTITY_KEYS = ("run_id", "fingerprint")

#: The ``--help`` panels of ``kflo train``.
MODEL, DATA, OPTIMISATION, DISTILLATION, RUN = "Model", "Data", "Optimisation", "Distillation", "Run"

_NO_DEFAULT: Any = dataclasses.MISSING


def option(default: Any = _NO_DEFAULT, *, help: str, panel: str, factory: Any = None, flags: tuple[str, ...] = (),
           comma_list: type | None = None, in_recipe_file: bool = True, argument: bool = False) -> Any:
    """A :class:`TrainConfig` field that is an option of ``kflo train``.

    Args:
        help: the option's ``--help`` text.
        panel: the ``--help`` panel it is listed in.
        factory: a default factory (for lists) instead of ``default``.
        flags: further names of the option (``-r``); the first is always ``--field-name``.
        comma_list: a list option given as one comma-separated value (``--milestones 60,120``) of this type;
            otherwise a list option is repeated (``--recipe a --recipe b``).
        in_recipe_file: whether a recipe file's ``[train]`` table may set it (it describes how to train, not what;
            and a recipe file is untrusted input, so nothing that reads files or reaches the network: ``pretrained``,
            ``data_dir``, ``download``, ``teacher``, ``teacher_checkpoint``).
        argument: the command's positional argument rather than an option.
    """
    meta = {"help": help, "panel": panel, "flags": flags, "comma_list": comma_list, "in_recipe_file": in_recipe_file,
            "argument": argument, "option": True}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run; each field's metadata holds its ``--help`` text (see :func:`option`).

    ``source`` is a model name (fresh model), or a kflo checkpoint (expanded or plain). ``recipe`` and
    ``recipe_file`` expand a model name or a plain checkpoint on the fly; without them a model name trains vanilla.
    """

    # -- model -----------------------------------------------------------------------------------------------
    source: str = option("", argument=True, in_recipe_file=False, panel=MODEL, help=(
        "Model name (vanilla, or expanded on the fly with --recipe), or a checkpoint (expanded or plain); omit with --resume."))
    recipe: list[str] = option(factory=list, flags=("-r",), in_recipe_file=False, panel=MODEL,
                               help="NAME or NAME:key=value,...; repeat to combine.")
    recipe_file: list[str] = option(factory=list, in_recipe_file=False, panel=MODEL,
                                    help="TOML recipe file (path or bundled name); its [train] table sets defaults.")
    include: list[str] = option(factory=list, in_recipe_file=False, panel=MODEL, help="Only rewrite layers matching this glob.")
    exclude: list[str] = option(factory=list, in_recipe_file=False, panel=MODEL, help="Never rewrite layers matching this glob.")
    init_from: list[str] = option(factory=list, in_recipe_file=False, panel=MODEL, help=(
        "Plain checkpoint of the architecture to start from; repeat with KFLO to stack further pretrained networks into W_1."))
    init_from_expanded: str | None = option(None, in_recipe_file=False, panel=MODEL, help=(
        "ExpandNet +Init: an expanded checkpoint (the trained nonlinear counterpart) whose tensors start this expansion."))
    pretrained: bool = option(False, in_recipe_file=False, panel=MODEL, help="Start from the library's pretrained weights.")
    init: str | None = option(None, in_recipe_file=False, panel=MODEL, help=(
        "collapsed-expansion:SPEC: start the plain model from a collapsed, untrained expansion (ExpandNets 5.3, "
        "hypothesis 1: is an ExpandNet's gain only a better initialisation?), e.g. collapsed-expansion:expandnet-ck."))
    # -- data ------------------------------------------------------------------------------------------------
    data: str = option("digits", panel=DATA, help=(
        "digits (bundled), fashion-mnist, mnist, cifar10, cifar100, imagefolder, synthetic."))
    data_dir: str | None = option(None, in_recipe_file=False, panel=DATA, help="Where the data set's files are.")
    download: bool = option(False, in_recipe_file=False, panel=DATA, help="Let torchvision download the data set.")
    val_split: float = option(0.0, panel=DATA, help="Fraction of the training set held out for validation (selects best).")
    train_fraction: float = option(1.0, panel=DATA, help="Keep this fraction of each class (KFLO's 40% transfer setting).")
    label_noise: float = option(0.0, panel=DATA, help="Replace this fraction of training labels at random (ExpandNets' study).")
    augment: bool = option(True, panel=DATA, help="The data set's standard augmentation.")
    in_chans: int | None = option(None, panel=DATA, help="Convert the images to this many channels.")
    img_size: int | None = option(None, panel=DATA, help="Resize the images to this size.")
    num_workers: int = option(0, panel=DATA, help="DataLoader worker processes.")
    # -- optimisation ----------------------------------------------------------------------------------------
    seed: int = option(0, panel=OPTIMISATION, help="Seeds initialisation, expansion, data split, order and augmentation.")
    epochs: int = option(10, panel=OPTIMISATION, help="Training epochs.")
    batch_size: int = option(64, panel=OPTIMISATION, help="Global batch (split across torchrun processes).")
    eval_batch_size: int = option(256, panel=OPTIMISATION, help="Batch of the evaluations (validation, test, collapsed model).")
    optimizer: str = option("sgd", panel=OPTIMISATION, help="sgd or adamw.")
    lr: float = option(0.02, panel=OPTIMISATION, help="Base learning rate.")
    momentum: float = option(0.9, panel=OPTIMISATION, help="SGD momentum.")
    nesterov: bool = option(False, panel=OPTIMISATION, help="Nesterov momentum (SGD).")
    betas: list[float] = option(factory=lambda: [0.9, 0.999], comma_list=float, panel=OPTIMISATION, help="AdamW betas, e.g. 0.9,0.999.")
    eps: float = option(1e-8, panel=OPTIMISATION, help="AdamW epsilon.")
    weight_decay: float = option(5e-4, panel=OPTIMISATION, help="The vanilla weight decay; recipes place it per their paper.")
    decay_norm_bias: bool = option(False, panel=OPTIMISATION, help="Also decay 1-D parameters (biases, norm layers).")
    schedule: str = option("cosine", panel=OPTIMISATION, help="cosine, multistep or constant.")
    milestones: list[int] = option(factory=list, comma_list=int, panel=OPTIMISATION, help="Multistep epochs, e.g. 60,120,160.")
    gamma: float = option(0.1, panel=OPTIMISATION, help="Multistep factor.")
    warmup_epochs: float = option(0.0, panel=OPTIMISATION, help="Linear warmup length (may be fractional).")
    min_lr: float = option(0.0, panel=OPTIMISATION, help="Cosine floor.")
    grad_clip: float | None = option(None, panel=OPTIMISATION, help="Clip the gradient's total L2 norm.")
    accumulate: int = option(1, panel=OPTIMISATION, help=(
        "Split each batch into N micro-batches (memory of batch/N; the optimizer step and the schedule see the whole "
        "batch). Each composed kernel is built once per step and its gradient accumulated over the micro-batches."))
    amp: bool = option(False, panel=OPTIMISATION, help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")
    compile: bool = option(False, panel=OPTIMISATION, help="torch.compile the model for training (the first steps "
                           "compile; the collapse afterwards is exact as without).")
    device: str = option("auto", panel=OPTIMISATION, help="auto, cpu, cuda or cuda:N.")
    threads: int | None = option(None, panel=OPTIMISATION, help="CPU threads (torch.set_num_threads); part of the run because float sums depend on it.")
    ema: float | None = option(None, panel=OPTIMISATION, help="Keep an exponential moving average with this decay, e.g. 0.999.")
    # -- distillation ----------------------------------------------------------------------------------------
    teacher: str | None = option(None, in_recipe_file=False, panel=DISTILLATION, help="Teacher architecture (for a plain weights file).")
    teacher_checkpoint: str | None = option(None, in_recipe_file=False, panel=DISTILLATION, help="The trained teacher's checkpoint.")
    kd_alpha: float = option(0.5, panel=DISTILLATION, help="Weight of the distillation term.")
    kd_temperature: float = option(4.0, panel=DISTILLATION, help="Softmax temperature.")
    # -- end of run ------------------------------------------------------------------------------------------
    track: list[str] = option(factory=list, panel=RUN, help=(
        "weights[:layers=GLOB]: after each epoch record the percentile bands of each layer's effective (composed) "
        "weight in metrics.jsonl and weights.png (compander paper, Fig. 3); never changes the training."))
    collapse_from: str = option("last", panel=RUN, help="Which weights to collapse at the end: last, best or ema.")
    verify_rtol: float | None = option(None, panel=RUN, help=(
        "Pass threshold of the final equivalence check (default: 1e-5 for float32, 1e-10 for float64)."))
    # -- recorded, not an option -------------------------------------------------------------------------------
    #: The settings that came from the recipe files' ``[train]`` tables (name -> value), for config.json and the
    #: line printed at the start of a run. Set by :func:`resolve_config`.
    from_recipe_file: dict[str, Any] = field(default_factory=dict, metadata={"option": False})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`KfloError` naming the first invalid setting and what is allowed."""
        from ..analysis.tracking import parse_track
        from ..models import MAX_IMG_SIZE, MAX_IN_CHANS  # the bounds a checkpoint's model arguments must meet

        for spec in self.track:
            parse_track(spec)

        checks: list[tuple[bool, str]] = [
            (self.in_chans is None or 1 <= self.in_chans <= MAX_IN_CHANS, f"--in-chans {self.in_chans} must be from 1 to {MAX_IN_CHANS}"),
            (self.img_size is None or 1 <= self.img_size <= MAX_IMG_SIZE, f"--img-size {self.img_size} must be from 1 to {MAX_IMG_SIZE}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}"),
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
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"--betas {self.betas} must be two numbers in [0, 1)"),
            (self.eps > 0, f"--eps {self.eps} must be > 0"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0"),
            (self.gamma > 0, f"--gamma {self.gamma} must be > 0"),
            (all(m >= 1 for m in self.milestones), f"--milestones {self.milestones} must be epochs >= 1"),
            (list(self.milestones) == sorted(self.milestones), f"--milestones {self.milestones} must be increasing"),
            (self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs} must be >= 0"),
            (0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr]"),
            (self.grad_clip is None or self.grad_clip > 0, f"--grad-clip {self.grad_clip} must be > 0"),
            (self.init is None or (isinstance(self.init, str) and self.init.startswith("collapsed-expansion:")
                                   and len(self.init) > len("collapsed-expansion:")),
             f"--init {self.init} is not collapsed-expansion:SPEC; e.g. --init collapsed-expansion:expandnet-ck"),
            (self.init is None or not (self.recipe or self.recipe_file or self.init_from or self.init_from_expanded
                                       or self.pretrained),
             "--init starts a plain model from a collapsed expansion; drop --recipe/--recipe-file/--init-from/"
             "--init-from-expanded/--pretrained, or drop --init"),
            (1 <= self.accumulate <= min(self.batch_size, 1024),
             f"--accumulate {self.accumulate} is out of range; use an integer from 1 to the batch size "
             f"({self.batch_size}) and at most 1024"),
            (self.ema is None or 0 < self.ema < 1, f"--ema {self.ema} must be a decay in (0, 1), e.g. 0.999"),
            (0 <= self.val_split < 1, f"--val-split {self.val_split} must be in [0, 1)"),
            (0 < self.train_fraction <= 1, f"--train-fraction {self.train_fraction} must be in (0, 1]"),
            (0 <= self.label_noise <= 1, f"--label-noise {self.label_noise} must be in [0, 1]"),
            (0 <= self.kd_alpha <= 1, f"--kd-alpha {self.kd_alpha} must be in [0, 1]"),
            (self.kd_temperature > 0, f"--kd-temperature {self.kd_temperature} must be > 0"),
            (self.verify_rtol is None or 0 < self.verify_rtol <= 0.1,
             f"--verify-rtol {self.verify_rtol} cannot be a verification tolerance; use a number > 0 and at most 0.1"),
            (self.collapse_from != "ema" or self.ema is not None, "--collapse-from ema needs --ema DECAY"),
            (not (self.teacher and not self.teacher_checkpoint), "--teacher needs --teacher-checkpoint FILE (the trained teacher's weights)"),
        ]
        for ok, message in checks:
            if not ok:
                raise KfloError(message)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: The fields that are options of ``kflo train`` (all but what a run records about itself).
OPTIONS: dict[str, dataclasses.Field] = {n: f for n, f in FIELDS.items() if f.metadata.get("option")}
#: Options that only a command line may set (a recipe file's [train] table describes how to train, not what).
NOT_IN_RECIPE_FILE = tuple(n for n, f in OPTIONS.items() if not f.metadata["in_recipe_file"])

#: Settings that left TrainConfig, with what replaces them.
MOVED = {
    "decay_on": "the ExpandNet decay rule is now a recipe parameter: use --recipe expandnet-ck:decay=composed "
                "(or decay = \"composed\" in the recipe file's [[recipe]] table)",
}


def flag(name: str) -> str:
    """``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


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
            said = f"{flag(name)} {value}" if where == "command line" else f"{where}: {name} = {value}"
            raise KfloError(f"{said} is not a finite number; give a finite value")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if base.startswith("dict["):
        if not isinstance(value, dict):
            raise bad
        return dict(value)
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


def _moved(name: str, where: str = "") -> KfloError:
    return KfloError(f"{where + ': ' if where else ''}{name} is no longer a training option; {MOVED[name]}")


def resolve_config(overrides: dict[str, Any], file_defaults: dict[str, Any] | None = None, *, file_name: str = "recipe file") -> TrainConfig:
    """Merge built-in defaults, a recipe file's ``[train]`` table and command-line overrides (in that order).

    The settings taken from the file are recorded in :attr:`TrainConfig.from_recipe_file`.

    Args:
        overrides: options given on the command line (``None`` values mean "not given" and are ignored).
        file_defaults: the recipe files' merged ``[train]`` tables.
        file_name: where ``file_defaults`` came from, for error messages.

    >>> resolve_config({"lr": 0.1}, {"lr": 0.2, "epochs": 3}).lr
    0.1
    """
    values: dict[str, Any] = {}
    from_file: dict[str, Any] = {}
    for key, value in (file_defaults or {}).items():
        name = _normalise_key(key)
        if name in MOVED:
            raise _moved(name, f"{file_name} [train]")
        if name not in OPTIONS or name in NOT_IN_RECIPE_FILE:
            allowed = ", ".join(n for n in OPTIONS if n not in NOT_IN_RECIPE_FILE)
            raise KfloError(f"{file_name}: [train] has no option '{key}'; allowed: {allowed}")
        values[name] = from_file[name] = _coerce(name, value, f"{file_name} [train]")
    for key, value in overrides.items():
        if value is None:
            continue
        name = _normalise_key(key)
        if name in MOVED:
            raise _moved(name)
        if name not in OPTIONS:
            raise KfloError(f"unknown training option '{key}'")
        values[name] = _coerce(name, value, "command line")
        from_file.pop(name, None)
    config = TrainConfig(**values, from_recipe_file=from_file)
    try:
        config.validate()
    except KfloError as exc:  # name the file when the bad value came from it, not from a flag
        for name in from_file:
            if str(exc).startswith(flag(name) + " "):
                raise KfloError(f"{file_name} [train]: {name} = {values[name]!r} is invalid ({exc}); fix the file "
                                f"or override it with {flag(name)}") from None
        raise
    return config


def _upgrade(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A config.json written before the redesign, in today's terms (or one sentence on what cannot carry over)."""
    data = dict(data)
    if "decay_on" in data:
        if data.pop("decay_on") not in (None, "factors"):  # "factors" is today's default
            raise KfloError(f"{where} sets decay_on = \"composed\", which is no longer a training option; "
                            f"{MOVED['decay_on']}, and start the run again with -o")
    if "init_from" in data and not isinstance(data["init_from"], list):
        data["init_from"] = [] if data["init_from"] is None else [data["init_from"]]
    return data


def config_from_dict(data: dict[str, Any], where: str) -> TrainConfig:
    """Rebuild a configuration saved with :meth:`TrainConfig.to_dict` (unknown keys are an error; the run's
    identity, :data:`IDENTITY_KEYS`, is not a setting and is left out)."""
    data = _upgrade({k: v for k, v in data.items() if k not in IDENTITY_KEYS}, where)
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
        if value is None or name not in OPTIONS:
            continue
        if _coerce(name, value, "command line") != getattr(saved, name):
            changed.append(name)
    if changed:
        flags = ", ".join(flag(n) for n in changed)
        raise KfloError(f"--resume continues the saved run unchanged, but {flags} differ from its config.json; drop them or start a new run with -o")


__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "COLLAPSE_FROM",
    "CONFIG_FILE",
    "IDENTITY_KEYS",
    "OPTIMIZERS",
    "OPTIONS",
    "SCHEDULES",
    "TrainConfig",
    "check_resume_overrides",
    "config_from_dict",
    "flag",
    "load_config",
    "option",
    "resolve_config",
]
