"""``kflo train``: the training engine (one loop for vanilla and expanded models, each recipe's optimisation
rules, exact resume, DDP through torchrun) and ``kflo quickstart``. See docs/training.md.

>>> from kflo_cli.train import resolve_config, start
>>> result = start(resolve_config({"source": "lenet5", "recipe": ["kflo"], "epochs": 1}), "runs/demo")  # doctest: +SKIP
"""

from .config import TrainConfig, load_config, resolve_config
from .engine import EXIT_INTERRUPTED, TrainResult, TrainingDiverged, TrainingInterrupted, resume, start
from .source import recipe_file_train_defaults

__all__ = [
    "EXIT_INTERRUPTED",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_config",
    "recipe_file_train_defaults",
    "resolve_config",
    "resume",
    "start",
]
