"""What the ``kflo train`` command does with its parsed options (kept out of cli.py so that stays thin)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import KfloError
from .config import resolve_config
from .engine import EXIT_INTERRUPTED, TrainingInterrupted, resume, start
from .source import recipe_file_train_defaults


def parse_number_list(text: str | None, kind: type, option: str) -> list[Any] | None:
    """``"30,60,90"`` -> ``[30, 60, 90]`` (``None`` stays ``None``: the option was not given)."""
    if text is None:
        return None
    try:
        return [kind(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise KfloError(f"{option} '{text}' is not a comma-separated list of {kind.__name__}s; write e.g. 30,60,90") from None


def run_train(
    *,
    source: str | None,
    output: Path | None,
    resume_dir: Path | None,
    overwrite: bool,
    overrides: dict[str, Any],
    stop_after_steps: int | None = None,
) -> int:
    """Start or resume a run from command-line options; returns the exit status (0, or 130 when interrupted)."""
    try:
        if resume_dir is not None:
            if source is not None or output is not None:
                raise KfloError("--resume RUN_DIR continues a run by itself; drop SOURCE and -o")
            if overwrite:
                raise KfloError("--resume and --overwrite contradict each other; choose one")
            resume(resume_dir, overrides=overrides, stop_after_steps=stop_after_steps)
            return 0
        if source is None:
            raise KfloError("no SOURCE; pass a model name (e.g. lenet5) or a checkpoint, or --resume RUN_DIR")
        if output is None:
            raise KfloError("no run directory; pass -o RUN_DIR (it will hold checkpoints, metrics and the collapsed model)")
        file_defaults, where = recipe_file_train_defaults(overrides.get("recipe_file") or [])
        config = resolve_config({**overrides, "source": source}, file_defaults, file_name=where)
        start(config, output, overwrite=overwrite, stop_after_steps=stop_after_steps)
        return 0
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["parse_number_list", "run_train"]
