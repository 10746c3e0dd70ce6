"""``kflo train``: the training engine (one loop for vanilla and expanded models, each recipe's optimisation
rules, exact resume, DDP through torchrun) and ``kflo quickstart``. See docs/training.md.

>>> from kflo_cli.train import resolve_config, start
>>> result = start(resolve_config({"source": "lenet5", "recipe": ["kflo"], "epochs": 1}), "runs/demo")  # doctest: +SKIP
>>> result.summary.collapsed.test_acc  # doctest: +SKIP

The names below are imported on first use, so the command line (which builds ``kflo train``'s options from
:mod:`kflo_cli.train.config`) does not load the engine to print ``--help``.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TrainConfig": "config",
    "load_config": "config",
    "resolve_config": "config",
    "EXIT_INTERRUPTED": "engine",
    "TrainResult": "engine",
    "TrainingDiverged": "engine",
    "TrainingInterrupted": "engine",
    "resume": "engine",
    "start": "engine",
    "recipe_file_train_defaults": "source",
    "Best": "summary",
    "CollapseResult": "summary",
    "RunSummary": "summary",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(_WHERE)
