"""What the ``kflo train`` command does with its parsed options, and the command's options themselves, built from
:class:`~kflo_cli.train.config.TrainConfig` (kept out of cli.py so that stays thin)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

from ..errors import KfloError
from .config import OPTIONS, TrainConfig, flag, resolve_config


def parse_number_list(text: str | None, kind: type, option: str) -> list[Any] | None:
    """``"30,60,90"`` -> ``[30, 60, 90]`` (``None`` stays ``None``: the option was not given)."""
    if text is None:
        return None
    try:
        return [kind(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise KfloError(f"{option} '{text}' is not a comma-separated list of {kind.__name__}s; write e.g. 30,60,90") from None


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if default is None or default == [] or default == "":
        return ""
    if isinstance(default, bool):
        return f" (default: {'yes' if default else 'no'})"
    if isinstance(default, list):
        return f" (default: {','.join(map(str, default))})"
    return f" (default: {default})"


def _cli_type(annotation: Any, comma_list: type | None) -> Any:
    """The type typer parses: the field's type without ``None``; a comma-separated list arrives as one string."""
    if comma_list is not None:
        return str
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def option_parameters() -> list[inspect.Parameter]:
    """One typer parameter per :class:`TrainConfig` option field, each defaulting to ``None`` ("not given", so a
    recipe file's ``[train]`` table or the built-in default applies)."""
    import typer
    from rich.markup import escape

    hints = typing.get_type_hints(TrainConfig)
    params = []
    for name, f in OPTIONS.items():
        meta = f.metadata
        help_text = escape(meta["help"] + _default_text(f))
        kind = _cli_type(hints[name], meta["comma_list"])
        if meta["argument"]:
            info: Any = typer.Argument(help=help_text, show_default=False)
        elif kind is bool:
            info = typer.Option(f"{flag(name)}/--no-{flag(name)[2:]}", help=help_text, rich_help_panel=meta["panel"], show_default=False)
        else:
            info = typer.Option(flag(name), *meta["flags"], help=help_text, rich_help_panel=meta["panel"], show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], info]))
    return params


def _from_command_line(name: str, value: Any) -> Any:
    comma_list = OPTIONS[name].metadata["comma_list"]
    if comma_list is not None:
        return parse_number_list(value, comma_list, flag(name))
    if isinstance(value, tuple):
        return list(value)
    return value


def train_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command one option per :class:`TrainConfig` field (and SOURCE, the positional argument).

    ``command`` declares its own options (``-o``, ``--resume``, ...) and an ``overrides`` parameter, which receives
    ``{field name: value or None}`` for every training option.
    """
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "overrides"]
    config_params = option_parameters()
    names = [p.name for p in config_params]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        overrides = {name: _from_command_line(name, kwargs.pop(name, None)) for name in names}
        return command(**kwargs, overrides=overrides)

    arguments = [p for p in config_params if OPTIONS[p.name].metadata["argument"]]
    options = [p for p in config_params if not OPTIONS[p.name].metadata["argument"]]
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*arguments, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own), *options])
    wrapper.__annotations__ = {}  # the signature's annotations are complete; typer needs nothing else
    return wrapper


def run_train(
    *,
    overrides: dict[str, Any],
    output: Path | None,
    resume_dir: Path | None,
    overwrite: bool,
    stop_after_steps: int | None = None,
) -> int:
    """Start or resume a run from command-line options (``overrides`` includes ``source``); returns the exit status
    (0, or 130 when interrupted)."""
    from .engine import EXIT_INTERRUPTED, TrainingInterrupted, resume, start
    from .source import recipe_file_train_defaults

    try:
        if resume_dir is not None:
            if overrides.get("source") is not None or output is not None:
                raise KfloError("--resume RUN_DIR continues a run by itself; drop SOURCE and -o")
            if overwrite:
                raise KfloError("--resume and --overwrite contradict each other; choose one")
            resume(resume_dir, overrides=overrides, stop_after_steps=stop_after_steps)
            return 0
        if overrides.get("source") is None:
            raise KfloError("no SOURCE; pass a model name (e.g. lenet5) or a checkpoint, or --resume RUN_DIR")
        if output is None:
            raise KfloError("no run directory; pass -o RUN_DIR (it will hold checkpoints, metrics and the collapsed model)")
        file_defaults, where = recipe_file_train_defaults(overrides.get("recipe_file") or [])
        config = resolve_config(overrides, file_defaults, file_name=where)
        start(config, output, overwrite=overwrite, stop_after_steps=stop_after_steps)
        return 0
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["option_parameters", "parse_number_list", "run_train", "train_options"]
