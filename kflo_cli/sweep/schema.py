"""The grid file's vocabulary: its keys, kflo train's options, and the data settings and methods its tables define."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import KfloError

#: Top-level keys of a grid file.
TOP_KEYS = ("name", "description", "baseline", "models", "seeds", "train", "data", "method")
#: ``kflo train`` options a ``[data.NAME]`` table sets.
DATA_OPTIONS = ("data", "data_dir", "download", "val_split", "train_fraction", "label_noise", "augment", "in_chans", "img_size")
#: Keys restricting the models a method or data setting runs on (fnmatch globs over the grid's model names).
MODEL_FILTERS = ("only_models", "skip_models")
DATA_KEYS = ("description", *DATA_OPTIONS, *MODEL_FILTERS)
#: What may define a method; everything else about training is the shared [train] table.
METHOD_KEYS = ("description", "recipe", "recipe_file", "include", "exclude", "ema", "teacher", "kd_alpha", "kd_temperature",
               "init_from_expanded", *MODEL_FILTERS)
TEACHER_KEYS = ("method", "model")
#: ``kflo train`` options that the sweep itself sets per cell (never in [train] or a method table).
_PER_CELL = {
    "source": "the models are the grid's `models` list",
    "seed": "the seeds are the grid's `seeds` list",
    "threads": "the sweep sets --threads from --jobs (`kflo sweep --threads T` overrides it)",
    "teacher_checkpoint": "a method names its teacher with `teacher = \"METHOD\"` and the sweep passes that run's checkpoint",
    "init_from": "a plain starting checkpoint belongs to one model and a grid has several; it is not supported in a sweep",
}
_METHOD_OPTIONS = ("recipe", "recipe_file", "include", "exclude", "ema", "teacher", "kd_alpha", "kd_temperature", "init_from_expanded")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
#: Options whose value is a path the sweep makes (not compared when matching a finished run to its cell).
SWEEP_PATHS = ("teacher_checkpoint", "init_from_expanded")


# -- small helpers -----------------------------------------------------------------------------------------------
def _close(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _unknown(where: str, key: str, allowed: Iterable[str]) -> KfloError:
    allowed = list(allowed)
    return KfloError(f"{where}: unknown key '{key}'{_close(key, allowed)}; allowed: {', '.join(allowed)}")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _str_list(value: Any, where: str, key: str, *, allow_single: bool = True) -> tuple[str, ...]:
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise KfloError(f"{where}: {key} = {value!r} is not a list of strings; write e.g. {key} = [\"a\", \"b\"]")
    return tuple(value)


def _norm(key: str) -> str:
    return key.replace("-", "_")


def train_options() -> Mapping[str, Any]:
    """``kflo train``'s options: name -> the :class:`~kflo_cli.train.config.TrainConfig` field."""
    from ..train import config

    return getattr(config, "OPTIONS", config.FIELDS)


@functools.lru_cache(maxsize=1)
def train_cli_options() -> frozenset[str]:
    """The option names (``snake_case``) that ``kflo train`` accepts on its command line: what a cell can pass."""
    return frozenset(n for n, f in train_options().items() if not f.metadata.get("argument") and n != "source")


def comma_list(name: str) -> bool:
    """Whether list option ``name`` is given as one comma-separated value (``--milestones 60,120``) rather than
    repeated (``--recipe a --recipe b``)."""
    field_ = train_options().get(name)
    meta = field_.metadata if field_ is not None else {}
    return meta.get("comma_list") is not None if "comma_list" in meta else name in ("milestones", "betas")


def _moved(name: str) -> str | None:
    from ..train import config

    return getattr(config, "MOVED", {}).get(name)


def _train_fields() -> Mapping[str, Any]:
    return train_options()


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert a TOML value to the type of ``kflo train`` option ``name`` (kflo's own rules and messages)."""
    from ..train.config import _coerce as coerce_option

    return coerce_option(name, value, where)


def model_dir(model: str) -> str:
    """The run-directory component for a model name (``timm:resnet18`` -> ``timm_resnet18``)."""
    return model.replace(":", "_").replace("/", "_")


# -- what the tables define -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSetting:
    """A named data setting: ``kflo train`` data options (``data``, ``train_fraction``, ...)."""

    name: str
    options: Mapping[str, Any]
    description: str = ""
    only_models: tuple[str, ...] = ()
    skip_models: tuple[str, ...] = ()

    def runs_on(self, model: str) -> bool:
        return _selected(model, self.only_models, self.skip_models)


@dataclass(frozen=True)
class TeacherRef:
    """The teacher of a distillation method: ``method`` trained on ``model`` (``None``: the student's model),
    with the student's data setting and seed."""

    method: str
    model: str | None = None


@dataclass(frozen=True)
class Method:
    """A named method: recipes (canonical spec strings; none = the vanilla model) and what else defines it."""

    name: str
    recipes: tuple[str, ...] = ()
    description: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ema: float | None = None
    teacher: TeacherRef | None = None
    kd_alpha: float | None = None
    kd_temperature: float | None = None
    init_from_expanded: str | None = None
    only_models: tuple[str, ...] = ()
    skip_models: tuple[str, ...] = ()
    #: (recipe file, its [train] keys) for every recipe file whose [train] table the sweep ignored
    ignored_train: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def vanilla(self) -> bool:
        """Trains the unexpanded model (no recipe and no +Init stage)."""
        return not self.recipes and self.init_from_expanded is None

    def runs_on(self, model: str) -> bool:
        return _selected(model, self.only_models, self.skip_models)

    def options(self) -> dict[str, Any]:
        """The ``kflo train`` options this method adds to the shared schedule (paths of other runs excluded)."""
        out: dict[str, Any] = {}
        if self.recipes:
            out["recipe"] = list(self.recipes)
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.ema is not None:
            out["ema"] = self.ema
            out["collapse_from"] = "ema"  # an EMA method deploys its average
        if self.teacher is not None:
            for key in ("kd_alpha", "kd_temperature"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        return out


def _selected(model: str, only: tuple[str, ...], skip: tuple[str, ...]) -> bool:
    if only and not any(fnmatch.fnmatchcase(model, g) for g in only):
        return False
    return not any(fnmatch.fnmatchcase(model, g) for g in skip)


__all__ = ["DATA_KEYS", "DATA_OPTIONS", "METHOD_KEYS", "MODEL_FILTERS", "SWEEP_PATHS", "TEACHER_KEYS", "TOP_KEYS",
           "DataSetting", "Method", "TeacherRef", "comma_list", "model_dir", "train_cli_options", "train_options"]
